"""MultiModel in JAX: one network trained jointly on tasks of different modalities."""
