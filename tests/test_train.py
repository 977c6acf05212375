"""Training: the real CLI end to end on real embedded data, exact resume after SIGKILL, SIGTERM,
1 device against 8, non-finite steps, incompatible workdirs."""

import functools
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from data import tasks as tasks_lib
from data.mixture import Mixture
from multimodel import checkpoint, gradnorm, optim, trainer, writer
from multimodel.configs import tiny
from tests import tiny_data

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = [
    "--config.model.d_model=32", "--config.model.hidden=64", "--config.model.num_heads=2",
    "--config.model.num_experts=4", "--config.model.image.stem_filters=8",
    "--config.model.audio.conv_filters=8", "--config.data.tokens_per_batch=256",
    "--config.data.image_batch_size=16", "--config.data.text_buckets=(64,)",
    "--config.train.warmup_steps=10", "--config.train.eval_max_examples=16",
]
TASKS = "--config.data.tasks=image_mnist5k,translate_en_fr"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of the CLI runs: the tiny real data and a shared compilation cache."""
  out = dict(os.environ, MULTIMODEL_DATA_DIR=str(tiny_data.data_dir()), PYTHONPATH=str(ROOT),
             TF_CPP_MIN_LOG_LEVEL="3")
  out.pop("XLA_FLAGS", None)
  cache = tmp_path_factory.mktemp("jax-cache")
  return out, cache


def train_cmd(workdir, cache, *extra):
  return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "multimodel/configs/tiny.py"),
          "--workdir", str(workdir), *SMALL, TASKS, f"--config.train.compilation_cache={cache}",
          *extra]


def run(cmd, env, **kw):
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, **kw)


def final_params(workdir):
  flat, _ = checkpoint.restore_params(workdir)
  return flat


def assert_same_params(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg="/".join(key))


@pytest.fixture(scope="module")
def straight_run(env, tmp_path_factory):
  """6 steps straight: the end-to-end run, and the reference of the resume test."""
  environ, cache = env
  workdir = tmp_path_factory.mktemp("straight")
  result = run(train_cmd(workdir, cache, "--config.train.steps=6", "--config.train.log_every=1",
                         "--config.train.checkpoint_every=3"), environ)
  assert result.returncode == 0, result.stderr[-4000:]
  return workdir, result


def test_cli_end_to_end(straight_run):
  workdir, result = straight_run
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  records = writer.read(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for r in records:
    assert all(np.isfinite(v) for v in r["loss"].values())
    assert r["grad_norm"].keys() == r["loss"].keys()
    assert all(np.isfinite(v) and v > 0 for v in r["grad_norm"].values())
    assert r["skipped_steps"] == 0
  seen = {t for r in records for t in r["loss"]}
  assert seen <= {"image_mnist5k", "translate_en_fr"} and seen
  load = next(iter(records[0]["expert_load"].values()))
  assert "encoder" in load and len(load["encoder"]) == 4
  dropped = next(iter(records[0]["expert_dropped"].values()))
  assert 0.0 <= dropped["encoder"] <= 1.0
  assert list((workdir / "tensorboard").iterdir())
  assert (workdir / "config.json").exists()
  # The final table: one row per (task, metric), for both tasks.
  assert "image_mnist5k" in result.stdout and "accuracy" in result.stdout
  assert "translate_en_fr" in result.stdout and "log_perplexity" in result.stdout
  for task in ("image_mnist5k", "translate_en_fr"):
    report = json.loads((workdir / "eval" / f"{task}-test.json").read_text())
    assert 0.0 <= report["token_accuracy"] <= 1.0
    # Unset train.eval_decode and eval_no_repeat_ngram: each task is decoded its own way.
    assert (report["decode"], report["beam_size"], report["no_repeat_ngram"]) == (
        ("none", 1, 0) if task == "image_mnist5k" else ("greedy", 1, 3))
  assert (workdir / "plots" / "loss_per_task.png").stat().st_size > 0
  assert (workdir / "plots" / "expert_load.png").stat().st_size > 0
  meta = checkpoint.Checkpoints(workdir).meta()
  assert meta["config"]["model"]["d_model"] == 32 and meta["tokenizer"]


def test_exact_resume_after_sigkill(straight_run, env, tmp_path):
  """Train 3 steps, SIGKILL, resume to 6: parameters identical to the straight 6-step run."""
  environ, cache = env
  reference, _ = straight_run
  cmd = train_cmd(tmp_path, cache, "--config.train.steps=6", "--config.train.log_every=1",
                  "--config.train.checkpoint_every=3", "--config.train.eval_max_examples=-1",
                  "--config.train.plot=False")
  child = subprocess.Popen(cmd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not (tmp_path / "checkpoints" / "3" / "commit_success.txt").exists():
    assert child.poll() is None, child.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  child.send_signal(signal.SIGKILL)
  child.wait()
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 6, steps
  result = run(cmd, environ)
  assert result.returncode == 0, result.stderr[-4000:]
  assert_same_params(final_params(tmp_path), final_params(reference))
  assert [r["step"] for r in writer.read(tmp_path)] == [1, 2, 3, 4, 5, 6]


def test_resumed_metrics_keep_each_step_once(tmp_path):
  """Records logged past the checkpoint a run resumes from are dropped from metrics.jsonl and,
  through a SessionLog START event, from what TensorBoard loads."""
  first = writer.MetricsWriter(tmp_path)
  for step in range(1, 6):
    first.write(step, {"loss": {"t": float(step)}})
  first.close()
  second = writer.MetricsWriter(tmp_path, resume_step=3)
  for step in (4, 5, 6):
    second.write(step, {"loss": {"t": 10.0 * step}})
  second.close()
  assert [(r["step"], r["loss"]["t"]) for r in writer.read(tmp_path)] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss/t")] == [
      (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_sigterm_saves_a_checkpoint(env, tmp_path):
  environ, cache = env
  child = subprocess.Popen(
      train_cmd(tmp_path, cache, "--config.train.steps=100000", "--config.train.log_every=1",
                "--config.train.checkpoint_every=0"),
      env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 600
  while not (tmp_path / "metrics.jsonl").exists() or not writer.read(tmp_path):
    assert child.poll() is None, child.stderr.read().decode()[-3000:]
    assert time.time() < deadline
    time.sleep(0.2)
  child.send_signal(signal.SIGTERM)
  assert child.wait(timeout=300) == 128 + signal.SIGTERM
  saved = checkpoint.Checkpoints(tmp_path).latest_step()
  assert saved is not None and saved >= 1


def test_incompatible_workdir_is_refused(straight_run, env):
  environ, cache = env
  workdir, _ = straight_run
  before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
  result = run(train_cmd(workdir, cache, "--config.train.steps=8", "--config.model.d_model=64"),
               environ)
  assert result.returncode == 2
  assert "incompatible" in result.stderr and "model.d_model: saved 32, new 64" in result.stderr
  assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*")} == before


def test_a_run_saved_before_model_norm_existed_resumes_as_post_norm(tmp_path):
  """Configs saved before `model.norm` hold no such key: they were post-norm runs."""
  config = tiny.get_config()
  saved = checkpoint.config_to_json(config)
  del saved["model"]["norm"]
  meta = {"config": saved, "tasks": ["image_mnist5k"]}
  assert checkpoint.config_from_json(saved).model.norm == "post"  # inference loads it as such
  checkpoint.check_compatible(meta, config, ["image_mnist5k"], tmp_path)
  with config.unlocked():
    config.model.norm = "pre"
  with pytest.raises(checkpoint.WorkdirError, match="model.norm: saved 'post', new 'pre'"):
    checkpoint.check_compatible(meta, config, ["image_mnist5k"], tmp_path)


def test_eval_no_repeat_ngram_of_old_and_new_configs():
  """Unset now (each task's own rule); a config saved before the key existed had no rule (0)."""
  saved = checkpoint.config_to_json(tiny.get_config())
  assert saved["train"]["eval_no_repeat_ngram"] is None
  assert checkpoint.config_from_json(saved).train.eval_no_repeat_ngram is None
  del saved["train"]["eval_no_repeat_ngram"]
  assert checkpoint.config_from_json(saved).train.eval_no_repeat_ngram == 0


def test_eval_decode_is_unset_and_the_experiments_decode_greedily():
  """Unset in a new config (each task's own beams); the experiments, whose tables were measured
  greedily, pin "greedy"."""
  from experiments import common  # pylint: disable=import-outside-toplevel
  saved = checkpoint.config_to_json(tiny.get_config())
  assert saved["train"]["eval_decode"] is None and saved["train"]["eval_beam_size"] is None
  assert common.load_config("tiny", False, []).train.eval_decode == "greedy"


def test_unknown_task_and_config_key_fail_with_valid_lists(env, tmp_path):
  environ, cache = env
  result = run(train_cmd(tmp_path, cache, "--config.data.tasks=image_mnist5k,no_such_task"),
               environ)
  assert result.returncode == 2 and "no_such_task" in result.stderr
  assert "translate_en_fr" in result.stderr  # the valid names are listed
  result = run(train_cmd(tmp_path, cache, "--config.model.no_such_key=1"), environ)
  assert result.returncode == 2 and "no_such_key" in result.stderr and "d_model" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_a_vocabulary_smaller_than_the_tokenizer_fails_with_the_fix(env, tmp_path):
  environ, cache = env
  result = run(train_cmd(tmp_path, cache, "--config.model.vocab_size=100"), environ)
  assert result.returncode == 2
  assert "model.vocab_size=100 is smaller than the tokenizer's" in result.stderr
  assert "--retrain_tokenizer --vocab_size 100" in result.stderr
  assert not checkpoint.checkpoint_steps(tmp_path / "checkpoints")  # Nothing saved.


def test_one_device_equals_eight_devices(env, tmp_path):
  """The same run on 1 CPU device and on 8 (data x expert = 4 x 2) gives the same losses."""
  environ, cache = env
  losses = {}
  for devices, mesh in ((1, []), (8, ["--config.train.mesh_expert=2"])):
    e = dict(environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    workdir = tmp_path / f"d{devices}"
    result = run(train_cmd(workdir, cache, "--config.train.steps=4", "--config.train.log_every=1",
                           "--config.train.eval_max_examples=-1", "--config.train.plot=False",
                           *mesh), e)
    assert result.returncode == 0, result.stderr[-4000:]
    losses[devices] = [r["loss"] for r in writer.read(workdir)]
  assert [sorted(r) for r in losses[1]] == [sorted(r) for r in losses[8]]
  for one, eight in zip(losses[1], losses[8]):
    for task in one:
      np.testing.assert_allclose(one[task], eight[task], rtol=2e-4)


class NaNImages:
  """A task iterator whose image batches are NaN on the steps listed in `bad`."""

  size = 100

  def __init__(self, bad):
    self.bad, self.step = set(bad), 0

  def __next__(self):
    self.step += 1
    images = np.full((8, 28, 28, 3), np.nan if self.step in self.bad else 0.1, np.float32)
    return {"inputs": images, "targets": np.arange(8, dtype=np.int32) % 10}

  def get_state(self):
    return {"step": self.step}

  def set_state(self, state):
    self.step = state["step"]


def nan_task():
  return tasks_lib.Task(name="nan_images", source="none", preprocess=lambda e: e,
                        input_modality="image", target_modality="label", command="to_label",
                        metrics=("accuracy",), num_classes=10, image_size=28)


def small_config(**train):
  config = tiny.get_config()
  with config.unlocked():
    config.model.d_model, config.model.hidden, config.model.num_heads = 32, 64, 2
    config.model.image.stem_filters = 8
    config.train.update(dict(eval_max_examples=-1, plot=False, log_every=1,
                             checkpoint_every=0, compilation_cache=""), **train)
  return config


def test_nonfinite_steps_are_skipped(tmp_path):
  task = nan_task()
  mixture = Mixture([task], None, iterators={task.name: NaNImages(bad={2, 3})})
  trainer.train_and_evaluate(small_config(steps=5, max_nonfinite_in_row=3), tmp_path,
                             mixture=mixture, progress=False)
  records = writer.read(tmp_path)
  assert records[-1]["skipped_steps"] == 2
  flat, _ = checkpoint.restore_params(tmp_path)
  assert all(np.isfinite(v).all() for v in flat.values())


def test_nonfinite_in_a_row_stops_naming_step_and_task(tmp_path):
  task = nan_task()
  mixture = Mixture([task], None, iterators={task.name: NaNImages(bad=range(2, 100))})
  with pytest.raises(trainer.NonFiniteError, match=r"at step 4 on task\(s\) nan_images"):
    trainer.train_and_evaluate(small_config(steps=20, max_nonfinite_in_row=3), tmp_path,
                               mixture=mixture, progress=False)
  assert checkpoint.Checkpoints(tmp_path).latest_step() is None  # nothing non-finite was saved


def test_init_warm_starts_from_another_run(straight_run, env, tmp_path):
  """--init copies the weights: with a zero learning rate they stay exactly the source's."""
  environ, cache = env
  source, _ = straight_run
  result = run(train_cmd(tmp_path, cache, "--config.train.steps=1", "--config.train.learning_rate=0.0",
                         "--config.train.eval_max_examples=-1", "--config.train.plot=False",
                         "--init", str(source)), environ)
  assert result.returncode == 0, result.stderr[-4000:]
  assert_same_params(final_params(tmp_path), final_params(source))


def two_task_config(**train):
  """`small_config` on the tiny image_mnist5k and translate_en_fr (one text bucket)."""
  config = small_config(**train)
  with config.unlocked():
    config.data.tasks = "image_mnist5k,translate_en_fr"
    config.data.text_buckets = (64,)
    config.data.tokens_per_batch, config.data.image_batch_size = 256, 16
  return config


def test_all_tasks_step_sums_every_task(env, tmp_path, monkeypatch):
  """The weighted multi-task step: every step trains on a batch of each task."""
  tiny_data.use(monkeypatch)
  trainer.train_and_evaluate(two_task_config(steps=2, step_mode="all_tasks"), tmp_path,
                             progress=False)
  records = writer.read(tmp_path)
  assert [r["steps"] for r in records] == [{"image_mnist5k": 1, "translate_en_fr": 1}] * 2


def test_gradnorm_weights_train_log_and_resume(tmp_path, monkeypatch):
  """GradNorm on two tasks: the weights move from 1, stay positive, sum to 2, are logged, are
  restored on resume, and a resume with the other loss weighting is refused."""
  tiny_data.use(monkeypatch)
  config = lambda steps, weighting="gradnorm": two_task_config(
      steps=steps, step_mode="all_tasks", loss_weighting=weighting)
  trainer.train_and_evaluate(config(3), tmp_path, progress=False)
  trainer.train_and_evaluate(config(4), tmp_path, progress=False)  # Resumes at step 3.
  records = writer.read(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  weights = [r["task_weight"] for r in records]
  assert all(sorted(w) == ["image_mnist5k", "translate_en_fr"] for w in weights)
  assert weights[0] == {"image_mnist5k": 1.0, "translate_en_fr": 1.0}  # Used before the update.
  for w in weights[1:]:  # Step 4 (after the resume) too: the weights came from the checkpoint.
    assert all(v > 0 for v in w.values()) and abs(w["image_mnist5k"] - 1.0) > 1e-6
    np.testing.assert_allclose(sum(w.values()), 2.0, rtol=1e-5)
  assert weights[3] != weights[2]
  with pytest.raises(checkpoint.WorkdirError,
                     match="train.loss_weighting: saved 'gradnorm', new 'mixture'"):
    trainer.train_and_evaluate(config(5, "mixture"), tmp_path, progress=False)


def test_gradnorm_update_by_hand():
  """Two tasks: the one whose G_i falls short of its target gains weight, the other loses it."""
  update = functools.partial(gradnorm.update_weights, alpha=1.5, lr=0.1)
  ones = np.ones(2, np.float32)
  # Equal loss ratios, norms 2 and 1: G = (2, 1), target = G_avg = 1.5 for both;
  # w = (1 - 0.1 * 2, 1 + 0.1 * 1) = (0.8, 1.1), scaled to sum 2.
  np.testing.assert_allclose(update(ones, np.array([2.0, 1.0]), ones, ones),
                             np.array([0.8, 1.1]) * 2 / 1.9, rtol=1e-6)
  # Equal norms, task 0 halved its loss and task 1 did not: ratios (0.5, 1), r = (2/3, 4/3),
  # targets (2/3) ** 1.5 = 0.544 and (4/3) ** 1.5 = 1.540 against G = (1, 1): w = (0.9, 1.1).
  np.testing.assert_allclose(update(ones, ones, np.array([1.0, 1.0]), np.array([2.0, 1.0])),
                             [0.9, 1.1], rtol=1e-6)
  # Task 0 already above target with a large norm: 1 - 0.1 * 30 < 0 is clipped at the floor.
  w = np.asarray(update(ones, np.array([30.0, 1.0]), ones, ones))
  floor = gradnorm.MIN_WEIGHT
  np.testing.assert_allclose(w, np.array([floor, 1.1]) * 2 / (1.1 + floor), rtol=1e-6)
  assert (w > 0).all()


def test_gradnorm_needs_the_all_tasks_step(tmp_path):
  config = two_task_config(steps=1, loss_weighting="gradnorm")  # step_mode stays "one_task".
  with pytest.raises(ValueError,
                     match="train.loss_weighting='gradnorm'.*train.step_mode='one_task'"):
    trainer.train_and_evaluate(config, tmp_path, progress=False)
  assert not (tmp_path / "checkpoints").exists()


def test_logged_learning_rate_is_the_schedule_without_device_work():
  """The trainer logs `noam_rate` (plain Python: no eager jnp op compiles after warm-up)."""
  schedule = optim.noam_schedule(0.2, 256, 300)
  for step in (0, 1, 150, 299, 300, 1799, 100_000):
    rate = optim.noam_rate(0.2, 256, 300, step)
    assert isinstance(rate, float)
    assert rate == pytest.approx(float(schedule(step)), rel=1e-6)


@pytest.mark.parametrize("scale", [0.0, 0.1, 1.0, 30.0])
def test_clip_by_global_norm_equals_optax(scale):
  """Our clip (one scalar factor) gives optax's result, up to rounding, below, at and above the
  norm and for a zero gradient, and keeps its (empty) state: checkpoints restore either way."""
  rng = np.random.default_rng(0)
  grads = {"w": scale * rng.standard_normal((7, 5)).astype(np.float32),
           "b": [scale * rng.standard_normal((3,)).astype(np.float32)]}
  ours, theirs = optim.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
  got, state = ours.update(grads, ours.init(grads))
  want, want_state = theirs.update(grads, theirs.init(grads))
  assert jax.tree.structure(state) == jax.tree.structure(want_state)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=0)
  assert float(optax.tree.norm(got)) == pytest.approx(min(float(optax.tree.norm(grads)), 1.0),
                                                      rel=1e-6)


def test_cooldown_falls_linearly_to_zero_over_the_last_steps():
  """With N cool-down steps of T, the rate is noam's up to step T - N, then noam's times
  (T - step) / N: 1 / N of noam's at the last step, T - 1."""
  noam = optim.noam_schedule(0.3, 256, 300)
  cooled = optim.noam_schedule(0.3, 256, 300, total_steps=6500, cooldown_steps=1300)
  for step in (0, 299, 3000, 5200):
    assert float(cooled(step)) == pytest.approx(float(noam(step)), rel=1e-6)
  for step in (5201, 5850, 6499):
    assert float(cooled(step)) == pytest.approx(float(noam(step)) * (6500 - step) / 1300, rel=1e-5)
    assert optim.noam_rate(0.3, 256, 300, step, 6500, 1300) == pytest.approx(float(cooled(step)),
                                                                          rel=1e-5)
  assert float(cooled(6500)) == 0.0
  rates = [float(cooled(s)) for s in range(5200, 6500)]
  assert all(a > b for a, b in zip(rates, rates[1:]))


def test_cooldown_run_logs_its_rates_and_bad_values_fail(tmp_path, monkeypatch):
  tiny_data.use(monkeypatch)
  config = two_task_config(steps=4, warmup_steps=2, cooldown_steps=2)
  trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
  logged = [r["learning_rate"] for r in writer.read(tmp_path / "run")]
  noam = lambda step: optim.noam_rate(config.train.learning_rate, 32, 2, step)
  assert logged == pytest.approx([noam(0), noam(1), noam(2) * 2 / 2, noam(3) * 1 / 2])
  bad = ((dict(cooldown_steps=5), r"between 0 \(off\) and train.steps=4, got 5"),
         (dict(cooldown_steps=-1), "got -1"),
         (dict(cooldown_steps=2, lr_schedule="task"), "needs train.lr_schedule='global', got 'task'"))
  for overrides, message in bad:
    with pytest.raises(ValueError, match=f"train.cooldown_steps.*{message}"):
      trainer.train_and_evaluate(two_task_config(steps=4, **overrides), tmp_path / "bad",
                                 progress=False)
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_per_task_schedule_alone_equals_the_global_one(tmp_path, monkeypatch):
  """One task: its own step count is the run's, so both schedules give the same parameters."""
  tiny_data.use(monkeypatch)
  runs = {}
  for schedule in optim.LR_SCHEDULES:
    config = two_task_config(steps=3, lr_schedule=schedule)
    with config.unlocked():
      config.data.tasks = "translate_en_fr"
    trainer.train_and_evaluate(config, tmp_path / schedule, progress=False)
    runs[schedule] = final_params(tmp_path / schedule)
  assert_same_params(runs["global"], runs["task"])


def test_per_task_schedule_counts_each_task_logs_and_resumes(tmp_path, monkeypatch):
  """Two tasks, one per step: each task's logged rate is the schedule at its own count (which
  the checkpoint keeps), not at the run's; a resume with the global schedule is refused."""
  tiny_data.use(monkeypatch)
  config = lambda steps, schedule="task": two_task_config(steps=steps, lr_schedule=schedule,
                                                          warmup_steps=4)
  trainer.train_and_evaluate(config(4), tmp_path, progress=False)
  trainer.train_and_evaluate(config(6), tmp_path, progress=False)  # Resumes at step 4.
  records = writer.read(tmp_path)
  assert [r["step"] for r in records] == list(range(1, 7))
  counts = {"image_mnist5k": 0, "translate_en_fr": 0}
  rate = lambda count: optim.noam_rate(config(1).train.learning_rate, 32, 4, count - 1)
  for record in records:
    for name, n in record["steps"].items():
      counts[name] += n
    assert record["learning_rate"] == {n: pytest.approx(rate(c)) for n, c in counts.items() if c}
  assert 0 < counts["image_mnist5k"] < 6  # Both tasks were drawn: the counts differ from 6.
  with pytest.raises(checkpoint.WorkdirError,
                     match="train.lr_schedule: saved 'task', new 'global'"):
    trainer.train_and_evaluate(config(7, "global"), tmp_path, progress=False)


def test_unknown_lr_schedule_fails(tmp_path):
  with pytest.raises(ValueError, match=r"train.lr_schedule='steps'; valid values: \('global'"):
    trainer.train_and_evaluate(two_task_config(steps=1, lr_schedule="steps"), tmp_path,
                               progress=False)


def test_negative_eval_no_repeat_ngram_fails_before_training(tmp_path):
  with pytest.raises(ValueError, match="train.eval_no_repeat_ngram must be >= 0"):
    trainer.train_and_evaluate(two_task_config(steps=1, eval_no_repeat_ngram=-1), tmp_path,
                               progress=False)
  assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("setting, message", [
    (dict(eval_decode="sampling"), "train.eval_decode must be 'greedy', 'beam' or 'none' "
                                   "(unset: each task's own), got 'sampling'"),
    (dict(eval_beam_size=0), "train.eval_beam_size >= 1 (unset: the task's own), got 0"),
])
def test_bad_eval_decoding_fails_before_training(tmp_path, setting, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    trainer.train_and_evaluate(two_task_config(steps=1, **setting), tmp_path, progress=False)
  assert not (tmp_path / "checkpoints").exists()


def test_ctc_loss_is_logged_per_task_that_has_one():
  """`ctc_loss` (audio tasks with `model.ctc_weight` > 0) is averaged over each task's steps."""
  window = trainer._Window()  # pylint: disable=protected-access

  def step(ctc=None):
    m = {"task_loss": 2.0, "moe_loss": 0.01, "nll": 20.0, "correct": 3.0, "weight": 10.0,
         "expert_load": {}, "expert_dropped": {}}
    return m if ctc is None else dict(m, ctc_loss=ctc)

  window.add({"speech_en": step(4.0)}, 8, 1.0)
  window.add({"speech_en": step(2.0)}, 8, 1.0)
  window.add({"parse_en": step()}, 8, 1.0)
  record = window.record()
  assert record["ctc_loss"] == {"speech_en": 3.0}
  assert record["loss"] == {"speech_en": 2.0, "parse_en": 2.0}
