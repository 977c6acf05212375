"""CTC prefix scores (joint CTC/attention decoding) against their definitions.

Shapes: B batch, N hypotheses, P candidates, S frames, L labels (0 is the blank).
"""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from data import pipeline
from data.buckets import InputConfig
from multimodel import ctc_prefix, decode, evaluate, evaluation, export, objective, trainer
from multimodel import checkpoint
from multimodel.model import MultiModel, ctc_alphabet
from tests.test_ctc_rescoring import _run
from tests.test_decode import TableModel, finished_scores, random_table, strip
from tests.test_train import small_config

L = 4


def random_log_probs(rng, batch, frames, labels=L):
  return jax.nn.log_softmax(jnp.asarray(rng.normal(size=(batch, frames, labels)) * 2, jnp.float32))


def collapse(path):
  out, previous = [], 0
  for label in path:
    if label != previous and label != 0:
      out.append(label)
    previous = label
  return tuple(out)


def brute_force(log_probs, frames):
  """{label sequence: log P_CTC(sequence | x)} over every path of `frames` frames."""
  log_probs = np.asarray(log_probs, np.float64)
  out = {}
  for path in itertools.product(range(log_probs.shape[-1]), repeat=frames):
    seq = collapse(path)
    logp = sum(log_probs[t, label] for t, label in enumerate(path))
    out[seq] = np.logaddexp(out.get(seq, -np.inf), logp)
  return out


def prefix_log_prob(sequences, prefix):
  return np.logaddexp.reduce([v for k, v in sequences.items() if k[:len(prefix)] == prefix]
                             or [-np.inf])


def grow(log_probs, mask, pieces):
  """The state of the prefix spelled by `pieces` (each a tuple of labels), one `extend` each,
  for one hypothesis per example; also psi after each piece."""
  batch = log_probs.shape[0]
  state = ctc_prefix.init(log_probs, mask, 1)
  scores = []
  for piece in pieces:
    labels = np.zeros((batch, 1, 1, 3), np.int32)
    labels[..., :len(piece)] = piece
    labels = jnp.asarray(labels)
    score, r = ctc_prefix.extend(log_probs, mask, state, labels)
    state = ctc_prefix.choose(state, labels, jnp.zeros((batch, 1, 1), bool), score, r,
                              jnp.zeros((batch, 1), jnp.int32))
    scores.append(np.asarray(state.score[:, 0]))
  return state, scores


@pytest.mark.parametrize("pieces", [((1,), (2,), (2,), (3,)), ((1, 2), (), (2, 3)),
                                    ((3, 3, 1),), ((2,), (1, 1), (2,))])
def test_prefix_scores_match_brute_force(pieces):
  """psi of each prefix = log of the summed probability of every path that begins with it, and
  the finished score = P_CTC of the sequence; whether letters come one or several per piece."""
  frames = 6
  log_probs = random_log_probs(np.random.default_rng(0), 1, frames)
  mask = jnp.ones((1, frames), bool)
  sequences = brute_force(log_probs[0], frames)
  state, scores = grow(log_probs, mask, pieces)
  prefix = ()
  for piece, score in zip(pieces, scores):
    prefix += piece
    np.testing.assert_allclose(score[0], prefix_log_prob(sequences, prefix), rtol=1e-4)
  np.testing.assert_allclose(float(ctc_prefix.final_score(state)[0, 0]),
                             sequences.get(prefix, -np.inf), rtol=1e-4)


def test_finished_score_equals_optax_ctc_with_padded_frames():
  """With frames past each example's end, the finished score is optax's CTC log-likelihood."""
  rng = np.random.default_rng(1)
  frames, target = 12, (1, 3, 3, 2, 1)
  log_probs = random_log_probs(rng, 2, frames)
  mask = jnp.arange(frames)[None] < jnp.array([[12], [9]])
  state, _ = grow(log_probs, mask, [(t,) for t in target])
  labels = jnp.tile(jnp.asarray(target, jnp.int32), (2, 1))
  expected = -optax.ctc_loss(log_probs, 1.0 - mask.astype(jnp.float32), labels,
                             jnp.zeros(labels.shape), blank_id=0)
  np.testing.assert_allclose(np.asarray(ctc_prefix.final_score(state)[:, 0]),
                             np.asarray(expected), rtol=1e-4)


