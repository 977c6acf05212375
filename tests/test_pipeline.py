"""Input pipeline: preprocessing ops, bucket shapes, determinism, exact resume, evaluation."""

import json

import numpy as np
import pytest

from data import buckets as buckets_lib
from data import pipeline
from data import preprocess
from data import tasks
from data import tokenizer as tokenizer_lib
from multimodel.configs import tiny
from tests import tiny_data

CONFIG = pipeline.InputConfig(tokens_per_batch=512, image_batch_size=8)
REAL_TASKS = ("image_mnist5k", "translate_en_fr", "translate_de_en", "speech_en", "parse_en")


@pytest.fixture(name="tok")
def fixture_tok(monkeypatch):
  tiny_data.use(monkeypatch)
  return tokenizer_lib.Tokenizer.load()


def _counter_task(size: int, batch_size: int = 4) -> tuple[tasks.Task, list[dict]]:
  """A label -> label task whose example i has input i: batches show which examples they hold."""
  task = tasks.Task("counter", "none", tasks.Fields("x", "y"), "label", "label", "to_label",
                    ("accuracy",), num_classes=size, batch_size=batch_size)
  return task, [{"x": i, "y": (7 * i) % size} for i in range(size)]


# Preprocessing ops.

def test_image_op_tiles_grayscale_and_normalises():
  gray = np.arange(28 * 28, dtype=np.int64).reshape(28, 28, 1).astype(np.uint8)
  out = preprocess.image(gray, 28)
  assert out.shape == (28, 28, 3) and out.dtype == np.float32
  assert np.array_equal(out[..., 0], out[..., 2])
  assert out.min() >= -1.0 and out.max() <= 1.0
  assert preprocess.image(np.full((2, 2, 3), 255, np.uint8), 2).max() == 1.0


def test_image_op_resizes_and_centre_crops():
  wide = np.zeros((40, 80, 3), np.uint8)
  wide[:, 30:50] = 255  # A bright band in the centre survives the crop.
  out = preprocess.image(wide, 32)
  assert out.shape == (32, 32, 3)
  assert out[:, 16].min() > 0.9 and out[:, 0].max() < -0.9


def test_audio_op_resamples_to_the_feature_rate():
  features = preprocess.AudioFeatures()
  t = np.arange(8000) / 8000.0
  wave8k = (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16)  # 1 s at 8 kHz.
  frames = preprocess.audio(wave8k, 8000, features)
  assert frames.shape == (features.num_frames(16000), features.num_mel_bins)
  assert frames.dtype == np.float32
  t16 = np.arange(16000) / 16000.0
  native = preprocess.audio(0.5 * np.sin(2 * np.pi * 440 * t16), 16000, features)
  assert np.argmax(frames[50]) == np.argmax(native[50])  # Same pitch after resampling.


def test_text_op_appends_eos_to_targets_only(tok):
  ids = preprocess.text(b"In the beginning", tok, eos=False)
  assert ids.dtype == np.int32 and ids.tolist() == tok.encode("In the beginning")
  assert preprocess.text("In the beginning", tok, eos=True).tolist() == ids.tolist() + [1]


# Buckets.

def test_bucket_ladders_and_batch_sizes():
  config = pipeline.InputConfig(tokens_per_batch=2048, batch_multiple=8)
  b = buckets_lib.for_task(tasks.get("translate_en_fr"), config)
  assert b.input_lengths == b.target_lengths == (16, 32, 64, 128)
  assert b.batch_sizes == (128, 64, 32, 16)
  assert (b.rung(3, 20), b.rung(70, 5), b.rung(128, 128), b.rung(129, 1)) == (1, 3, 3, None)
  speech = buckets_lib.for_task(tasks.get("speech_en"), config)
  assert speech.input_lengths == (128, 256, 512, 1024)
  assert speech.batch_sizes == (64, 32, 16, 8)  # 4 frames cost a token.
  parse = buckets_lib.for_task(tasks.get("parse_en"), config)
  assert parse.input_lengths == (16, 16, 32, 64) and parse.target_lengths == (32, 64, 128, 256)
  assert buckets_lib.for_task(tasks.get("image_mnist5k"), config).batch_sizes == (32,)
  small = buckets_lib.for_task(tasks.get("translate_en_fr"),
                               pipeline.InputConfig(tokens_per_batch=100, batch_multiple=8))
  assert small.batch_sizes == (8, 8, 8, 8)  # At least batch_multiple.
  for task in tasks.TASKS.values():
    assert all(s % 8 == 0 for s in buckets_lib.for_task(task, config).batch_sizes)


def test_input_config_reads_the_project_config():
  config = tiny.get_config()
  input_config = pipeline.InputConfig.from_config(config)
  assert input_config.features.num_mel_bins == config.model.audio.num_mel_bins
  assert input_config.features.frame_step == config.model.audio.frame_step
  assert not input_config.single_bucket


def test_single_bucket_keeps_the_longest_rung_and_comes_with_the_all_tasks_step():
  """One batch shape per task, so the all-tasks step compiles one program, not one per combination
  of the tasks' shapes."""
  single = pipeline.InputConfig(tokens_per_batch=2048, batch_multiple=8, single_bucket=True)
  b = buckets_lib.for_task(tasks.get("translate_en_fr"), single)
  assert (b.input_lengths, b.target_lengths, b.batch_sizes) == ((128,), (128,), (16,))
  assert b.rung(3, 20) == 0 and b.rung(129, 1) is None
  parse = buckets_lib.for_task(tasks.get("parse_en"), single)
  assert (parse.input_lengths, parse.target_lengths) == ((64,), (256,))
  config = tiny.get_config()
  config.train.step_mode = "all_tasks"
  assert pipeline.InputConfig.from_config(config).single_bucket


