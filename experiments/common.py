"""What every experiment shares: config overrides, one resumable run, headline metrics, statistics.

An experiment is a grid of ordinary training runs (`trainer.train_and_evaluate`, the loop of
`train.py`), each in its own workdir under the experiment's `--out`. A finished run (its last
checkpoint at the configured step and an evaluation report per task) is read back instead of
trained again, so an interrupted experiment is resumed by running the same command; a workdir
that holds a run of other settings stops the experiment instead of mixing results.
"""

import ast
import json
import math
import pathlib
import statistics

# Metrics where a smaller value is better.
LOWER_IS_BETTER = ("wer", "cer", "log_perplexity")
# The first of these that a task reports is its headline metric.
PREFERRED_METRICS = ("accuracy", "bracket_f1", "chrf", "bleu", "cer", "wer", "exact_match")

# `--quick`: a model of width 32 without experts and small batches: checks a whole experiment's
# path in minutes on 2 CPU cores; its numbers mean nothing.
QUICK = dict(
    model=dict(d_model=32, hidden=64, num_heads=2, encoder_blocks=1, mixer_blocks=1,
               decoder_blocks=1, use_moe=False, image=dict(stem_filters=8),
               audio=dict(conv_filters=8)),
    data=dict(tokens_per_batch=256, image_batch_size=16, text_buckets=(64,)),
)


# ---------------------------------------------------------------------------------------------
# Configs.

def override(config, dotted: str, value) -> None:
  """config[a][b][c] = value for "a.b.c"; an unknown key is an error naming the valid ones."""
  *path, key = dotted.split(".")
  node = config
  for part in path:
    node = node[part]
  if key not in node:
    raise KeyError(f"Unknown config key {dotted}; valid keys: {sorted(node.keys())}")
  node[key] = value


def apply(config, overrides: dict, prefix: str = "") -> None:
  """Applies nested dict `overrides` key by key (nested sections are updated, not replaced)."""
  for key, value in overrides.items():
    if isinstance(value, dict):
      apply(config, value, f"{prefix}{key}.")
    else:
      override(config, prefix + key, value)


def parse_set(items: list[str]) -> dict:
  """{"section.key": value} of `--set section.key=value` items (values as Python literals)."""
  out = {}
  for item in items:
    dotted, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"--set expects SECTION.KEY=VALUE, got {item!r}")
    try:
      out[dotted.strip()] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      out[dotted.strip()] = text
  return out


def load_config(name: str, quick: bool, sets: list[str]):
  """The unlocked config `name` (tiny | default | paper), with --quick and --set applied."""
  import importlib  # pylint: disable=import-outside-toplevel

  config = importlib.import_module(f"multimodel.configs.{name}").get_config()
  config.unlock()
  # The experiments' tables (docs/results.md) decode every task greedily, as they were measured
  # and as their saved runs say, not with each task's own beams (`Task.beam_size`).
  config.train.eval_decode = "greedy"
  if quick:
    apply(config, QUICK)
  for dotted, value in parse_set(sets).items():
    override(config, dotted, value)
  return config


def flat(tree: dict, prefix: str = "") -> dict:
  """{"a.b": value} of a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def same_settings(config, workdir: pathlib.Path) -> None:
  """Stops when `workdir` holds a run of another config: its results would not be this one's."""
  saved_path = workdir / "config.json"
  if not saved_path.exists():
    return
  from multimodel import checkpoint  # pylint: disable=import-outside-toplevel

  # A key added to the project after the run was saved counts as its default (the behaviour the
  # run had, the rule resuming follows); values are compared as JSON stores them.
  saved = flat(checkpoint.with_defaults(json.loads(saved_path.read_text())))
  new = flat(json.loads(config.to_json_best_effort()))
  differences = [f"{k}: saved {saved.get(k)!r}, now {new.get(k)!r}"
                 for k in sorted(set(saved) | set(new)) if saved.get(k) != new.get(k)]
  if differences:
    raise SystemExit(f"{workdir} holds a run of other settings ({'; '.join(differences)}); "
                     "use another --out, or delete that run")


# ---------------------------------------------------------------------------------------------
# Runs.

def run(config, workdir: pathlib.Path, init: str | None = None) -> dict:
  """Trains (or reads back) one run; returns {task: test metrics without the decoded outputs}."""
  from multimodel import checkpoint, trainer  # pylint: disable=import-outside-toplevel

  same_settings(config, workdir)
  names = [n.strip() for n in config.data.tasks.split(",") if n.strip()]
  split = config.train.eval_split
  reports = {n: workdir / "eval" / f"{n}-{split}.json" for n in names}
  steps = checkpoint.checkpoint_steps(workdir / "checkpoints")
  strip = lambda metrics: {k: v for k, v in metrics.items() if k != "decoded"}
  if not (steps and steps[-1] == config.train.steps and all(p.exists() for p in reports.values())):
    trainer.train_and_evaluate(config, workdir, init=init, progress=False)
  # Read back from the reports in both cases, so that a resumed experiment sees the same values.
  return {n: strip(json.loads(p.read_text())) for n, p in reports.items()}


def headline_metric(task) -> str:
  """The task's own metric: accuracy for labels, else the first of PREFERRED_METRICS it has."""
  if task.target_modality == "label":
    return "accuracy"
  return next((m for m in PREFERRED_METRICS if m in task.metrics), "token_accuracy")


# ---------------------------------------------------------------------------------------------
# Statistics.

def finite(values: list) -> list[float]:
  """The values that are finite numbers (a failed or missing metric is None or NaN)."""
  return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def mean_std(values: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation of the finite values (0 for one); NaN, NaN for none."""
  values = finite(values)
  if not values:
    return math.nan, math.nan
  return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float], digits: int = 3) -> str:
  """"mean ± sd" of `values`, the value alone when there is one, "-" when there are none."""
  mean, std = mean_std(values)
  if math.isnan(mean):
    return "-"
  text = f"{mean:.{digits}f}"
  return text if len(finite(values)) == 1 else f"{text} ± {std:.{digits}f}"


def better_sign(metric: str) -> float:
  """+1 when larger is better, -1 when smaller is (gains are sign * (variant - baseline))."""
  return -1.0 if metric in LOWER_IS_BETTER else 1.0