def test_prefix_scores_only_fall_as_the_prefix_grows():
  log_probs = random_log_probs(np.random.default_rng(2), 3, 10)
  state, scores = grow(log_probs, jnp.ones((3, 10), bool), [(1, 2), (3,), (3,), (1, 1)])
  assert np.all(np.diff(np.stack(scores), axis=0) <= 1e-5)
  assert np.all(np.asarray(ctc_prefix.final_score(state)[:, 0]) <= scores[-1] + 1e-5)


def test_candidate_labels_put_spaces_only_between_letters():
  """Pieces spell letters (1-3) and a space (4) at a word start, as `ctc_char_labels` reads them:
  no space first, none twice, a lone word-start mark makes the next letter begin a word."""
  space = 4
  table = jnp.asarray([[0, 0], [0, 0], [4, 1], [2, 3], [4, 0], [0, 0]], jnp.int32)  # [V, K]
  state = ctc_prefix.init(jnp.zeros((1, 3, 5)), jnp.ones((1, 3), bool), 1)
  tokens = jnp.asarray([[[2, 3, 4, 5]]], jnp.int32)  # "_a", "bc", "_", a digit
  labels, pending = ctc_prefix.candidate_labels(state, tokens, table, space)
  assert labels[0, 0].tolist() == [[1, 0, 0], [2, 3, 0], [0, 0, 0], [0, 0, 0]]
  assert pending[0, 0].tolist() == [False, False, True, False]
  after_letter = state._replace(last=jnp.asarray([[3]]))
  labels, _ = ctc_prefix.candidate_labels(after_letter, tokens, table, space)
  assert labels[0, 0].tolist() == [[4, 1, 0], [2, 3, 0], [0, 0, 0], [0, 0, 0]]
  waiting = after_letter._replace(pending=jnp.asarray([[True]]))
  labels, pending = ctc_prefix.candidate_labels(waiting, tokens, table, space)
  assert labels[0, 0].tolist() == [[4, 1, 0], [4, 2, 3], [0, 0, 0], [0, 0, 0]]
  assert pending[0, 0].tolist() == [False, False, True, True]


# Beam search steered by a CTC head, on a stand-in network.

class TableModelWithCTC(TableModel):
  """`TableModel` (next-token logits by example and prefix) with a CTC head whose per-frame
  logits are `ctc_logits[example]` [S, L]."""

  def __init__(self, table, ctc_logits):
    super().__init__(table)
    self.ctc_logits = jnp.asarray(ctc_logits, jnp.float32)  # [examples, S, L]

  def encode(self, task, inputs, input_mask=None):
    del task, input_mask
    frames = self.ctc_logits.shape[1]
    return jnp.broadcast_to(inputs[:, None, None].astype(jnp.float32),
                            (inputs.shape[0], frames, 1)), None, {}

  def ctc_head(self, enc):
    return self.ctc_logits[enc[:, 0, 0].astype(jnp.int32)]


# Pieces 2-5 spell labels: "a" (1), "b" (2), "ab" (1 2), "ba" (2 1); 0 and 1 (EOS) nothing.
SPELLING = np.array([[0, 0], [0, 0], [1, 0], [2, 0], [1, 2], [2, 1]], np.int32)


def spelled(tokens):
  return tuple(int(x) for t in strip(tokens) for x in SPELLING[t] if x)


