"""MultiModel in JAX: one network trained jointly on tasks of different modalities."""

import os

# TensorFlow (read by TFDS and TensorBoard) logs C++ notices at import; keep them out of the output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


try:
  import flax
except ImportError:  # `multimodel.predict` runs exported programs with jax and numpy alone.
  pass
else:
  # Parameters carry logical axis names (multimodel.sharding); the trainer places them on the
  # mesh with an explicitly sharded, jitted initialisation. Creating a module never needs a mesh.
  flax.config.update("flax_always_shard_variable", False)
