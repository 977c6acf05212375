"""Dense feed-forward layer, the stand-in for a mixture of experts when `use_moe=False`."""

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import sharding

Array = jax.Array


class FeedForward(nnx.Module):
  """ReLU MLP D -> hidden -> D with the call signature of `moe.MoE` (aux holds a zero loss)."""

  def __init__(self, d_model: int, hidden: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    def dense(i, o, axes):
      return nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes))

    self.wi = dense(d_model, hidden, (sharding.EMBED, sharding.MLP))
    self.wo = dense(hidden, d_model, (sharding.MLP, sharding.EMBED))

  def __call__(self, x: Array, mask: Array | None = None, *, train: bool = False,
               rngs: nnx.Rngs | None = None, capacity_factor: float | None = None
               ) -> tuple[Array, dict]:
    """x [B, L, D] -> ([B, L, D], {"loss": 0})."""
    del mask, train, rngs, capacity_factor  # Position-wise and deterministic.
    return self.wo(jax.nn.relu(self.wi(x))).astype(x.dtype), {"loss": jnp.zeros((), jnp.float32)}