def test_joint_search_of_weight_zero_is_plain_beam_search():
  rng = np.random.default_rng(3)
  table = random_table(rng, 3, vocab=6, length=4)
  model = TableModelWithCTC(table, rng.normal(size=(3, 5, 3)))
  kwargs = dict(beam_size=3, max_length=4, length_penalty=0.6, return_all=True)
  plain = decode.beam_search(model, None, jnp.arange(3), **kwargs)
  joint = decode.beam_search(model, None, jnp.arange(3), **kwargs,
                             ctc=decode.JointCTC(0.0, jnp.asarray(SPELLING), candidates=6))
  np.testing.assert_array_equal(np.asarray(joint[0]), np.asarray(plain[0]))
  np.testing.assert_allclose(np.asarray(joint[1]), np.asarray(plain[1]), rtol=1e-6)


@pytest.mark.parametrize("weight", [0.3, 0.7, 1.0])
def test_exhaustive_joint_search_equals_brute_force(weight):
  """A beam as wide as every candidate finds every finished sequence, ranked by
  ((1 - w) log P_decoder + w log P_CTC(its letters)) / length penalty."""
  vocab, length, alpha, frames = 6, 3, 0.6, 5
  rng = np.random.default_rng(4)
  table = random_table(rng, 2, vocab, length)
  ctc_logits = rng.normal(size=(2, frames, 3)) * 2
  model = TableModelWithCTC(table, ctc_logits)
  tokens, scores = jax.jit(lambda x: decode.beam_search(
      model, None, x, beam_size=80, max_length=length, length_penalty=alpha, return_all=True,
      ctc=decode.JointCTC(weight, jnp.asarray(SPELLING), candidates=vocab)))(jnp.arange(2))
  for example in range(2):
    sequences = brute_force(jax.nn.log_softmax(jnp.asarray(ctc_logits[example])), frames)
    decoder = finished_scores(table, example, length, 0.0)  # Plain log-probabilities.
    brute = {}
    for seq, logp in decoder.items():
      ctc_logp = sequences.get(spelled(seq), -np.inf)
      if np.isfinite(ctc_logp):
        brute[seq] = ((1 - weight) * logp + weight * ctc_logp) / ((5.0 + len(seq)) / 6) ** alpha
    ranked = sorted(brute.items(), key=lambda kv: -kv[1])
    found = [strip(t) for t in np.asarray(tokens[example, :len(ranked)])]
    np.testing.assert_allclose(np.asarray(scores[example, :len(ranked)]),
                               [s for _, s in ranked], rtol=1e-4)
    assert found == [seq for seq, _ in ranked]


def test_ctc_head_steers_a_decoder_that_knows_nothing():
  """A decoder with flat next-token scores follows what the head reads ("a a b"), with a beam and
  as a joint search of one beam (make_decoder's "greedy")."""
  frames = 6
  path = [1, 0, 1, 2, 0, 0]  # a, blank, a, b, blank, blank
  ctc_logits = np.full((1, frames, 3), -3.0)
  ctc_logits[0, np.arange(frames), path] = 3.0
  model = TableModelWithCTC(np.zeros((1, 7 ** 5, 6)), ctc_logits)
  joint = decode.JointCTC(0.5, jnp.asarray(SPELLING))
  tokens, _ = decode.beam_search(model, None, jnp.zeros((1,), jnp.int32), beam_size=4,
                                 max_length=5, ctc=joint)
  assert spelled(np.asarray(tokens[0])) == (1, 1, 2)
  greedy = decode.beam_search(model, None, jnp.zeros((1,), jnp.int32), beam_size=1,
                              max_length=5, length_penalty=0.0, ctc=joint)[0]
  assert spelled(np.asarray(greedy[0])) == (1, 1, 2)


# On a tiny trained run of the real network (speech_en, CTC head over letters and spaces).

@pytest.fixture(scope="module")
def speech_run(tmp_path_factory):
  with pytest.MonkeyPatch.context() as monkeypatch:
    workdir = _run(tmp_path_factory.mktemp("speech"), monkeypatch, eval_max_examples=4,
                   train=dict(eval_ctc_weight=0.5), ctc_weight=0.3,
                   ctc_units="chars_and_spaces")
    yield workdir, monkeypatch


