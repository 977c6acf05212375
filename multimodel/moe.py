"""Sparsely-gated mixture of experts (Shazeer et al. 2017), as used in the MultiModel body.

Each token is routed to the K experts with the largest noisy gating logits; its output is the
gate-weighted sum of those experts' outputs, the gates being a softmax over the K chosen logits.
An auxiliary loss, coef * (cv^2(importance) + cv^2(load)), keeps the experts evenly used.

Dispatch follows GShard: every (token, choice) assignment gets a position in its expert's buffer
of capacity C (first choices of all tokens before second choices, tokens in order); assignments
past the capacity are dropped (that choice contributes nothing). Tokens are gathered into the
buffers [E, C, D] with index arrays (no [N, E, C] one-hot), the experts run as batched einsums
over the E axis (which the expert weights tag with the `expert` logical axis, so that they can be
sharded across devices), and the outputs are gathered back.

Cost (benchmarks/moe.py, CPU): the expert matmuls run on all E * C slots, empty ones included, so
they cost about capacity_factor times those of a dense layer of the same active FLOPs; gating,
positions and the gathers add roughly another 10%.

Shape legend: B batch, L length, N = B * L tokens, D width, H expert hidden width, E experts,
K top-k, C capacity.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import ndtr

from multimodel.sharding import EMBED, EXPERT, MLP

# Floor of the gating-noise standard deviation (the paper's noise_epsilon).
NOISE_EPSILON = 1e-2


def cv_squared(x: jax.Array) -> jax.Array:
  """Squared coefficient of variation, var(x) / mean(x)^2, of a vector; 0 for a constant one."""
  mean = jnp.mean(x)
  return jnp.var(x) / (mean * mean + 1e-10)


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
  """Buffer size of each expert, C = ceil(capacity_factor * N * K / E), at most N."""
  c = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
  return max(1, min(c, num_tokens))


def buffer_positions(expert_index: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
  """Position of every (choice, token) assignment in its expert's buffer.

  Assignments are counted choice-major (all first choices in token order, then all second
  choices, ...), so a token's first choice has priority over any token's second choice.

  Args:
    expert_index: int [K, N], the expert of each assignment.
    valid: bool [K, N], False for assignments of padded tokens (they take no position).
    num_experts: E.

  Returns:
    int32 [K, N]: 0-based position; meaningless where not `valid`.
  """
  k, n = expert_index.shape
  one_hot = (expert_index[..., None] == jnp.arange(num_experts)) & valid[..., None]
  one_hot = one_hot.astype(jnp.int32).reshape(k * n, num_experts)  # [K*N, E]
  position = jnp.sum(jnp.cumsum(one_hot, axis=0) * one_hot, axis=-1) - 1  # [K*N]
  return position.reshape(k, n)


class MoE(nnx.Module):
  """Mixture of 2-layer ReLU experts D -> H -> D with noisy top-k gating.

  Attributes:
    w_gate: [D, E] gating weights (zero-initialised: uniform routing at the start).
    w_noise: [D, E] weights of the gating-noise scale (zero-initialised).
    w_in, b_in: [E, D, H], [E, H] first layer of every expert.
    w_out, b_out: [E, H, D], [E, D] second layer of every expert.
  """

  def __init__(
      self,
      d_model: int,
      hidden: int,
      num_experts: int,
      top_k: int,
      *,
      capacity_factor: float,
      eval_capacity_factor: float,
      loss_coef: float,
      dtype: jnp.dtype = jnp.float32,
      param_dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    """Builds the gate and the stacked experts.

    Args:
      d_model: D.
      hidden: H, hidden width of each expert.
      num_experts: E.
      top_k: K, experts per token (1 <= K <= E).
      capacity_factor: buffer size per expert in training, as a multiple of N * K / E.
      eval_capacity_factor: same, when not training.
      loss_coef: weight of the balancing loss returned in `aux["loss"]`.
      dtype: compute dtype of the experts (gating always runs in float32).
      param_dtype: dtype of the parameters.
      rngs: `params` stream for initialisation.
    """
    if not 1 <= top_k <= num_experts:
      raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    self.num_experts = num_experts
    self.top_k = top_k
    self.capacity_factor = capacity_factor
    self.eval_capacity_factor = eval_capacity_factor
    self.loss_coef = loss_coef
    self.dtype = dtype

    zeros = nnx.initializers.zeros_init()
    # Fan-in of a stacked kernel is its second-to-last axis; the expert axis is a batch axis.
    kernel = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    key = rngs.params
    self.w_gate = nnx.Param(
        nnx.with_partitioning(zeros, (EMBED, None))(key(), (d_model, num_experts), param_dtype)
    )
    self.w_noise = nnx.Param(
        nnx.with_partitioning(zeros, (EMBED, None))(key(), (d_model, num_experts), param_dtype)
    )
    self.w_in = nnx.Param(
        nnx.with_partitioning(kernel, (EXPERT, EMBED, MLP))(
            key(), (num_experts, d_model, hidden), param_dtype
        )
    )
    self.b_in = nnx.Param(
        nnx.with_partitioning(zeros, (EXPERT, MLP))(key(), (num_experts, hidden), param_dtype)
    )
    self.w_out = nnx.Param(
        nnx.with_partitioning(kernel, (EXPERT, MLP, EMBED))(
            key(), (num_experts, hidden, d_model), param_dtype
        )
    )
    self.b_out = nnx.Param(
        nnx.with_partitioning(zeros, (EXPERT, EMBED))(key(), (num_experts, d_model), param_dtype)
    )

  def gate(
      self, x: jax.Array, valid: jax.Array, noise: jax.Array | None
  ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """Noisy top-k gating, in float32.

    Args:
      x: [N, D] tokens.
      valid: bool [N], False at padded tokens.
      noise: float32 [N, E] standard normal draws (training), or None (no noise).

    Returns:
      expert_index: int32 [K, N], the chosen experts, best first.
      gates: float32 [K, N], softmax over the K chosen logits; 0 at padded tokens.
      stats: `importance` [E] (sum of gates per expert) and `load_estimate` [E] (the paper's
        smooth estimate of the number of tokens per expert, or the exact count without noise).
    """
    e, k = self.num_experts, self.top_k
    x = x.astype(jnp.float32)
    w_gate = self.w_gate[...].astype(jnp.float32)
    if noise is not None:
      # One [D, 2E] product for the logits and the noise scale (cheaper to differentiate).
      w_noise = self.w_noise[...].astype(jnp.float32)
      both = x @ jnp.concatenate([w_gate, w_noise], axis=1)  # [N, 2E]
      clean = both[:, :e]  # [N, E]
      std = jax.nn.softplus(both[:, e:]) + NOISE_EPSILON  # [N, E]
      logits = clean + noise * std  # [N, E]
    else:
      clean = logits = x @ w_gate  # [N, E]
    top_logits, top_index = jax.lax.top_k(logits, min(k + 1, e))  # [N, K+1]
    gates = jax.nn.softmax(top_logits[:, :k], axis=-1)  # [N, K]
    gates = jnp.where(valid[:, None], gates, 0.0).T  # [K, N]
    expert_index = top_index[:, :k].T  # [K, N]

    chosen = jax.nn.one_hot(expert_index, e, dtype=jnp.float32)  # [K, N, E]
    importance = jnp.einsum("KNE,KN->E", chosen, gates)  # [E]
    if noise is not None and k < e:
      # P(expert in the top k) when its own noise is redrawn and the others' are kept: it is in
      # iff its noisy logit beats the k-th best of the others, which is the (k+1)-th best overall
      # when it is in and the k-th best when it is out.
      threshold_in = top_logits[:, k:]  # [N, 1]
      threshold_out = top_logits[:, k - 1 : k]  # [N, 1]
      prob = jnp.where(
          logits > threshold_in,
          ndtr((clean - threshold_in) / std),
          ndtr((clean - threshold_out) / std),
      )  # [N, E]
      load_estimate = jnp.sum(jnp.where(valid[:, None], prob, 0.0), axis=0)  # [E]
    else:
      load_estimate = jnp.einsum("KNE,N->E", chosen, valid.astype(jnp.float32))  # [E]
    return expert_index, gates, {"importance": importance, "load_estimate": load_estimate}

  def experts(self, buffers: jax.Array) -> jax.Array:
    """Runs every expert on its buffer: [E, C, D] -> [E, C, D] in `self.dtype`.

    One batched einsum per layer keeps E a plain array axis that can be sharded (a `lax.scan`
    over experts ran about 5% faster on CPU but would serialise the experts everywhere).
    """
    dtype = self.dtype
    h = jnp.einsum("ECD,EDH->ECH", buffers, self.w_in[...].astype(dtype))  # [E, C, H]
    h = jax.nn.relu(h + self.b_in[...].astype(dtype)[:, None, :])
    y = jnp.einsum("ECH,EHD->ECD", h, self.w_out[...].astype(dtype))  # [E, C, D]
    return y + self.b_out[...].astype(dtype)[:, None, :]

  def __call__(
      self,
      x: jax.Array,
      mask: jax.Array | None = None,
      *,
      train: bool,
      rngs: nnx.Rngs | None = None,
      capacity_factor: float | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Routes every token to its top-k experts and combines their outputs.

    Args:
      x: [B, L, D].
      mask: bool [B, L], True at real tokens; padded tokens get zero output, take no buffer
        slot and count in no statistic. None: every token is real.
      train: adds gating noise, `jax.random.normal(rngs.dropout(), (N, E))` in token order, and
        uses `capacity_factor`; otherwise no noise and `eval_capacity_factor`.
      rngs: needed when training.
      capacity_factor: overrides `capacity_factor` / `eval_capacity_factor` (e.g. E / K for a
        decoding step, so that every token fits).

    Returns:
      y: [B, L, D], dtype of x.
      aux: float32 arrays:
        loss: scalar, loss_coef * (cv^2(importance) + cv^2(load_estimate)).
        load: [E], fraction of the (token, choice) assignments routed to each expert (before
          capacity drops).
        importance: [E], sum over tokens of the gates of each expert.
        load_estimate: [E], the differentiable load used in the loss.
        dropped: scalar, number of assignments dropped because their expert's buffer was full.
        dropped_fraction: scalar, dropped / number of assignments.
    """
    b, l, d = x.shape
    n, e, k = b * l, self.num_experts, self.top_k
    tokens = x.reshape(n, d)  # [N, D]
    valid = jnp.ones((n,), bool) if mask is None else mask.reshape(n).astype(bool)  # [N]
    noise = None
    if train:
      if rngs is None:
        raise ValueError("MoE needs rngs (a 'dropout' stream) for the gating noise in training.")
      noise = jax.random.normal(rngs.dropout(), (n, e), jnp.float32)  # [N, E]
    expert_index, gates, stats = self.gate(tokens, valid, noise)  # [K, N], [K, N]

    if capacity_factor is None:
      capacity_factor = self.capacity_factor if train else self.eval_capacity_factor
    c = capacity(n, e, k, capacity_factor)
    routed = jnp.broadcast_to(valid, (k, n))  # [K, N]
    position = buffer_positions(expert_index, routed, e)  # [K, N]
    kept = routed & (position < c)  # [K, N]
    # Flat buffer slot of each assignment; E * C (out of range) for dropped or padded ones.
    slot = jnp.where(kept, expert_index * c + position, e * c)  # [K, N]
    token_ids = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (k, n))  # [K, N]
    # Inverse map: the token in every slot, N (out of range: reads as zeros) where empty.
    slot_token = jnp.full((e * c,), n, jnp.int32).at[slot.reshape(-1)].set(
        token_ids.reshape(-1), mode="drop"
    )  # [E * C]
    buffers = tokens.astype(self.dtype).at[slot_token].get(mode="fill", fill_value=0)
    outputs = self.experts(buffers.reshape(e, c, d)).reshape(e * c, d)  # [E * C, D]
    picked = outputs.at[slot].get(mode="fill", fill_value=0)  # [K, N, D]
    y = jnp.einsum("KN,KND->ND", gates, picked.astype(jnp.float32))  # [N, D]

    num_routed = jnp.sum(routed.astype(jnp.float32))
    counts = jnp.einsum("KNE,KN->E", jax.nn.one_hot(expert_index, e), routed.astype(jnp.float32))
    dropped = num_routed - jnp.sum(kept.astype(jnp.float32))
    aux = {
        "loss": self.loss_coef
        * (cv_squared(stats["importance"]) + cv_squared(stats["load_estimate"])),
        "load": counts / jnp.maximum(num_routed, 1.0),
        "importance": stats["importance"],
        "load_estimate": stats["load_estimate"],
        "dropped": dropped,
        "dropped_fraction": dropped / jnp.maximum(num_routed, 1.0),
    }
    return y.reshape(b, l, d).astype(x.dtype), aux
