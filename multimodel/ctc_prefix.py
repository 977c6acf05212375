"""CTC prefix scores, for decoding that a CTC head steers (joint CTC/attention decoding).

Watanabe et al., "Hybrid CTC/Attention Architecture for End-to-End Speech Recognition" (2017),
section 4.2, as ESPnet's `CTCPrefixScore`: the log-probability that the CTC head's output begins
with a prefix h, psi(h) = log sum over all label sequences that begin with h of P_CTC(. | x), is
computed from forward variables over the frames, r_t^n(h) (h read by frame t, ending in its last
label) and r_t^b(h) (ending in blank), and extends to h + c in one pass over the frames. The
probability of a finished hypothesis is P_CTC(h | x) = r_S^n(h) + r_S^b(h) at the last real frame.
psi only falls as h grows, like a decoder's log-probability, so beam search's early stop stays
exact with the weighted sum (1 - w) log P_decoder + w psi.

The decoder writes text pieces, the head letters (`objective.ctc_char_table` spells each piece;
with a space label, `ctc_units="chars_and_spaces"`, the word-start mark of a piece is a space). A
piece extends h by all its letters at once: the forward variables of the letters in between are
updated in the same pass over the frames, each from the one before it at the previous frame. The
letters are those `objective.ctc_char_labels` gives the training loss: a space only between two
letters, never first, last or twice in a row. A piece that adds no letter (a lone word-start mark,
a digit) leaves h's score as it was and, if it starts a word, puts a space before the next letter.

Shapes: B batch, N hypotheses (beams) per example, P candidate pieces per hypothesis, S frames,
L labels of the head (0 is the blank), K letters a piece spells at most.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
NEG_INF = -jnp.inf


class PrefixState(NamedTuple):
  """What the prefix scorer keeps of each hypothesis h; every field has leading axes [B, N]."""
  r: Array        # float32 [B, N, S, 2]: log r_t^n(h) and log r_t^b(h) for every frame t.
  score: Array    # float32 [B, N]: psi(h), the log-probability of the prefix h.
  last: Array     # int32 [B, N]: h's last label (0 while h has none).
  pending: Array  # bool [B, N]: a word began since h's last letter (a space precedes the next).


def init(log_probs: Array, mask: Array, hypotheses: int) -> PrefixState:
  """The state of the empty prefix (psi = 0), for `hypotheses` hypotheses per example.

  Args:
    log_probs: float32 [B, S, L], the head's log-softmax over its labels per frame.
    mask: bool [B, S], the real frames (a prefix of each row).
    hypotheses: N.
  """
  blank = jnp.cumsum(jnp.where(mask, log_probs[..., 0], 0.0), axis=1)  # [B, S]
  r = jnp.stack([jnp.full_like(blank, NEG_INF), blank], axis=-1)  # [B, S, 2]
  batch = log_probs.shape[0]
  return PrefixState(r=jnp.repeat(r[:, None], hypotheses, axis=1),
                     score=jnp.zeros((batch, hypotheses), jnp.float32),
                     last=jnp.zeros((batch, hypotheses), jnp.int32),
                     pending=jnp.zeros((batch, hypotheses), bool))


def final_score(state: PrefixState) -> Array:
  """log P_CTC(h | x) of each hypothesis h, taken as finished: [B, N]."""
  # Past the last real frame the forward variables stay as they were there (`extend`, `init`).
  return jnp.logaddexp(state.r[..., -1, 0], state.r[..., -1, 1])


def compact(labels: Array) -> Array:
  """Labels [..., K] with their zeros removed: the rest left-aligned in order, 0-padded."""
  rows = labels.reshape(-1, labels.shape[-1])  # [M, K]
  real = rows != 0
  position = jnp.where(real, jnp.cumsum(real, axis=1) - 1, rows.shape[1])  # Zeros: dropped.
  index = jnp.arange(rows.shape[0])[:, None]
  return jnp.zeros_like(rows).at[index, position].set(rows, mode="drop").reshape(labels.shape)


def candidate_labels(state: PrefixState, tokens: Array, table: Array,
                     space: int) -> tuple[Array, Array]:
  """The labels each candidate piece adds to its hypothesis, and the `pending` it leaves.

  Args:
    state: the hypotheses' state, fields [B, N, ...].
    tokens: int32 [B, N, P], candidate pieces of each hypothesis.
    table: int32 [V, K], each piece's labels (`objective.ctc_char_table`).
    space: the space's label (`objective.ctc_space_label`), 0 when the head writes none.
  Returns:
    labels int32 [B, N, P, K + 1], left-aligned, 0-padded; pending bool [B, N, P].
  """
  spelled = jnp.asarray(table)[tokens]  # [B, N, P, K]
  starts_word = (spelled[..., 0] == space) if space else jnp.zeros(tokens.shape, bool)
  letters = compact(jnp.where(spelled == space, 0, spelled) if space else spelled)
  has_letters = letters[..., 0] != 0
  pending = state.pending[..., None] | starts_word  # [B, N, P]
  lead = jnp.where(pending & has_letters & (state.last[..., None] != 0), space, 0)
  labels = compact(jnp.concatenate([lead[..., None], letters], axis=-1))
  return labels, pending & ~has_letters


def extend(log_probs: Array, mask: Array, state: PrefixState, labels: Array) -> tuple[Array, Array]:
  """psi(h + labels) of each candidate, and its forward variables.

  Args:
    log_probs: float32 [B, S, L]; mask: bool [B, S] (as for `init`).
    state: the hypotheses h, fields [B, N, ...].
    labels: int32 [B, N, P, M], what each candidate adds to its h (left-aligned, 0-padded; all 0:
      nothing, psi stays psi(h)).
  Returns:
    score float32 [B, N, P]; r float32 [B, N, P, S, 2], the forward variables of each h + labels.
  """
  batch, frames = mask.shape
  length = (labels != 0).sum(-1)  # [B, N, P]
  previous = jnp.concatenate(
      [jnp.broadcast_to(state.last[..., None, None], labels.shape[:-1] + (1,)), labels[..., :-1]],
      axis=-1)
  same = labels == previous  # [B, N, P, M]: a repeated label needs a blank in between.
  rows = jnp.arange(batch)[:, None, None, None, None]
  x = log_probs[rows, jnp.arange(frames)[None, :, None, None, None], labels[:, None]]
  x = jnp.moveaxis(x, 1, 0)  # [S, B, N, P, M]: log y_t of each label.
  blank = jnp.moveaxis(log_probs[..., 0], 1, 0)  # [S, B]
  h_r = jnp.moveaxis(state.r, 2, 0)  # [S, B, N, 2]
  masks = jnp.moveaxis(mask, 1, 0)  # [S, B]

  # Frame 0: only the first label of an empty h can be read.
  first = jnp.arange(labels.shape[-1]) == 0
  rn = jnp.where(first & (state.last[..., None, None] == 0), x[0], NEG_INF)  # [B, N, P, M]
  rb = jnp.full_like(rn, NEG_INF)
  psi = rn

  def last_of(v):  # [B, N, P, M] -> [B, N, P]: the value at each candidate's last label.
    return jnp.take_along_axis(v, jnp.maximum(length - 1, 0)[..., None], axis=-1)[..., 0]

  def step(carry, inputs):
    rn, rb, psi = carry
    x_t, blank_t, h_prev, real = inputs
    # The variables at frame t - 1 of each label's prefix: h itself for the first label.
    prev_n = jnp.concatenate([jnp.broadcast_to(h_prev[..., None, None, 0], rn.shape[:-1] + (1,)),
                              rn[..., :-1]], axis=-1)
    prev_b = jnp.concatenate([jnp.broadcast_to(h_prev[..., None, None, 1], rn.shape[:-1] + (1,)),
                              rb[..., :-1]], axis=-1)
    phi = jnp.where(same, prev_b, jnp.logaddexp(prev_n, prev_b))
    new = (jnp.logaddexp(rn, phi) + x_t,
           jnp.logaddexp(rn, rb) + blank_t[:, None, None, None],
           jnp.logaddexp(psi, phi + x_t))
    real = real[:, None, None, None]
    carry = tuple(jnp.where(real, a, b) for a, b in zip(new, carry))
    return carry, jnp.stack([last_of(carry[0]), last_of(carry[1])], axis=-1)

  r0 = jnp.stack([last_of(rn), last_of(rb)], axis=-1)  # [B, N, P, 2]
  (rn, rb, psi), r = jax.lax.scan(step, (rn, rb, psi), (x[1:], blank[1:], h_r[:-1], masks[1:]))
  r = jnp.concatenate([r0[None], r])  # [S, B, N, P, 2]
  r = jnp.moveaxis(r, 0, -2)  # [B, N, P, S, 2]
  adds = length > 0
  score = jnp.where(adds, last_of(psi), state.score[..., None])
  r = jnp.where(adds[..., None, None], r, state.r[:, :, None])
  return score, r


def choose(state: PrefixState, labels: Array, pending: Array, score: Array, r: Array,
           index: Array) -> PrefixState:
  """The state of the chosen candidates: `index` int [B, K] into the flattened [N * P] candidates
  of `extend` (score [B, N, P], r [B, N, P, S, 2]) and `candidate_labels` (labels, pending)."""
  batch, n, p = score.shape
  parent = index // p

  def pick(x):  # [B, N, P, ...] -> [B, K, ...]
    flat = x.reshape((batch, n * p) + x.shape[3:])
    return jnp.take_along_axis(flat, index.reshape(index.shape + (1,) * (flat.ndim - 2)), axis=1)

  length = (labels != 0).sum(-1, keepdims=True)
  added = jnp.take_along_axis(labels, jnp.maximum(length - 1, 0), axis=-1)[..., 0]  # [B, N, P]
  last = jnp.where(length[..., 0] > 0, added, state.last[..., None])
  return PrefixState(r=pick(r), score=pick(score), last=pick(last), pending=pick(pending))