def test_the_run_decodes_speech_jointly_and_says_so(speech_run):
  workdir, _ = speech_run
  final = json.loads((workdir / "eval" / "speech_en-test.json").read_text())
  assert final["ctc_weight"] == 0.5 and final["examples"] == 4
  assert all(isinstance(d["prediction"], str) for d in final["decoded"])
  report, _ = evaluate.evaluate(workdir, "speech_en", max_examples=4, ctc_weight=0.0)
  assert report["ctc_weight"] == 0.0 and report["examples"] == 4


def test_joint_search_of_weight_zero_is_beam_search_on_the_network(speech_run):
  workdir, _ = speech_run
  run, task, tokenizer, graphdef, params = evaluate.load_for_task(workdir, "speech_en")
  spec = evaluation.task_spec(task)
  batch = next(iter(pipeline.eval_batches(task, tokenizer, InputConfig.from_config(run.config),
                                          split="test", max_examples=4)))
  table = jnp.asarray(objective.ctc_char_table(tokenizer,
                                               alphabet=ctc_alphabet("chars_and_spaces")))
  space = objective.ctc_space_label("chars_and_spaces")

  @functools.partial(jax.jit, static_argnums=3)
  def search(params, inputs, mask, weight):
    model = nnx.merge(graphdef, params)
    joint = None if weight is None else decode.JointCTC(weight, table, space, candidates=6)
    return decode.beam_search(model, spec, inputs, mask, beam_size=3, max_length=12,
                              return_all=True, ctc=joint)

  plain = search(params, batch["inputs"], batch.get("input_mask"), None)
  joint = search(params, batch["inputs"], batch.get("input_mask"), 0.0)
  np.testing.assert_array_equal(np.asarray(joint[0]), np.asarray(plain[0]))
  np.testing.assert_allclose(np.asarray(joint[1]), np.asarray(plain[1]), rtol=1e-5)
  steered = search(params, batch["inputs"], batch.get("input_mask"), 0.7)
  real = np.asarray(batch["example_index"]) >= 0
  assert real.any() and np.isfinite(np.asarray(steered[1])[real, 0]).all()


def test_the_exported_speech_program_decodes_jointly(speech_run, tmp_path):
  """The export of a run whose evaluation decodes speech jointly with its CTC head (weight 0.5)
  holds that search, weight and letter tables included: its program gives the evaluation's
  decoder's tokens, for the trained and for random weights, which the decoder alone does not
  always give; --ctc_weight 0 exports the decoder alone."""
  workdir, _ = speech_run
  length = 12
  joint_out = export.export(workdir, tmp_path / "joint", max_decode_length=length)
  plain_out = export.export(workdir, tmp_path / "plain", max_decode_length=length, ctc_weight=0.0)
  assert json.loads((joint_out / "tasks.json").read_text())["speech_en"]["ctc_weight"] == 0.5
  assert json.loads((plain_out / "tasks.json").read_text())["speech_en"]["ctc_weight"] == 0.0
  with pytest.raises(ValueError, match=r"ctc_weight must be in \[0, 1\], got 1.5"):
    export.export(workdir, tmp_path / "bad", ctc_weight=1.5)
  assert not (tmp_path / "bad").exists()

  run, task, tokenizer, graphdef, params = evaluate.load_for_task(workdir, "speech_en")
  spec = evaluation.task_spec(task)
  joint = evaluation.joint_ctc(nnx.merge(graphdef, params), task, tokenizer, 0.5)
  decoders = {w: decode.make_decoder(graphdef, spec, max_length=length, ctc=ctc,
                                     no_repeat_ngram=task.no_repeat_ngram)
              for w, ctc in ((0.5, joint), (0.0, None))}
  programs = {w: jax.export.deserialize(bytearray((out / "speech_en.jaxexport").read_bytes()))
              for w, out in ((0.5, joint_out), (0.0, plain_out))}
  with np.load(joint_out / "params.npz", allow_pickle=False) as npz:
    exported = {k: npz[k] for k in npz.files}
  batch = next(iter(pipeline.eval_batches(task, tokenizer, InputConfig.from_config(run.config),
                                          split="test", max_examples=2)))
  frames = batch["inputs"].shape[1]
  inputs = np.zeros((2, task.max_input_length, batch["inputs"].shape[2]), np.float32)
  mask = np.zeros((2, task.max_input_length), bool)  # The program's fixed [B, S] of frames.
  inputs[:, :frames], mask[:, :frames] = batch["inputs"][:2], batch["input_mask"][:2]
  _, random_params = nnx.split(MultiModel(run.config.model, rngs=nnx.Rngs(1)), nnx.Param)
  random_flat = dict(zip(checkpoint.param_keys(random_params), jax.tree.leaves(random_params)))
  differs = []
  for state, flat in ((params, exported),
                      (random_params, {k: random_flat[k] for k in exported})):
    for row in range(2):
      one = (inputs[row:row + 1], mask[row:row + 1])
      got = {w: np.asarray(program.call(flat, *one)["tokens"]) for w, program in programs.items()}
      for w, tokens in got.items():
        want = np.asarray(decoders[w](state, *one))
        np.testing.assert_array_equal(tokens, want)
      differs.append(not np.array_equal(got[0.5], got[0.0]))
  assert any(differs)  # The head changes some output: the program searches with it.


