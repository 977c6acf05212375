"""Autoregressive decoding of sequence targets: greedy, beam search, and a slow reference.

Shapes: B batch, S source length, T target length (`max_length`), V vocabulary, N beam size.

Every decoder encodes the inputs once, then runs one `model.decode_step` per output position over
the network's incremental cache (`model.init_decode_state`), inside a `jax.lax.while_loop` that
stops early once every sequence has ended (beam search: once no alive beam can still win).
`full_rerun_greedy` is the obvious reference: it re-runs the whole teacher-forced forward pass at
every position.

Conventions shared by all decoders:
  * id 1 ends a sequence (`eos_id`); the EOS token is kept, every position after it is 0 (pad).
  * The pad id 0 is never emitted (its logit is masked), so a 0 in the output always means "after
    the end"; a sequence that reaches `max_length` without EOS is returned truncated.
  * Optional rules forbid tokens (score -inf) before the argmax or the beams' ranking:
    `no_repeat_ngram` (no repeated n-gram, against loops), `bracket_deltas` (outputs that are
    linearised trees stay well-formed: `keep_brackets_balanced`) and, with it, `word_starts` and
    `max_open_run` (a tree whose leaves are exactly its input's pieces: `keep_input_leaves`).
  * They are pure functions of the model's state: call them inside `nnx.jit`, or use
    `make_decoder`, a `jax.jit`-compiled function of (state, inputs, input_mask) that merges
    the model from its graphdef. Called eagerly they still work, but the loop body is traced and
    compiled on every call.

`model` is anything with `encode(task, inputs, input_mask) -> (enc, enc_mask, aux)`,
`init_decode_state(task, enc, enc_mask, max_length) -> state` (a pytree whose leaves all have the
batch as their leading axis) and `decode_step(task, state, prev_token, position) -> (logits
[B, V], state)`, as `multimodel.model.MultiModel` has.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from multimodel import ctc_prefix

Array = jax.Array
EOS_ID = 1
PAD_ID = 0
NEG_INF = -jnp.inf


def _mask_pad(logits: Array) -> Array:
  """Forbids the pad id: logits [..., V] -> [..., V] with -inf at id 0."""
  return logits.at[..., PAD_ID].set(NEG_INF)


def ban_repeated_ngrams(scores: Array, tokens: Array, t: Array | int, n: int) -> Array:
  """Forbids every token that would repeat an n-gram of the output so far (`no_repeat_ngram`).

  The rule of fairseq's `--no-repeat-ngram-size` and Hugging Face's `no_repeat_ngram_size`: where
  the last n - 1 tokens already occurred followed by token w, w gets score -inf (n = 1 forbids
  every token already emitted). For outputs that loop ("of the king of the king ..."); not for
  outputs whose grammar repeats n-grams (bracketed trees).

  Args:
    scores: logits or log-probabilities [B, V] of position t.
    tokens: int [B, T], the output so far in positions < t (later positions are ignored).
    t: the position being decoded.
    n: the n-gram size; 0 changes nothing.
  Returns:
    scores [B, V] with the forbidden tokens at -inf.
  """
  batch, length = tokens.shape
  if n <= 0 or n > length:
    return scores
  starts = jnp.arange(length - n + 1)  # n-grams tokens[i : i + n]
  prefix = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(t - n + 1, 0), n - 1, axis=1)
  windows = tokens[:, starts[:, None] + jnp.arange(n - 1)]  # [B, T - n + 1, n - 1]
  match = (jnp.all(windows == prefix[:, None, :], axis=-1)
           & (starts + n - 1 < t) & (t >= n - 1))  # [B, T - n + 1]: an earlier n-gram's prefix
  following = tokens[:, starts + n - 1]  # [B, T - n + 1]
  banned = jnp.zeros(scores.shape, bool).at[jnp.arange(batch)[:, None], following].max(match)
  return jnp.where(banned, NEG_INF, scores)


def _per_id(table: Array, vocab: int, dtype) -> Array:
  """A tokenizer's table [V'] over the model's V >= V' ids: the ids past the tokenizer's are
  padded with 0 (no bracket, not a word start)."""
  table = jnp.asarray(table, dtype)
  return jnp.pad(table, (0, vocab - table.shape[0]))


def keep_brackets_balanced(scores: Array, tokens: Array, t: Array | int, deltas: Array | None,
                           eos_id: int = EOS_ID) -> Array:
  """Keeps a bracketed output (a linearised tree) well-formed: one outermost bracket, balanced.

  The first token must open a bracket; while brackets are open, EOS and any token that would close
  more of them than are open are forbidden; once the outermost bracket closes, only EOS is
  allowed. Words and labels are left to the model: this is the grammar of the brackets alone.

  Args:
    scores: logits or log-probabilities [B, V] of position t.
    tokens: int [B, T], the output so far in positions < t (later ones 0, the pad id).
    t: the position being decoded.
    deltas: int [V'], V' <= V, the brackets each token opens minus those it closes
      (`Tokenizer.bracket_deltas`; 0 for pad and EOS; ids >= V' hold none); None changes nothing.
    eos_id: end-of-sequence id.
  Returns:
    scores [B, V] with the forbidden tokens at -inf.
  """
  if deltas is None:
    return scores
  deltas = _per_id(deltas, scores.shape[-1], jnp.int32)  # [V]
  depth = jnp.sum(deltas[tokens], axis=-1)  # [B]: the pad id after position t has delta 0.
  is_eos = jnp.arange(scores.shape[-1]) == eos_id  # [V]
  allowed = jnp.where(
      (depth > 0)[:, None],
      (depth[:, None] + deltas[None, :] >= 0) & ~is_eos,  # Inside the tree.
      jnp.where(t == 0, deltas > 0, is_eos)[None, :])  # Before it: open one; after it: stop.
  return jnp.where(allowed, scores, NEG_INF)


def keep_input_leaves(scores: Array, tokens: Array, t: Array | int, deltas: Array,
                      word_starts: Array, leaves: Array, eos_id: int = EOS_ID,
                      max_open_run: int = 0) -> Array:
  """Keeps a tree's leaves exactly its input's pieces, in order (with `keep_brackets_balanced`).

  For a parser that reads the words of the tree it writes (`data.tasks.TreeLeaves`): every token
  that is not a bracket (delta 0), pad or EOS is a leaf. Where c of the input's n pieces are
  written: the next leaf must be piece c (there is none once c = n); a bracket opens only while
  pieces remain and closes only after a leaf (no empty constituent), neither inside a word (before
  a piece that continues one); the outermost bracket closes (and so the tree ends) only once all
  n pieces are written (the input holds no brackets). With `max_open_run` = m > 0, at most m
  brackets open in a row (without a leaf or a close between them): a model that does not want the
  next word otherwise tends to open bracket after bracket until the length runs out. An empty
  input (n = 0) changes nothing.

  Args:
    scores: logits or log-probabilities [B, V] of position t.
    tokens: int [B, T], the output so far in positions < t (later ones 0, the pad id).
    t: the position being decoded.
    deltas: int [V'], V' <= V, as for `keep_brackets_balanced`.
    word_starts: bool [V']: the pieces that begin a word (`Tokenizer.word_starts`).
    leaves: int [B, S]: the input's pieces, 0-padded.
    eos_id: end-of-sequence id.
    max_open_run: the most brackets opened in a row (0: no limit).
  Returns:
    scores [B, V] with the forbidden tokens at -inf.
  """
  vocab = scores.shape[-1]
  deltas = _per_id(deltas, vocab, jnp.int32)  # [V]
  word_starts = _per_id(word_starts, vocab, bool)  # [V]
  ids = jnp.arange(vocab)  # [V]
  is_leaf = (deltas[tokens] == 0) & (tokens != PAD_ID) & (tokens != eos_id)  # [B, T]
  written = jnp.sum(is_leaf, axis=-1)  # [B]: c
  total = jnp.sum(leaves != PAD_ID, axis=-1)  # [B]: n
  remain = written < total  # [B]
  following = jnp.take_along_axis(
      leaves, jnp.minimum(written, leaves.shape[1] - 1)[:, None], axis=1)[:, 0]  # [B]
  in_word = remain & (written > 0) & ~word_starts[following]  # [B]: piece c continues a word
  positions = jnp.arange(tokens.shape[1])
  not_open = (deltas[tokens] <= 0) & (positions < t)  # [B, T]
  opened = t - 1 - jnp.max(jnp.where(not_open, positions, -1), axis=-1)  # [B]: in a row, to t
  after_open = opened > 0  # [B]
  may_open = (opened < max_open_run) if max_open_run else True  # [B]
  depth = jnp.sum(deltas[tokens], axis=-1)  # [B]
  allowed = (
      (remain[:, None] & (ids[None, :] == following[:, None]))  # The next leaf.
      | ((deltas > 0)[None, :] & (remain & ~in_word & may_open)[:, None])  # Open.
      | ((deltas < 0)[None, :] & (~after_open & ~in_word)[:, None]  # Close, the root at the end.
         & ((depth[:, None] + deltas[None, :] > 0) | ~remain[:, None]))
      | ((ids == eos_id)[None, :] & ~remain[:, None])  # End.
      | (total == 0)[:, None])
  return jnp.where(allowed, scores, NEG_INF)


def _tree_rules(scores: Array, tokens: Array, t: Array | int, eos_id: int,
                bracket_deltas: Array | None, word_starts: Array | None,
                leaves: Array | None, max_open_run: int) -> Array:
  """`keep_brackets_balanced`, then `keep_input_leaves` when `word_starts` is given."""
  scores = keep_brackets_balanced(scores, tokens, t, bracket_deltas, eos_id)
  if word_starts is None:
    return scores
  if bracket_deltas is None or leaves is None:
    raise ValueError("word_starts (leaves that are the input's pieces) needs bracket_deltas and "
                     "text inputs")
  return keep_input_leaves(scores, tokens, t, bracket_deltas, word_starts, leaves, eos_id,
                           max_open_run)


def _leaves(inputs: Array, input_mask: Array | None, word_starts: Array | None) -> Array | None:
  """The input's pieces [B, S] (0 where masked) when the tree's leaves must be them, else None."""
  if word_starts is None:
    return None
  if not jnp.issubdtype(inputs.dtype, jnp.integer) or inputs.ndim != 2:
    raise ValueError(f"word_starts needs text inputs (int [B, S]), got {inputs.dtype} "
                     f"{inputs.shape}")
  return inputs if input_mask is None else jnp.where(input_mask, inputs, PAD_ID)


def _greedy_loop(step: Callable, state, batch: int, max_length: int, eos_id: int,
                 no_repeat_ngram: int = 0, bracket_deltas: Array | None = None,
                 word_starts: Array | None = None, leaves: Array | None = None,
                 max_open_run: int = 0) -> Array:
  """The argmax loop of both greedy decoders.

  Args:
    step: (state, tokens [B, T] so far, prev_token [B], position) -> (logits [B, V], state).
    state: its initial state.
    no_repeat_ngram: n of `ban_repeated_ngrams` (0: off).
    bracket_deltas: of `keep_brackets_balanced` (None: off).
    word_starts, leaves, max_open_run: of `keep_input_leaves` (None: off).
  Returns:
    tokens int32 [B, T].
  """

  def cond(carry):
    t, _, _, finished, _ = carry
    return (t < max_length) & ~jnp.all(finished)

  def body(carry):
    t, tokens, prev, finished, state = carry
    logits, state = step(state, tokens, prev, t)  # [B, V]
    logits = ban_repeated_ngrams(_mask_pad(logits), tokens, t, no_repeat_ngram)
    logits = _tree_rules(logits, tokens, t, eos_id, bracket_deltas, word_starts, leaves,
                         max_open_run)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    token = jnp.where(finished, PAD_ID, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t, axis=1)  # [B, T]
    return t + 1, tokens, token, finished | (token == eos_id), state

  carry = (jnp.int32(0), jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch,), bool), state)
  return jax.lax.while_loop(cond, body, carry)[1]


def greedy(model, task, inputs: Array, input_mask: Array | None = None, *, max_length: int,
           eos_id: int = EOS_ID, no_repeat_ngram: int = 0, bracket_deltas: Array | None = None,
           word_starts: Array | None = None, max_open_run: int = 0) -> Array:
  """Greedy decoding with the incremental cache.

  Args:
    model: the network (see the module docstring).
    task: its `TaskSpec` (static).
    inputs: raw inputs of the task's input modality, batch B.
    input_mask: bool [B, S] or None (as the model's `encode` takes it).
    max_length: T, the most positions decoded (static).
    eos_id: end-of-sequence id; a value no token takes (e.g. -1) decodes all T positions.
    no_repeat_ngram: forbid repeating an n-gram of this size (`ban_repeated_ngrams`; 0: off).
    bracket_deltas: int [V] for outputs that are trees (`keep_brackets_balanced`; None: off).
    word_starts: bool [V] for trees whose leaves are the input's pieces (text inputs, with
      `bracket_deltas`; `keep_input_leaves`; None: off).
    max_open_run: with `word_starts`, the most brackets opened in a row (0: no limit).
  Returns:
    tokens int32 [B, T]: argmax ids up to and including EOS, 0 after it.
  """
  enc, enc_mask, _ = model.encode(task, inputs, input_mask)  # [B, S, D], [B, S] or None
  state = model.init_decode_state(task, enc, enc_mask, max_length)

  def step(state, tokens, prev, t):
    del tokens  # The cache holds what the step needs of them.
    return model.decode_step(task, state, prev, t)

  return _greedy_loop(step, state, enc.shape[0], max_length, eos_id, no_repeat_ngram,
                      bracket_deltas, word_starts, _leaves(inputs, input_mask, word_starts),
                      max_open_run)


def full_rerun_greedy(model, task, inputs: Array, input_mask: Array | None = None, *,
                      max_length: int, eos_id: int = EOS_ID, no_repeat_ngram: int = 0,
                      bracket_deltas: Array | None = None,
                      word_starts: Array | None = None, max_open_run: int = 0) -> Array:
  """Greedy decoding without a cache: the slow reference for `greedy`.

  Position t runs the whole teacher-forced forward pass (encoder included) on the targets decoded
  so far, held in a zero-padded [B, T] buffer, so decoding T positions costs T full passes. The
  buffer holds a placeholder (any non-pad id) at t: its value is invisible to position t
  (causality) but makes the target mask count t as a real position, as the cached step does.
  Same arguments and result as `greedy`.
  """

  def step(state, tokens, prev, t):
    del prev
    placeholder = jnp.full((tokens.shape[0], 1), EOS_ID, jnp.int32)
    targets = jax.lax.dynamic_update_slice_in_dim(tokens, placeholder, t, axis=1)  # [B, T]
    logits, _ = model(task, inputs, targets, input_mask)  # [B, T, V]
    return jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False), state  # [B, V]

  return _greedy_loop(step, (), inputs.shape[0], max_length, eos_id, no_repeat_ngram,
                      bracket_deltas, word_starts, _leaves(inputs, input_mask, word_starts),
                      max_open_run)


def gnmt_length_penalty(length: Array | int, alpha: float) -> Array:
  """GNMT / tensor2tensor length penalty ((5 + length) / 6) ** alpha; length counts the EOS."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _gather_beams(x: Array, beam_index: Array) -> Array:
  """x [B, N', ...], beam_index int [B, N] -> [B, N, ...]: x[b, beam_index[b, n]]."""
  index = beam_index.reshape(beam_index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def _gather_flat_beams(x: Array, beam_index: Array) -> Array:
  """Same on a cache leaf whose batch axis is flattened: x [B * N, ...] -> [B * N, ...]."""
  batch, beams = beam_index.shape
  x = x.reshape((batch, x.shape[0] // batch) + x.shape[1:])  # [B, N, ...]
  return _gather_beams(x, beam_index).reshape((batch * beams,) + x.shape[2:])


def _top_k_beams(scores: Array, k: int, *arrays: Array) -> tuple[Array, ...]:
  """Top k along axis 1 of scores [B, M]: (scores [B, k], index [B, k], each array gathered)."""
  top, index = jax.lax.top_k(scores, k)  # [B, k]
  return (top, index) + tuple(_gather_beams(a, index) for a in arrays)


class JointCTC(NamedTuple):
  """How a CTC head over letters steers beam search (joint CTC/attention decoding, `ctc_prefix`).

  Each hypothesis's `candidates` most likely next pieces under the decoder are scored by the
  head's prefix log-probability psi (`ctc_prefix.extend`; an EOS by the head's probability of the
  whole hypothesis), and beams are ranked by (1 - weight) log P_decoder + weight psi.
  """
  weight: float     # In [0, 1]; 0 ranks by the decoder alone (among the candidates).
  table: Array      # int32 [V', K]: each piece's letters (`objective.ctc_char_table`); V' <= V.
  space: int = 0    # The space's label (`objective.ctc_space_label`); 0 when the head writes none.
  candidates: int = 0  # Pieces per hypothesis the head scores; 0: max(2 N, 8) (at most V).
  # bool [V']: the pieces the head can spell whole (`objective.ctc_spellable`); the others are
  # never chosen (the head would score them as free), EOS always may be. None: all may be.
  spellable: Array | None = None


def _joint(decoder_logp: Array, ctc_logp: Array, weight: float) -> Array:
  """(1 - weight) decoder_logp + weight ctc_logp, -inf wherever the decoder's is (a rule's ban)."""
  if weight == 0:
    return decoder_logp
  mixed = ctc_logp if weight == 1 else (1 - weight) * decoder_logp + weight * ctc_logp
  return jnp.where(decoder_logp == NEG_INF, NEG_INF, mixed)


def beam_search(model, task, inputs: Array, input_mask: Array | None = None, *, beam_size: int,
                max_length: int, length_penalty: float = 0.6, eos_id: int = EOS_ID,
                no_repeat_ngram: int = 0, bracket_deltas: Array | None = None,
                word_starts: Array | None = None, max_open_run: int = 0,
                return_all: bool = False, ctc: JointCTC | None = None) -> tuple[Array, Array]:
  """Beam search with the incremental cache.

  Each step extends the N alive beams by every token and ranks the candidates by log-probability.
  A candidate ending in EOS among the N best is finished and scored log-probability /
  `gnmt_length_penalty(length, alpha)`, length counting the EOS; the N best candidates not ending
  in EOS (found among the 2N best) stay alive, so there are always N. Decoding stops at
  `max_length`, or once for every example the N finished slots are full and no alive beam can still
  beat the worst of them (tensor2tensor's bound, exact for alpha >= 0: log-probabilities only
  fall as a beam grows). Finished hypotheses rank first; if fewer than N finished, the best alive
  beams, truncated and scored at length T, fill in. With N = 1 and alpha = 0 the result is exactly
  `greedy`'s (with alpha > 0 the single beam may go on past greedy's EOS to a better score).

  The encoder runs once on B examples; the decoding state is tiled to [B * N, ...] and, after each
  step, gathered by the surviving beams' parents with `jax.tree.map`.

  Args:
    model, task, inputs, input_mask, max_length, eos_id: as for `greedy`.
    beam_size: N (static).
    length_penalty: alpha of `gnmt_length_penalty` (0 ranks by plain log-probability).
    no_repeat_ngram: a beam may not repeat an n-gram of this size (its log-probability of such a
      token is -inf, not renormalised: `ban_repeated_ngrams`; 0: off).
    bracket_deltas: int [V] for outputs that are trees: a beam only grows into a well-formed one
      (`keep_brackets_balanced`, -inf likewise; None: off).
    word_starts: bool [V]: and only into one whose leaves are the input's pieces
      (`keep_input_leaves`; None: off), opening at most `max_open_run` brackets in a row (0: no
      limit).
    return_all: return all N hypotheses, best first, instead of the best one.
    ctc: joint CTC/attention decoding with the model's `ctc_head` (`JointCTC`; None: off). The
      ranking and the scores are then the weighted sums, and the candidates of each step are
      each alive beam's `ctc.candidates` best pieces under the decoder (with as many as 2 N, a
      weight of 0 finds what plain beam search finds).
  Returns:
    tokens int32 [B, T] (or [B, N, T] with `return_all`), 0 after EOS, and their scores float32
    [B] (or [B, N]): length-penalised log-probabilities (-inf for an empty slot).
  """
  n = beam_size
  enc, enc_mask, _ = model.encode(task, inputs, input_mask)  # [B, S, D], [B, S] or None
  batch, state = enc.shape[0], model.init_decode_state(task, enc, enc_mask, max_length)
  state = jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), state)  # leaves [B * N, ...]
  joint = ()  # With ctc: the alive beams' decoder log-probabilities [B, N] and prefix states.
  if ctc is not None:
    ctc_log_probs = jax.nn.log_softmax(model.ctc_head(enc).astype(jnp.float32))  # [B, S, L]
    ctc_mask = jnp.ones(enc.shape[:2], bool) if enc_mask is None else enc_mask
    first_only = jnp.tile(jnp.array([0.0] + [NEG_INF] * (n - 1), jnp.float32), (batch, 1))
    joint = (first_only, ctc_prefix.init(ctc_log_probs, ctc_mask, n))
  best_possible_penalty = gnmt_length_penalty(max_length, length_penalty)
  leaves = _leaves(inputs, input_mask, word_starts)
  if leaves is not None:
    leaves = jnp.repeat(leaves, n, axis=0)  # [B * N, S]

  def cond(carry):
    t, _, alive_logp, _, finished_scores, _, _ = carry
    # Best score an alive beam may still reach vs the worst finished one (-inf while a slot is
    # empty), per example.
    best_alive = alive_logp[:, 0] / best_possible_penalty  # [B]
    worst_finished = finished_scores[:, -1]  # [B]
    return (t < max_length) & ~jnp.all(worst_finished >= best_alive)

  def body(carry):
    t, alive_seqs, alive_logp, finished_seqs, finished_scores, state, joint = carry
    prev = jax.lax.dynamic_index_in_dim(alive_seqs, jnp.maximum(t - 1, 0), axis=2,
                                        keepdims=False)  # [B, N]
    logits, new_state = model.decode_step(task, state, prev.reshape(-1), t)  # [B * N, V]
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(_mask_pad(logits.astype(jnp.float32)))  # [B * N, V]
    log_probs = ban_repeated_ngrams(log_probs, alive_seqs.reshape(batch * n, -1), t,
                                    no_repeat_ngram)
    log_probs = _tree_rules(log_probs, alive_seqs.reshape(batch * n, -1), t, eos_id,
                            bracket_deltas, word_starts, leaves, max_open_run)
    if ctc is None:
      scored = alive_logp[..., None] + log_probs.reshape(batch, n, vocab)  # [B, N, V]
    else:  # Each beam's best pieces under the decoder, ranked with the CTC head's prefix score.
      alive_decoder, prefix = joint
      # Ids past the tokenizer's (a model vocabulary larger than it) spell nothing and are banned.
      extra = vocab - ctc.table.shape[0]
      table = jnp.pad(jnp.asarray(ctc.table), ((0, extra), (0, 0)))
      if ctc.spellable is not None:
        spellable = jnp.pad(jnp.asarray(ctc.spellable), (0, extra))
        log_probs = jnp.where(spellable | (jnp.arange(vocab) == eos_id), log_probs, NEG_INF)
      candidates = min(ctc.candidates or max(2 * n, 8), vocab)
      decoder_logp, tokens = jax.lax.top_k(log_probs.reshape(batch, n, vocab), candidates)
      decoder_logp = alive_decoder[..., None] + decoder_logp  # [B, N, P]
      labels, pending = ctc_prefix.candidate_labels(prefix, tokens, table, ctc.space)
      psi, r = ctc_prefix.extend(ctc_log_probs, ctc_mask, prefix, labels)  # [B, N, P]
      psi = jnp.where(tokens == eos_id, ctc_prefix.final_score(prefix)[..., None], psi)
      scored = _joint(decoder_logp, psi, ctc.weight)

    # Top 2N candidates: token and parent beam of each.
    width = scored.shape[-1]
    logp, flat_index = jax.lax.top_k(scored.reshape(batch, n * width), 2 * n)  # [B, 2N]
    parent = flat_index // width  # [B, 2N]
    token = (flat_index % vocab if ctc is None else jnp.take_along_axis(
        tokens.reshape(batch, -1), flat_index, axis=1)).astype(jnp.int32)
    seqs = _gather_beams(alive_seqs, parent)  # [B, 2N, T]
    seqs = jax.lax.dynamic_update_slice_in_dim(seqs, token[..., None], t, axis=2)
    is_eos = token == eos_id  # [B, 2N]
    ends = is_eos & (jnp.arange(2 * n) < n)  # EOS among the N best candidates: finished.

    # The best N that do not end here stay alive; the cache follows their parents.
    alive_logp, alive_index, alive_seqs, alive_parent = _top_k_beams(
        jnp.where(is_eos, NEG_INF, logp), n, seqs, parent)  # [B, N], [B, N, T]
    if ctc is not None:
      chosen = jnp.take_along_axis(flat_index, alive_index, axis=1)  # [B, N] into [N * P]
      # A slot filled by an EOS or a banned candidate (score -inf) stays dead.
      alive_decoder = jnp.where(alive_logp == NEG_INF, NEG_INF, jnp.take_along_axis(
          decoder_logp.reshape(batch, -1), chosen, axis=1))
      joint = (alive_decoder, ctc_prefix.choose(prefix, labels, pending, psi, r, chosen))

    def gather(new, old):
      # A leaf the step passes through (the cross-attention keys of the tiled encoder output) is
      # the same for every beam of an example, so it needs no gather.
      return old if new is old else _gather_flat_beams(new, alive_parent)

    state = jax.tree.map(gather, new_state, state)

    # Those that end here join the finished ones, scored with the length penalty.
    scores = jnp.where(ends, logp / gnmt_length_penalty(t + 1, length_penalty), NEG_INF)
    finished_scores, _, finished_seqs = _top_k_beams(
        jnp.concatenate([finished_scores, scores], axis=1), n,
        jnp.concatenate([finished_seqs, seqs], axis=1))  # [B, N], [B, N, T]
    return t + 1, alive_seqs, alive_logp, finished_seqs, finished_scores, state, joint

  alive_logp = jnp.tile(jnp.array([0.0] + [NEG_INF] * (n - 1), jnp.float32), (batch, 1))  # [B, N]
  empty_seqs = jnp.zeros((batch, n, max_length), jnp.int32)  # [B, N, T]
  empty_scores = jnp.full((batch, n), NEG_INF, jnp.float32)
  carry = (jnp.int32(0), empty_seqs, alive_logp, empty_seqs, empty_scores, state, joint)
  _, alive_seqs, alive_logp, finished_seqs, finished_scores, _, _ = jax.lax.while_loop(
      cond, body, carry)

  # Finished hypotheses first (by score), then alive ones truncated at T (by score).
  alive_scores = alive_logp / best_possible_penalty  # [B, N]
  seqs = jnp.concatenate([finished_seqs, alive_seqs], axis=1)  # [B, 2N, T]
  scores = jnp.concatenate([finished_scores, alive_scores], axis=1)  # [B, 2N]
  is_finished = jnp.concatenate([finished_scores > NEG_INF, jnp.zeros_like(alive_scores, bool)],
                                axis=1)
  order = jnp.lexsort((-scores, (~is_finished).astype(jnp.int32)), axis=1)[:, :n]  # [B, N]
  seqs, scores = _gather_beams(seqs, order), _gather_beams(scores, order)
  if return_all:
    return seqs, scores
  return seqs[:, 0], scores[:, 0]


METHODS = ("greedy", "beam", "full_rerun")


def check_decoding(method: str, no_repeat_ngram: int = 0, ctc: JointCTC | None = None) -> None:
  """Raises ValueError naming a decoding setting that `decode_with` cannot run."""
  if method not in METHODS:
    raise ValueError(f"Unknown decoding method {method!r}; valid methods: {METHODS}")
  if no_repeat_ngram < 0:
    raise ValueError(f"no_repeat_ngram must be >= 0 (0: off), got {no_repeat_ngram}")
  if ctc is not None and not 0.0 <= ctc.weight <= 1.0:
    raise ValueError(f"the CTC weight of joint decoding must be in [0, 1], got {ctc.weight}")
  if ctc is not None and method == "full_rerun":
    raise ValueError("joint CTC decoding runs with method 'greedy' or 'beam', not 'full_rerun'")


def decode_with(model, task, inputs: Array, input_mask: Array | None = None, *, max_length: int,
                method: str = "greedy", beam_size: int = 4, length_penalty: float = 0.6,
                eos_id: int = EOS_ID, no_repeat_ngram: int = 0,
                bracket_deltas: Array | None = None, word_starts: Array | None = None,
                max_open_run: int = 0, ctc: JointCTC | None = None) -> Array:
  """Decodes `inputs` with `model` by `method`: tokens int32 [B, T]. Traceable (the body of
  `make_decoder`'s program and of an exported task's); the arguments are `make_decoder`'s."""
  check_decoding(method, no_repeat_ngram, ctc)
  if method == "beam" or ctc is not None:
    beam = method == "beam"
    return beam_search(model, task, inputs, input_mask, beam_size=beam_size if beam else 1,
                       max_length=max_length, length_penalty=length_penalty if beam else 0.0,
                       eos_id=eos_id, no_repeat_ngram=no_repeat_ngram,
                       bracket_deltas=bracket_deltas, word_starts=word_starts,
                       max_open_run=max_open_run, ctc=ctc)[0]
  fn = greedy if method == "greedy" else full_rerun_greedy
  return fn(model, task, inputs, input_mask, max_length=max_length, eos_id=eos_id,
            no_repeat_ngram=no_repeat_ngram, bracket_deltas=bracket_deltas,
            word_starts=word_starts, max_open_run=max_open_run)


def make_decoder(graphdef: nnx.GraphDef, task, *, max_length: int, method: str = "greedy",
                 beam_size: int = 4, length_penalty: float = 0.6, eos_id: int = EOS_ID,
                 no_repeat_ngram: int = 0, bracket_deltas: Array | None = None,
                 word_starts: Array | None = None, max_open_run: int = 0,
                 ctc: JointCTC | None = None) -> Callable[..., Array]:
  """A jitted pure decoder `fn(state, inputs, input_mask=None) -> tokens int32 [B, T]`.

  Args:
    graphdef: from `graphdef, state = nnx.split(model, ...)`; `fn` merges it with `state`.
    task: the `TaskSpec` (static: one program per task and input shape).
    max_length: T.
    method: "greedy", "beam" (the best of `beam_size` beams) or "full_rerun" (the reference).
    beam_size, length_penalty: of "beam".
    eos_id: end-of-sequence id.
    no_repeat_ngram: n of `ban_repeated_ngrams` (0: off).
    bracket_deltas: int [V] of `keep_brackets_balanced` for a task whose outputs are trees
      (`Tokenizer.bracket_deltas`; None: off).
    word_starts: bool [V] of `keep_input_leaves` for trees whose leaves are the input's pieces
      (`Tokenizer.word_starts`; None: off).
    max_open_run: with `word_starts`, the most brackets opened in a row (0: no limit).
    ctc: joint CTC/attention decoding (`JointCTC`; None: off). "greedy" is then a joint search
      of one beam without length penalty (each step's best piece by the weighted sum).
  """
  check_decoding(method, no_repeat_ngram, ctc)

  @jax.jit
  def decode(state, inputs: Array, input_mask: Array | None = None) -> Array:
    return decode_with(nnx.merge(graphdef, state), task, inputs, input_mask,
                       max_length=max_length, method=method, beam_size=beam_size,
                       length_penalty=length_penalty, eos_id=eos_id,
                       no_repeat_ngram=no_repeat_ngram, bracket_deltas=bracket_deltas,
                       word_starts=word_starts, max_open_run=max_open_run, ctc=ctc)

  return decode


def ctc_best_path(labels, mask, alphabet: str) -> str:
  """The text of a CTC head's best path: its best label per real frame (`labels` int [S] with
  `mask` bool [S]), repeats merged, blanks (0) dropped, label i + 1 read as `alphabet[i]`; spaces
  trimmed and single."""
  out, previous = [], 0
  for label in [int(x) for x, real in zip(labels, mask) if real]:
    if label != previous and label != 0:
      out.append(alphabet[label - 1])
    previous = label
  return " ".join("".join(out).split()) if " " in alphabet else "".join(out)
