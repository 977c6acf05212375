"""The findings experiments end to end on tiny real data (`--quick`: their numbers mean nothing)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import findings
from tests import tiny_data

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax-cache")
  return dict(os.environ, MULTIMODEL_DATA_DIR=str(tiny_data.data_dir()), PYTHONPATH=str(ROOT),
              TF_CPP_MIN_LOG_LEVEL="3"), cache


def run(env, out, *args):
  environ, cache = env
  result = subprocess.run(
      [sys.executable, "-m", "experiments.findings", *args, "--quick", "--out", str(out),
       "--set", f"train.compilation_cache={cache}"],
      cwd=ROOT, env=environ, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def test_joint_vs_single_trains_each_task_alone_and_jointly(env, tmp_path):
  out = tmp_path / "findings"
  args = ("joint_vs_single", "--tasks", "image_mnist5k,parse_en", "--set", "model.use_moe=True")
  stdout = run(env, out, *args)
  table = (out / "joint_vs_single" / "results.md").read_text()
  assert table in stdout
  for row in ("| image_mnist5k | accuracy |", "| image_mnist5k | log_perplexity |",
              "| parse_en | bracket_f1 |", "| parse_en | token_accuracy |"):
    assert row in table
  runs = json.loads((out / "joint_vs_single" / "results.json").read_text())["runs"]
  assert [(r["run"], r["steps"]) for r in runs] == [
      ("single-image_mnist5k", 4), ("single-parse_en", 4), ("joint-image_mnist5k+parse_en", 8)]
  assert set(runs[2]["metrics"]) == {"image_mnist5k", "parse_en"}
  assert 0.0 <= runs[0]["metrics"]["image_mnist5k"]["accuracy"] <= 1.0
  for name in ("learning_curves.png", "gain_per_task.png", "expert_load_joint.png"):
    assert (out / "joint_vs_single" / name).stat().st_size > 0

  # Run again: every finished run is read back, not trained again.
  checkpoints = sorted(p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoints/*"))
  assert run(env, out, *args).endswith(
      stdout.splitlines()[-1] + "\n")
  assert sorted(p.stat().st_mtime_ns for p in (out / "runs").rglob("checkpoints/*")) == checkpoints
  assert json.loads((out / "joint_vs_single" / "results.json").read_text())["runs"] == runs


def test_ablations_switch_off_experts_and_attention(env, tmp_path):
  out = tmp_path / "findings"
  run(env, out, "ablations", "--tasks", "image_mnist5k,translate_en_fr",
      "--set", "model.use_moe=True")
  table = (out / "ablations" / "results.md").read_text()
  name = "joint-image_mnist5k+translate_en_fr"
  assert "| task | metric | joint | no_moe | no_attention | no_moe - joint | " in table
  assert f"joint = `{name}`, no_moe = `{name}-no_moe`, no_attention = `{name}-no_attention`" in table
  assert "| image_mnist5k | accuracy |" in table and "| translate_en_fr | chrf |" in table
  saved = {p.parent.name: json.loads(p.read_text())["model"]
           for p in (out / "runs").glob("*/config.json")}
  assert saved[f"{name}-s0"]["use_moe"] and saved[f"{name}-s0"]["use_attention"]
  assert not saved[f"{name}-no_moe-s0"]["use_moe"]
  assert not saved[f"{name}-no_attention-s0"]["use_attention"]


def test_parse_transfer_plan(monkeypatch):
  tiny_data.use(monkeypatch)
  plan = findings.planned_runs("parse_transfer", ["parse_en"])
  assert [(name, tasks) for name, tasks, _ in plan[:2]] == [
      ("single-parse_en", ["parse_en"]),
      ("joint-parse_en+image_fashion", ["image_fashion", "parse_en"])]
  assert plan[2][0] == "joint-all" and "parse_en" in plan[2][1]


def test_a_single_task_cannot_be_trained_jointly(env, tmp_path):
  environ, _ = env
  result = subprocess.run(
      [sys.executable, "-m", "experiments.findings", "ablations", "--tasks", "image_mnist5k",
       "--quick", "--out", str(tmp_path)], cwd=ROOT, env=environ, capture_output=True, text=True,
      timeout=300)
  assert result.returncode != 0 and "two or more" in result.stderr


def test_sampling_compares_mixtures_and_gradnorm(env, tmp_path):
  out = tmp_path / "findings"
  run(env, out, "sampling", "--tasks", "image_mnist5k,translate_en_fr")
  table = (out / "sampling" / "results.md").read_text()
  name = "joint-image_mnist5k+translate_en_fr"
  # uniform: the plain joint run, shared with joint_vs_single.
  assert "| task | metric | uniform | proportional | temperature | adaptive | gradnorm |" in table
  assert f"uniform = `{name}`" in table
  for strategy in ("proportional", "temperature", "adaptive", "gradnorm"):
    assert f"{strategy} = `{name}-{strategy}`" in table and f"| {strategy} | " in table
  assert "mean log-perplexity" in table and "tasks drawn by the run's mixture" in table
  runs = {r["run"]: r for r in json.loads((out / "sampling" / "results.json").read_text())["runs"]}
  assert runs[name]["steps"] == 8 and runs[f"{name}-gradnorm"]["steps"] == 4
  assert json.loads((out / "runs" / f"{name}-s0" / "config.json").read_text()
                    )["data"]["mixture"] == "uniform"
  saved = json.loads((out / "runs" / f"{name}-gradnorm-s0" / "config.json").read_text())
  assert saved["train"]["loss_weighting"] == "gradnorm"
  assert saved["train"]["step_mode"] == "all_tasks"
  records = [json.loads(line) for line in
             (out / "runs" / f"{name}-gradnorm-s0" / "metrics.jsonl").read_text().splitlines()]
  weights = records[-1]["task_weight"]
  assert set(weights) == {"image_mnist5k", "translate_en_fr"}
  assert sum(weights.values()) == pytest.approx(2.0, rel=1e-3)


def test_a_saved_run_without_a_newer_key_counts_as_its_default(tmp_path):
  """A run saved before a config key existed is the same run when the key is at its default."""
  from experiments import common  # pylint: disable=import-outside-toplevel
  from multimodel.configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  saved = json.loads(config.to_json_best_effort())
  del saved["train"]["loss_weighting"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  common.same_settings(config, tmp_path)  # No difference.
  with config.unlocked():
    config.train.loss_weighting = "gradnorm"
  with pytest.raises(SystemExit, match="train.loss_weighting: saved 'mixture', now 'gradnorm'"):
    common.same_settings(config, tmp_path)


def test_sampling_variants_pick_runs_and_unknown_ones_fail():
  from experiments import findings
  args = findings.parse_args(["sampling", "--variants", "uniform,adaptive"])
  plan = findings.planned_runs("sampling", ["a", "b"], args.variants)
  assert [name for name, _, _ in plan] == ["joint-a+b", "joint-a+b-adaptive"]
  assert plan[1][2] == {"data.mixture": "adaptive"}
  with pytest.raises(SystemExit):
    findings.parse_args(["sampling", "--variants", "uniform,softmax"])


def test_table_columns_are_named_by_what_sets_the_runs_apart():
  from experiments import common, findings
  assert findings.short_names(["joint-a+b", "joint-a+b-no_moe"]) == ["joint", "no_moe"]
  assert findings.short_names(["joint-a+b", "joint-a+b-adaptive"], "uniform") == [
      "uniform", "adaptive"]
  assert findings.short_names(["joint-a-adaptive", "joint-a-abc"]) == ["adaptive", "abc"]
  assert findings.short_names(["single-p", "joint-p+i", "joint-all"]) == [
      "single-p", "joint-p+i", "joint-all"]
  assert common.cell([0.25]) == "0.250" and common.cell([1.0, 3.0]) == "2.000 ± 1.414"
  assert common.cell([]) == "-"


def test_task_schedule_renames_joint_runs_and_shares_single_ones(env, tmp_path):
  """--lr_schedule task: the joint run trains with train.lr_schedule="task" under its own name,
  the single runs (the same under both schedules) are read back from the plain experiment."""
  out = tmp_path / "findings"
  args = ("joint_vs_single", "--tasks", "image_mnist5k,parse_en")
  run(env, out, *args)
  singles = sorted(p.stat().st_mtime_ns for p in (out / "runs").glob("single-*/checkpoints/*"))
  run(env, out, *args, "--lr_schedule", "task")
  assert sorted(p.stat().st_mtime_ns
                for p in (out / "runs").glob("single-*/checkpoints/*")) == singles
  runs = json.loads((out / "joint_vs_single-task_lr" / "results.json").read_text())["runs"]
  assert [r["run"] for r in runs] == [
      "single-image_mnist5k", "single-parse_en", "joint-image_mnist5k+parse_en-task_lr"]
  saved = json.loads((out / "runs" / "joint-image_mnist5k+parse_en-task_lr-s0" /
                      "config.json").read_text())
  assert saved["train"]["lr_schedule"] == "task"
  assert "per-task schedule" in (out / "joint_vs_single-task_lr" / "results.md").read_text()