def test_joint_decoding_needs_a_letter_head(tmp_path, monkeypatch):
  workdir = _run(tmp_path, monkeypatch, ctc_weight=0.0)
  with pytest.raises(ValueError, match="needs a CTC head over letters"):
    evaluate.evaluate(workdir, "speech_en", max_examples=2, ctc_weight=0.3)
  config = small_config(steps=2, eval_ctc_weight=0.3)
  with config.unlocked():
    config.model.ctc_weight = 0.0
  with pytest.raises(ValueError,
                     match=r"train.eval_ctc_weight=0.3 .*\(model.ctc_weight > 0, got 0.0"):
    trainer.train_and_evaluate(config, tmp_path / "refused", progress=False)
  assert not (tmp_path / "refused" / "checkpoints").exists()


def test_pieces_the_head_cannot_spell_are_never_chosen():
  """A piece with no letters (punctuation, a digit) leaves the CTC score as it was, so a joint
  search would take it for free: with `spellable` it is never chosen."""
  frames = 6
  path = [1, 0, 1, 2, 0, 0]
  ctc_logits = np.full((1, frames, 3), -3.0)
  ctc_logits[0, np.arange(frames), path] = 3.0
  table = np.zeros((1, 8 ** 5, 7))
  table[..., 6] = 2.0  # The decoder favours piece 6, which spells nothing.
  model = TableModelWithCTC(table, ctc_logits)
  spelling = jnp.asarray(np.concatenate([SPELLING, [[0, 0]]]))
  run = functools.partial(decode.beam_search, model, None, jnp.zeros((1,), jnp.int32),
                          beam_size=2, max_length=6)
  free = run(ctc=decode.JointCTC(0.9, spelling))[0]
  assert 6 in np.asarray(free[0]).tolist()
  spellable = jnp.asarray([False, False, True, True, True, True, False])
  tokens = run(ctc=decode.JointCTC(0.9, spelling, spellable=spellable))[0]
  assert 6 not in np.asarray(tokens[0]).tolist()
  assert tuple(int(x) for t in strip(tokens[0]) for x in spelling[t] if x) == (1, 1, 2)


def test_ctc_spellable():
  class Pieces:
    vocab_size = 5
    pieces = ["<pad>", "</s>", "\u2581the", "'s", "3"]

    def piece(self, i):
      return self.pieces[i].replace("\u2581", " ")

    def is_control_or_byte(self, i):
      return i < 2

  assert objective.ctc_spellable(Pieces()).tolist() == [False, False, True, True, False]
