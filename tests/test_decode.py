"""Decoding: cached greedy vs the full re-run reference, beam search vs greedy and brute force.

Shapes: B batch, S source length, T target length, V vocabulary, N beam size.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from multimodel import decode
from multimodel.configs import common
from multimodel.model import MultiModel, TaskSpec

B, S, T = 2, 6, 8
VOCAB = 32
TEXT_TASK = TaskSpec("text", "text", command_id=1)


def small_config():
  """A tiny model; eval capacity E / K, so the full forward pass never drops a token either."""
  return common.make(model=dict(
      d_model=32, hidden=64, num_heads=4, encoder_blocks=1, mixer_blocks=1, decoder_blocks=1,
      num_experts=4, top_k=2, eval_capacity_factor=2.0, vocab_size=VOCAB, num_labels=8,
      num_commands=4, image=dict(stem_filters=4, res_blocks=1),
      audio=dict(num_mel_bins=8, conv_filters=4))).model


@pytest.fixture(scope="module")
def model():
  return MultiModel(small_config(), modality_names=("text", "image"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def decoders(model):
  """{(input modality, method): jitted decoder (inputs, input_mask) -> [B, T]}, built once."""
  graphdef, state = nnx.split(model)
  cache = {}

  def get(input_modality, method, **kwargs):
    key = (input_modality, method, tuple(sorted(
        (k, v.tobytes() if isinstance(v, np.ndarray) else v) for k, v in kwargs.items())))
    if key not in cache:
      task = TaskSpec(input_modality, "text", command_id=1)
      cache[key] = functools.partial(
          decode.make_decoder(graphdef, task, max_length=T, method=method, **kwargs), state)
    return cache[key]

  return get


def raw_inputs(name, rng):
  if name == "text":
    return jnp.asarray(rng.integers(3, VOCAB, (B, S)), jnp.int32), None
  return jnp.asarray(rng.normal(size=(B, 16, 16, 3)), jnp.float32), None  # image


@functools.partial(nnx.jit, static_argnums=1)
def sequence_log_prob(model, task, inputs, tokens):
  """Teacher-forced log-probability of tokens [..., T] (pad masked as in decoding), [...]."""
  batch_shape = tokens.shape[:-1]
  tokens = tokens.reshape(-1, tokens.shape[-1])  # [B', T]
  inputs = jnp.repeat(inputs, tokens.shape[0] // inputs.shape[0], axis=0)
  logits, _ = model(task, inputs, tokens)  # [B', T, V]
  log_probs = jax.nn.log_softmax(logits.at[..., 0].set(-jnp.inf))
  picked = jnp.take_along_axis(log_probs, jnp.maximum(tokens, 1)[..., None], axis=-1)[..., 0]
  return jnp.where(tokens != 0, picked, 0.0).sum(-1).reshape(batch_shape)


# A stand-in network whose next-token logits are a table lookup on (example, prefix).

class TableModel:
  """Logits of position t = table[example, code of the t tokens before it]; inputs = example ids.

  Its state holds the prefix code (changes every step, so beams must gather it) and the example
  id (passed through unchanged, like cross-attention keys). `steps` counts decode_step runs.
  """

  def __init__(self, table: np.ndarray):
    self.table = jnp.asarray(table, jnp.float32)  # [examples, codes, V]
    self.vocab = table.shape[-1]
    self.steps = 0

  def _count(self):
    self.steps += 1

  def encode(self, task, inputs, input_mask=None):
    del task, input_mask
    return inputs[:, None, None].astype(jnp.float32), None, {}  # [B, 1, 1]

  def init_decode_state(self, task, enc, enc_mask, max_length):
    del task, enc_mask, max_length
    batch = enc.shape[0]
    return {"code": jnp.zeros((batch,), jnp.int32), "example": enc[:, 0, 0].astype(jnp.int32)}

  def decode_step(self, task, state, prev_token, position):
    del task
    jax.debug.callback(self._count)
    code = jnp.where(position == 0, 0, state["code"] * (self.vocab + 1) + prev_token + 1)
    return self.table[state["example"], code], {"code": code, "example": state["example"]}


def prefix_code(prefix, vocab):
  code = 0
  for token in prefix:
    code = code * (vocab + 1) + token + 1
  return code


def random_table(rng, examples, vocab, length, scale=2.0):
  return rng.normal(size=(examples, (vocab + 1) ** length, vocab)) * scale


def log_softmax_no_pad(logits):
  logits = np.array(logits, np.float64)
  logits[0] = -np.inf
  return logits - np.logaddexp.reduce(logits)


def finished_scores(table, example, length, alpha):
  """Brute force: {sequence ending in EOS (1), up to `length` tokens: length-penalised log-prob}."""
  vocab = table.shape[-1]
  out = {}
  for n in range(1, length + 1):
    for body in itertools.product(range(2, vocab), repeat=n - 1):
      seq = body + (1,)
      logp = sum(log_softmax_no_pad(table[example, prefix_code(seq[:i], vocab)])[seq[i]]
                 for i in range(n))
      out[seq] = logp / ((5.0 + n) / 6.0) ** alpha
  return out


def strip(tokens):
  """Tokens up to and including the first EOS (or all), as a tuple."""
  tokens = [int(t) for t in tokens]
  return tuple(tokens[:tokens.index(1) + 1]) if 1 in tokens else tuple(tokens)


# Tests.

@pytest.mark.parametrize("input_modality", ["text", "image"])
def test_cached_greedy_equals_full_rerun(decoders, input_modality):
  inputs, mask = raw_inputs(input_modality, np.random.default_rng(0))
  cached = decoders(input_modality, "greedy")(inputs, mask)
  full = decoders(input_modality, "full_rerun")(inputs, mask)
  assert cached.shape == (B, T) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(full))
  assert np.all(np.asarray(cached)[:, 0] != 0)


def test_beam_of_one_equals_greedy_on_the_network(decoders):
  for seed in range(3):
    inputs, _ = raw_inputs("text", np.random.default_rng(seed))
    beam = decoders("text", "beam", beam_size=1, length_penalty=0.0)(inputs)
    np.testing.assert_array_equal(np.asarray(beam), np.asarray(decoders("text", "greedy")(inputs)))


def test_unknown_method_is_an_error(model):
  with pytest.raises(ValueError, match="greedy"):
    decode.make_decoder(nnx.graphdef(model), TEXT_TASK, max_length=T, method="sample")
  with pytest.raises(ValueError, match="no_repeat_ngram must be >= 0"):
    decode.make_decoder(nnx.graphdef(model), TEXT_TASK, max_length=T, no_repeat_ngram=-1)


def test_beam_search_returns_all_beams_best_first(model):
  inputs, _ = raw_inputs("text", np.random.default_rng(1))
  alpha = 0.6
  tokens, scores = nnx.jit(decode.beam_search, static_argnums=1,
                           static_argnames=("beam_size", "max_length", "return_all"))(
      model, TEXT_TASK, inputs, beam_size=3, max_length=T, length_penalty=alpha, return_all=True)
  assert tokens.shape == (B, 3, T) and scores.shape == (B, 3)
  assert np.all(np.diff(np.asarray(scores), axis=1) <= 0)
  assert len({tuple(t) for t in np.asarray(tokens[0])}) == 3  # distinct hypotheses
  # Each score is the hypothesis' teacher-forced log-probability over the length penalty.
  lengths = np.asarray((tokens != 0).sum(-1))
  want = np.asarray(sequence_log_prob(model, TEXT_TASK, inputs, tokens)) / (
      (5.0 + lengths) / 6.0) ** alpha
  np.testing.assert_allclose(np.asarray(scores), want, rtol=1e-4)


def test_beam_of_one_equals_greedy_with_many_eos():
  table = random_table(np.random.default_rng(2), 6, vocab=4, length=5)
  inputs = jnp.arange(6)
  greedy = jax.jit(lambda x: decode.greedy(TableModel(table), None, x, max_length=5))(inputs)
  tokens, _ = jax.jit(lambda x: decode.beam_search(
      TableModel(table), None, x, beam_size=1, max_length=5, length_penalty=0.0))(inputs)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(greedy))
  assert np.any(np.asarray(greedy) == 1)


def test_beam_beats_greedy_and_finds_the_best():
  """Greedy's first choice (p=0.55) leads nowhere good; the runner-up (0.4) then ends at p=0.9."""
  vocab, length, alpha = 4, 3, 0.6
  table = random_table(np.random.default_rng(3), 1, vocab, length, scale=0.3)
  table[0, prefix_code((), vocab)] = np.log([1e-3, 0.05, 0.55, 0.4])
  table[0, prefix_code((3,), vocab)] = np.log([1e-3, 0.9, 0.05, 0.05])
  inputs = jnp.zeros((1,), jnp.int32)
  greedy = np.asarray(decode.greedy(TableModel(table), None, inputs, max_length=length))[0]
  tokens, score = decode.beam_search(TableModel(table), None, inputs, beam_size=2,
                                     max_length=length, length_penalty=alpha)
  brute = finished_scores(table, 0, length, alpha)
  best = max(brute, key=brute.get)
  assert strip(tokens[0]) == best == (3, 1)
  np.testing.assert_allclose(float(score[0]), brute[best], rtol=1e-5)
  assert strip(greedy)[0] == 2 and brute[strip(greedy)] < brute[best]


