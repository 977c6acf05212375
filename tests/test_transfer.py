"""Fine-tuning on a new task from a jointly trained checkpoint: frozen parameters, L2-SP, a limited
number of training examples, and the transfer experiment end to end (all on real embedded data)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from data import pipeline, tasks as tasks_lib
from data.buckets import InputConfig
from data.mixture import Mixture
from multimodel import checkpoint, optim, trainer, writer
from multimodel.configs import tiny
from multimodel.model import MultiModel
from tests import tiny_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
BODY = "encoder/.*,mixer/.*,decoder/.*"
TARGET = "image_mnist5k"  # The task the source run never sees.


def small_config(tasks: str, **train):
  """A model of width 32; the target runs use a wider image stem than the source (new params)."""
  config = tiny.get_config()
  with config.unlocked():
    config.model.update(d_model=32, hidden=64, num_heads=2, num_experts=4)
    config.model.image.stem_filters = 8
    config.data.update(tasks=tasks, text_buckets=(64,), tokens_per_batch=256, image_batch_size=16)
    config.train.update(dict(eval_max_examples=-1, plot=False, log_every=1, checkpoint_every=0,
                             warmup_steps=2, learning_rate=1.0), **train)
  return config


def target_config(cache, **train):
  config = small_config(TARGET, steps=4, compilation_cache=str(cache), **train)
  with config.unlocked():
    config.model.image.stem_filters = 16  # This modality net's stem is new: not in the source.
    config.data.train_examples = 8
  return config


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache):
  """A short run on translation only: the checkpoint the target runs start from."""
  workdir = tmp_path_factory.mktemp("source")
  with pytest.MonkeyPatch.context() as mp:
    tiny_data.use(mp)
    trainer.train_and_evaluate(small_config("translate_en_fr", steps=2,
                                            compilation_cache=str(cache)),
                               workdir, progress=False)
  return workdir


def fine_tune(source, cache, workdir, **train):
  with pytest.MonkeyPatch.context() as mp:
    tiny_data.use(mp)
    trainer.train_and_evaluate(target_config(cache, **train), workdir, init=str(source),
                               progress=False)
  return workdir


@pytest.fixture(scope="module")
def plain(source, cache, tmp_path_factory):
  """Fine-tuned with every parameter trained and no penalty: the reference of the others."""
  return fine_tune(source, cache, tmp_path_factory.mktemp("plain"))


def params(workdir):
  flat, _ = checkpoint.restore_params(workdir)
  return {"/".join(k): v for k, v in flat.items()}


def bits(a):
  return np.ascontiguousarray(a).view(np.uint8)


def test_frozen_parameters_stay_bit_identical(source, plain, cache, tmp_path):
  start, free = params(source), params(plain)
  tuned = params(fine_tune(source, cache, tmp_path, freeze=BODY + ",commands"))
  frozen = [k for k in tuned if re.fullmatch(r"(encoder|mixer|decoder)/.*|commands", k)]
  assert len(frozen) > 50
  for key in frozen:
    np.testing.assert_array_equal(bits(tuned[key]), bits(start[key]), err_msg=key)
  # The same run without freezing changes the encoder, so the freeze is what kept it.
  assert any(not np.array_equal(free[k], start[k]) for k in frozen if k.startswith("encoder/"))
  # What is not frozen trains: the image net (its new stem too) and the label head.
  changed = {k for k in tuned if k not in frozen and (
      k not in start or start[k].shape != tuned[k].shape or not np.array_equal(tuned[k], start[k]))}
  assert "modalities/label/head/kernel" in changed
  assert any(k.startswith("modalities/image/") for k in changed)
  assert "l2sp_loss" not in writer.read(tmp_path)[-1]


def abstract_params(config):
  return nnx.state(nnx.eval_shape(lambda: MultiModel(config.model, rngs=nnx.Rngs(0))), nnx.Param)


def test_frozen_parameters_have_no_optimizer_state():
  config = small_config(TARGET)
  state = abstract_params(config)
  keys = checkpoint.param_keys(state)
  mask = optim.freeze_mask(keys, BODY)
  tx = optim.make(config.train, config.model.d_model,
                  frozen=jax.tree.unflatten(jax.tree.structure(state), mask))
  adam = [s for s in jax.tree.leaves(jax.eval_shape(tx.init, state), is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1
  assert len(jax.tree.leaves(adam[0].mu)) == len(keys) - sum(mask) > 0


def test_l2sp_keeps_weights_near_the_start(source, plain, cache, tmp_path):
  start, free = params(source), params(plain)
  tuned = params(fine_tune(source, cache, tmp_path, l2sp=1e4))
  anchor, weight = checkpoint.restore_l2sp(tmp_path)
  anchor = {"/".join(k): v for k, v in anchor.items()}
  weight = {"/".join(k): float(v) for k, v in weight.items()}
  # Copied parameters are anchored at their starting values; the new image stem is not.
  new = [k for k in tuned if start[k].shape != tuned[k].shape]
  assert new and all(k.startswith("modalities/image/") for k in new)
  assert all(weight[k] == 0.0 for k in new)
  anchored = [k for k in tuned if weight[k] == 1.0]
  assert len(anchored) == len(tuned) - len(new)
  for key in anchored:
    np.testing.assert_array_equal(anchor[key], start[key], err_msg=key)
  distance = lambda p: sum(float(np.sum((p[k] - start[k]) ** 2)) for k in anchored)
  assert distance(tuned) < 0.2 * distance(free), (distance(tuned), distance(free))
  records = writer.read(tmp_path)
  penalties = [r["l2sp_loss"] for r in records]
  assert len(penalties) == 4 and all(np.isfinite(penalties)) and max(penalties) > 0
  assert penalties[0] == 0.0  # The first step starts at w0 exactly.


def test_bad_freeze_patterns_fail_with_valid_paths():
  keys = checkpoint.param_keys(abstract_params(small_config(TARGET)))
  with pytest.raises(ValueError, match="match no parameter") as error:
    optim.freeze_mask(keys, "encoder/.*,no_such_module/.*")
  assert "no_such_module" in str(error.value) and "encoder/blocks/0/steps/0" in str(error.value)
  with pytest.raises(ValueError, match="match no parameter"):
    optim.freeze_mask(keys, "encoder")  # A pattern matches whole paths.
  with pytest.raises(ValueError, match="not a valid regular expression"):
    optim.freeze_mask(keys, "encoder/(")
  with pytest.raises(ValueError, match="freezes every parameter"):
    optim.freeze_mask(keys, ".*")
  assert optim.freeze_mask(keys, "") == [False] * len(keys)


def test_trainer_refuses_bad_settings_before_writing(source, plain, cache, tmp_path, monkeypatch):
  tiny_data.use(monkeypatch)
  with pytest.raises(ValueError, match="no_such_module"):
    trainer.train_and_evaluate(target_config(cache, freeze="no_such_module/.*"), tmp_path / "a",
                               init=str(source), progress=False)
  with pytest.raises(ValueError, match="no --init was given"):
    trainer.train_and_evaluate(target_config(cache, l2sp=0.1), tmp_path / "b", progress=False)
  assert not (tmp_path / "a" / "config.json").exists()
  assert not (tmp_path / "b" / "config.json").exists()
  # A run is resumed only with the state layout it was saved with.
  with pytest.raises(checkpoint.WorkdirError, match="train.freeze"):
    trainer.train_and_evaluate(target_config(cache, freeze=BODY), plain, progress=False)


def test_cli_bad_freeze_pattern(tmp_path):
  env = dict(os.environ, MULTIMODEL_DATA_DIR=str(tiny_data.data_dir()), PYTHONPATH=str(ROOT),
             TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "multimodel/configs/tiny.py"),
       "--workdir", str(tmp_path / "run"), f"--config.data.tasks={TARGET}",
       "--config.train.freeze=encoder/(", "--config.train.compilation_cache="],
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 2
  assert "train.freeze" in result.stderr and "not a valid regular expression" in result.stderr
  assert not (tmp_path / "run").exists()


def test_train_examples_limits_the_data(plain, monkeypatch):
  tiny_data.use(monkeypatch)
  task = tasks_lib.get(TARGET)
  it = pipeline.TaskIterator(task, None, InputConfig(image_batch_size=16), max_examples=5)
  assert it.size == 5
  first = [it._examples.read(i)["inputs"] for i in range(5)]  # pylint: disable=protected-access
  for _ in range(3):
    for image in next(it)["inputs"]:
      assert any(np.array_equal(image, f) for f in first)
  assert Mixture([task], None, InputConfig(), train_examples=5).sizes == {TARGET: 5}
  assert Mixture([task], None, InputConfig(), train_examples=10 ** 6).sizes == {
      TARGET: tiny_data.EXAMPLES_PER_SPLIT}
  # The trainer's run used data.train_examples=8: its saved iterator state says so.
  ckpts = checkpoint.Checkpoints(plain)
  data = ckpts.manager.restore(ckpts.latest_step(),
                               args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
  ckpts.close()
  assert data["tasks"][TARGET]["size"] == 8


def test_transfer_experiment_quick(tmp_path, cache):
  env = dict(os.environ, MULTIMODEL_DATA_DIR=str(tiny_data.data_dir()), PYTHONPATH=str(ROOT),
             TF_CPP_MIN_LOG_LEVEL="3")
  out = tmp_path / "transfer"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.transfer", "--quick", "--target", TARGET,
       "--joint_tasks", "translate_en_fr", "--out", str(out),
       "--set", f"train.compilation_cache={cache}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  table = (out / "results.md").read_text()
  assert table in result.stdout
  for row in ("| scratch |", "| finetune |", "| frozen |"):
    assert row in table
  assert "| variant | N = 8 | N = 16 |" in table and "Gain over scratch" in table
  runs = json.loads((out / "results.json").read_text())["runs"]
  assert sorted((r["variant"], r["n"]) for r in runs) == sorted(
      (v, n) for v in ("scratch", "finetune", "frozen") for n in (8, 16))
  assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in runs)
  assert (out / "transfer_gain.png").stat().st_size > 0
  assert checkpoint.restore_params(out / "joint")[1]["tasks"] == ["translate_en_fr"]