# Training iterator on real embedded data.

@pytest.mark.parametrize("name", REAL_TASKS)
def test_batches_have_exactly_the_bucket_shapes(name, tok):
  task = tasks.get(name)
  it = pipeline.TaskIterator(task, tok, CONFIG, seed=3)
  specs = it.batch_specs()
  for _ in range(4):
    batch = next(it)
    shapes = {k: (v.shape, v.dtype) for k, v in batch.items()}
    assert any(buckets_lib.matches(batch, spec) for spec in specs), shapes
    if task.target_modality == "text":
      lengths = (batch["targets"] != 0).sum(axis=1)
      assert lengths.min() >= 1
      assert np.all(batch["targets"][np.arange(len(lengths)), lengths - 1] == tokenizer_lib.EOS_ID)
    if task.input_modality == "audio":
      mask = batch["input_mask"]
      assert mask[:, 0].all() and np.all(mask[:, :-1] >= mask[:, 1:])  # A prefix of real frames.
      assert np.all(batch["inputs"][~mask] == 0)
    if task.input_modality == "text":
      assert batch["inputs"].min() >= 0 and batch["inputs"].max() < tok.vocab_size
  assert it.skipped == 0


def test_same_seed_same_batches_other_seed_other_batches(tok):
  task = tasks.get("translate_en_fr")
  a, b = (pipeline.TaskIterator(task, tok, CONFIG, seed=1) for _ in range(2))
  c = pipeline.TaskIterator(task, tok, CONFIG, seed=2)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert a.get_state() != c.get_state()


def test_each_epoch_visits_every_example_once():
  task, source = _counter_task(12, batch_size=4)
  it = pipeline.TaskIterator(task, None, CONFIG, seed=0, source=source)
  epochs = [np.concatenate([next(it)["inputs"] for _ in range(3)]) for _ in range(3)]
  for seen in epochs:
    assert sorted(seen.tolist()) == list(range(12))
  assert epochs[0].tolist() != epochs[1].tolist()  # Reshuffled each epoch.
  assert it.get_state()["epoch"] == 3


def test_examples_over_the_caps_are_skipped(tok):
  task = tasks.get("translate_en_fr")
  short = tasks.Task("short", task.source, task.preprocess, "text", "text", "to_fr", ("bleu",),
                     embedded=True, max_input_length=32, max_target_length=32)
  it = pipeline.TaskIterator(short, tok, CONFIG, seed=0)
  for _ in range(3):
    batch = next(it)
    assert batch["inputs"].shape[1] <= 32 and batch["targets"].shape[1] <= 32
  assert it.skipped > 0


@pytest.mark.parametrize("name", ["translate_en_fr", "speech_en", "parse_en"])
def test_resume_from_saved_state_yields_the_same_batches(name, tok):
  task = tasks.get(name)
  first = pipeline.TaskIterator(task, tok, CONFIG, seed=5)
  for _ in range(3):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  assert any(state["buffers"])  # The state carries buffered examples.
  expected = [next(first) for _ in range(4)]
  resumed = pipeline.TaskIterator(task, tok, CONFIG, seed=5)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
  assert resumed.get_state() == first.get_state()


def test_state_of_another_task_is_refused(tok):
  a = pipeline.TaskIterator(tasks.get("translate_en_fr"), tok, CONFIG)
  b = pipeline.TaskIterator(tasks.get("translate_fr_en"), tok, CONFIG)
  with pytest.raises(ValueError, match="does not fit"):
    b.set_state(a.get_state())


# Evaluation passes.

@pytest.mark.parametrize("name", REAL_TASKS)
def test_eval_pass_covers_each_example_once_with_masked_padding(name, tok):
  task = tasks.get(name)
  it = pipeline.TaskIterator(task, tok, CONFIG)
  specs = [buckets_lib.batch_spec(task, it.buckets, r, CONFIG, evaluation=True)
           for r in range(len(it.buckets))]
  batches = list(pipeline.eval_batches(task, tok, CONFIG))
  seen = []
  for batch in batches:
    assert any(buckets_lib.matches(batch, spec) for spec in specs)
    mask = batch["example_mask"]
    seen += batch["example_index"][mask].tolist()
    assert np.all(batch["example_index"][~mask] == -1)
    assert np.all(batch["targets"][~mask] == 0)
  assert sorted(seen) == list(range(tiny_data.EXAMPLES_PER_SPLIT))
  again = list(pipeline.eval_batches(task, tok, CONFIG))
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(batches, again) for k in x)


def test_eval_truncates_instead_of_skipping(tok):
  task = tasks.get("translate_en_fr")
  short = tasks.Task("short", task.source, task.preprocess, "text", "text", "to_fr", ("bleu",),
                     embedded=True, max_input_length=16, max_target_length=16)
  batches = list(pipeline.eval_batches(short, tok, CONFIG, max_examples=10))
  assert sum(int(b["example_mask"].sum()) for b in batches) == 10
  assert all(b["inputs"].shape[1] == 16 for b in batches)