def test_exhaustive_beam_equals_brute_force():
  """A beam as wide as every candidate is exhaustive: all finished sequences, in score order."""
  vocab, length, alpha, beams = 4, 3, 0.6, 12
  table = random_table(np.random.default_rng(4), 3, vocab, length)
  tokens, scores = jax.jit(lambda x: decode.beam_search(
      TableModel(table), None, x, beam_size=beams, max_length=length, length_penalty=alpha,
      return_all=True))(jnp.arange(3))
  for example in range(3):
    brute = sorted(finished_scores(table, example, length, alpha).items(), key=lambda kv: -kv[1])
    found = [strip(t) for t in np.asarray(tokens[example, :len(brute)])]
    assert found == [seq for seq, _ in brute]
    np.testing.assert_allclose(np.asarray(scores[example, :len(brute)]),
                               [s for _, s in brute], rtol=1e-5)


def test_decoding_stops_at_eos_and_pads():
  vocab, length = 4, 6
  table = random_table(np.random.default_rng(5), 2, vocab, length, scale=0.1)
  for example, path in enumerate([(2, 3, 1), (1,)]):
    for i, token in enumerate(path):
      table[example, prefix_code(path[:i], vocab), token] = 10.0
  fake = TableModel(table)
  tokens = jax.jit(lambda x: decode.greedy(fake, None, x, max_length=length))(jnp.arange(2))
  want = [[2, 3, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
  np.testing.assert_array_equal(np.asarray(tokens), want)
  assert fake.steps == 3  # The loop ends once both sequences have ended.
  tokens, _ = decode.beam_search(fake, None, jnp.arange(2), beam_size=2, max_length=length)
  np.testing.assert_array_equal(np.asarray(tokens), want)
  # Without an end-of-sequence id every position is decoded.
  fake.steps = 0
  tokens = jax.jit(lambda x: decode.greedy(fake, None, x, max_length=length, eos_id=-1))(
      jnp.arange(2))
  assert fake.steps == length and np.all(np.asarray(tokens) != 0)


def has_repeated_ngram(seq, n: int) -> bool:
  """Whether the tokens before the first pad repeat an n-gram."""
  seq = list(seq)
  seq = seq[:seq.index(0)] if 0 in seq else seq
  grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
  return len(grams) != len(set(grams))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ban_repeated_ngrams_matches_the_definition(n):
  """Token w is banned at t exactly when tokens[t-n+1:t] + [w] occurs in tokens[:t]."""
  rng = np.random.default_rng(n)
  tokens = rng.integers(1, 4, (5, T))  # Few distinct ids: many repeats.
  scores = jnp.zeros((5, 6))
  for t in range(T + 1):
    banned = np.isneginf(np.asarray(decode.ban_repeated_ngrams(scores, jnp.asarray(tokens),
                                                                jnp.int32(t), n)))
    for b in range(5):
      seen = {tuple(tokens[b, i:i + n]) for i in range(t - n + 1)}
      prefix = tuple(tokens[b, t - n + 1:t]) if t >= n - 1 else None
      want = [prefix is not None and prefix + (w,) in seen for w in range(6)]
      assert banned[b].tolist() == want, (t, b)
  np.testing.assert_array_equal(decode.ban_repeated_ngrams(scores, jnp.asarray(tokens), 5, 0),
                                scores)


@pytest.mark.parametrize("n", [1, 2])
def test_decoders_never_repeat_a_banned_ngram(decoders, model, n):
  """Greedy (cached and full re-run) and every beam decode all T positions without repeating."""
  inputs, mask = raw_inputs("text", np.random.default_rng(4))
  plain = np.asarray(decoders("text", "greedy", eos_id=-1)(inputs, mask))
  cached = np.asarray(decoders("text", "greedy", eos_id=-1, no_repeat_ngram=n)(inputs, mask))
  rerun = np.asarray(decoders("text", "full_rerun", eos_id=-1, no_repeat_ngram=n)(inputs, mask))
  np.testing.assert_array_equal(cached, rerun)
  assert (cached != 0).all() and not any(has_repeated_ngram(s, n) for s in cached)
  if any(has_repeated_ngram(s, n) for s in plain):  # The ban changed something it had to.
    assert not np.array_equal(plain, cached)
  beams, _ = nnx.jit(functools.partial(
      decode.beam_search, task=TEXT_TASK, beam_size=3, max_length=T, eos_id=-1,
      no_repeat_ngram=n, return_all=True))(model, inputs=inputs)
  assert not any(has_repeated_ngram(s, n) for s in np.asarray(beams).reshape(-1, T))


# A toy bracket table over the small model's vocabulary: ids 3-6 open a bracket ("(NP"), 7 closes
# one (")"), 8 closes two ("))"), the rest are words; pad (0) and EOS (1) are neither.
TREE_DELTAS = np.zeros(VOCAB, np.int32)
TREE_DELTAS[3:7], TREE_DELTAS[7], TREE_DELTAS[8] = 1, -1, -2


def tree_prefix_ok(seq, eos_id=1, deltas=TREE_DELTAS):
  """True when `seq` (ids, 0 after EOS) is a prefix of a well-formed tree, or one with its EOS
  (`deltas`: the bracket table, as `keep_brackets_balanced` takes it)."""
  depth = 0
  for t, token in enumerate(seq):
    if token == 0:
      return all(x == 0 for x in seq[t:])
    if token == eos_id:
      return depth == 0 and t > 0 and all(x == 0 for x in seq[t + 1:])
    if (t == 0 and deltas[token] <= 0) or (t > 0 and depth == 0):
      return False  # Not opening the tree, or going on after its root closed.
    depth += deltas[token]
    if depth < 0:
      return False
  return True


def test_keep_brackets_balanced_matches_the_grammar():
  """Token w is allowed at t exactly when the prefix plus w can still be (or end) a tree."""
  rng = np.random.default_rng(0)
  prefixes = [[]]
  while len(prefixes) < 300:  # Random valid prefixes, of every length up to T - 1.
    seq = list(prefixes[rng.integers(len(prefixes))])
    if len(seq) < T - 1:
      seq.append(int(rng.integers(2, 10)))
      if tree_prefix_ok(seq):
        prefixes.append(seq)
  for seq in prefixes:
    t = len(seq)
    tokens = jnp.asarray([seq + [0] * (T - t)], jnp.int32)
    kept = np.isfinite(np.asarray(decode.keep_brackets_balanced(
        jnp.zeros((1, VOCAB)), tokens, jnp.int32(t), TREE_DELTAS)))[0]
    want = [w != 0 and tree_prefix_ok(seq + [w]) for w in range(VOCAB)]
    want[0] = kept[0]  # The pad id is `_mask_pad`'s business, not the grammar's.
    assert kept.tolist() == want, seq
  scores = jnp.ones((1, VOCAB))
  np.testing.assert_array_equal(
      decode.keep_brackets_balanced(scores, jnp.zeros((1, T), jnp.int32), 0, None), scores)


def test_decoders_only_write_well_formed_trees(decoders, model):
  """With the table, greedy (cached and re-run) and every beam only ever write tree prefixes."""
  inputs, mask = raw_inputs("text", np.random.default_rng(6))
  plain = np.asarray(decoders("text", "greedy")(inputs, mask))
  cached = np.asarray(decoders("text", "greedy", bracket_deltas=TREE_DELTAS)(inputs, mask))
  rerun = np.asarray(decoders("text", "full_rerun", bracket_deltas=TREE_DELTAS)(inputs, mask))
  np.testing.assert_array_equal(cached, rerun)
  assert all(tree_prefix_ok(s.tolist()) for s in cached)
  assert not all(tree_prefix_ok(s.tolist()) for s in plain)  # The rule had work to do.
  beams, _ = nnx.jit(functools.partial(
      decode.beam_search, task=TEXT_TASK, beam_size=3, max_length=T,
      bracket_deltas=TREE_DELTAS, return_all=True))(model, inputs=inputs)
  assert all(tree_prefix_ok(s) for s in np.asarray(beams).reshape(-1, T).tolist())


# Words of the toy vocabulary for trees over their input: ids 9-31 are leaves; ids 12, 13 and
# 20-24 continue a word (a bracket may not go before them), the rest begin one.
WORD_STARTS = np.ones(VOCAB, bool)
WORD_STARTS[[0, 1, 12, 13, 20, 21, 22, 23, 24]] = False


def leaf_tree_prefix_ok(seq, leaves, max_open_run=0, word_starts=WORD_STARTS):
  """True when `seq` is a tree prefix (`tree_prefix_ok`) whose leaves are a prefix of `leaves`, with
  no bracket inside a word, no empty bracket, no bracket opened once every leaf is written, the
  outermost closed only after the last leaf, and at most `max_open_run` brackets opened in a row
  (0: any number): `keep_input_leaves` by its definition."""
  if not tree_prefix_ok(seq):
    return False
  seq = [x for x in seq if x != 0]
  written, depth, run = 0, 0, 0
  for t, token in enumerate(seq):
    delta = TREE_DELTAS[token]
    if token == 1:
      return written == len(leaves)
    if delta == 0:  # A leaf: the next of the input's.
      if written == len(leaves) or token != leaves[written]:
        return False
      written, run = written + 1, 0
      continue
    if 0 < written < len(leaves) and not word_starts[leaves[written]]:
      return False  # Inside a word.
    if delta > 0:
      run += 1
      if written == len(leaves) or (max_open_run and run > max_open_run):
        return False
    else:
      run = 0
      if TREE_DELTAS[seq[t - 1]] > 0:
        return False  # Empty.
      if depth + delta == 0 and written < len(leaves):
        return False  # The root closes before the last leaf.
    depth += delta
  return True


@pytest.mark.parametrize("max_open_run", [0, 2])
def test_keep_input_leaves_matches_its_definition(max_open_run):
  """Token w is allowed at t exactly when the prefix plus w is still a tree over the input."""
  rng = np.random.default_rng(1)
  leaves = [9, 12, 10, 20, 21, 11]  # Three words: 9 12 | 10 20 21 | 11.
  row = jnp.asarray([leaves + [0, 0]], jnp.int32)  # [1, S], 0-padded
  prefixes, seen = [[]], set()
  while len(prefixes) < 300:  # Random walks through the definition's valid prefixes.
    seq = list(prefixes[rng.integers(len(prefixes))])
    valid = [w for w in range(1, VOCAB) if leaf_tree_prefix_ok(seq + [w], leaves, max_open_run)]
    if len(seq) < 2 * T - 1 and valid:
      seq.append(int(rng.choice(valid)))
      if tuple(seq) not in seen:
        seen.add(tuple(seq))
        prefixes.append(seq)
  for seq in prefixes:
    if seq[-1:] == [1]:
      continue  # Nothing follows an EOS.
    t = len(seq)
    tokens = jnp.asarray([seq + [0] * (2 * T - t)], jnp.int32)
    scores = decode.keep_brackets_balanced(jnp.zeros((1, VOCAB)), tokens, jnp.int32(t),
                                           TREE_DELTAS)
    kept = np.isfinite(np.asarray(decode.keep_input_leaves(
        scores, tokens, jnp.int32(t), TREE_DELTAS, WORD_STARTS, row,
        max_open_run=max_open_run)))[0]
    want = [w != 0 and leaf_tree_prefix_ok(seq + [w], leaves, max_open_run)
            for w in range(VOCAB)]
    want[0] = kept[0]
    assert kept.tolist() == want, seq
    assert kept[1:].any(), seq  # Never a dead end.
  assert any(seq[-1:] == [1] for seq in prefixes)  # Whole trees were among them.
  # An empty input changes nothing.
  tokens = jnp.asarray([[3, 9] + [0] * (2 * T - 2)], jnp.int32)
  scores = jnp.ones((1, VOCAB))
  np.testing.assert_array_equal(decode.keep_input_leaves(
      scores, tokens, 2, TREE_DELTAS, WORD_STARTS, jnp.zeros((1, S), jnp.int32)), scores)


def test_decoders_write_trees_over_their_input(decoders, model):
  """With the word table too, greedy (cached and re-run) and every beam only write prefixes of
  trees whose leaves are the input's pieces (T = 8 positions hold few whole trees)."""
  rng = np.random.default_rng(7)
  inputs = np.zeros((B, S), np.int32)
  inputs[0, :2], inputs[1, :3] = [9, 10], [11, 12, 14]  # One and two words, then two.
  mask = jnp.asarray(inputs != 0)
  inputs = jnp.asarray(np.where(inputs != 0, inputs, rng.integers(3, VOCAB, (B, S))), jnp.int32)
  rules = dict(bracket_deltas=TREE_DELTAS, word_starts=WORD_STARTS, max_open_run=2)
  cached = np.asarray(decoders("text", "greedy", **rules)(inputs, mask))
  rerun = np.asarray(decoders("text", "full_rerun", **rules)(inputs, mask))
  np.testing.assert_array_equal(cached, rerun)
  leaves = [[9, 10], [11, 12, 14]]
  for seq, row in zip(cached.tolist(), leaves):
    assert leaf_tree_prefix_ok(seq, row, max_open_run=2), seq
  balanced = np.asarray(decoders("text", "greedy", bracket_deltas=TREE_DELTAS)(inputs, mask))
  assert not all(leaf_tree_prefix_ok(s, r) for s, r in zip(balanced.tolist(), leaves))
  beams, _ = nnx.jit(functools.partial(
      decode.beam_search, task=TEXT_TASK, beam_size=3, max_length=T, return_all=True,
      **rules))(model, inputs=inputs, input_mask=mask)
  for hypotheses, row in zip(np.asarray(beams).tolist(), leaves):
    assert all(leaf_tree_prefix_ok(s, row, max_open_run=2) for s in hypotheses)
  with pytest.raises(ValueError, match="word_starts needs text inputs"):
    decode.greedy(model, TaskSpec("image", "text", command_id=1), jnp.zeros((B, 16, 16, 3)),
                  max_length=T, bracket_deltas=TREE_DELTAS, word_starts=WORD_STARTS)
