"""MultiModel in JAX: one network trained jointly on tasks of different modalities."""

import flax

# Parameters carry logical axis names (multimodel.sharding); the trainer places them on the mesh
# with an explicitly sharded, jitted initialisation. Creating a module never needs a mesh.
flax.config.update("flax_always_shard_variable", False)
