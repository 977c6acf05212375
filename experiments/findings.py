"""The paper's findings measured on our tasks, and task weightings compared: one command each.

    python -m experiments.findings joint_vs_single [--tasks all] [--steps 300] [--seeds 0,1,2]
    python -m experiments.findings parse_transfer  [--steps 300] [--seeds 0,1,2]
    python -m experiments.findings ablations       [--tasks image_mnist5k,translate_en_de]
    python -m experiments.findings sampling        [--tasks all] [--steps 300]
    (common options: --config tiny --out runs/findings --eval_examples 200 --warmup 100
     --lr_schedule global|task --set section.key=value --quick)

`--steps` is S, the steps each task is trained for: a run of T tasks takes T * S steps of one
task each (the paper's way) drawn uniformly, so every task sees S batches in expectation, alone
or jointly. Every run is an ordinary training run (`trainer.train_and_evaluate`) in
OUT/runs/NAME-sSEED scored on the first `--eval_examples` test examples of each of its tasks;
runs of the same settings are shared between experiments (e.g. `parse_en` alone) and a finished
run is read back instead of trained again, so a stopped experiment resumes by running it again.

joint_vs_single  each of --tasks alone, and all of them jointly (paper, table 2): small tasks
                 are expected to gain, large ones to lose little.
parse_transfer   parse_en alone, with image_fashion, and with every prepared task (paper,
                 table 4: parsing gains from image classification).
ablations        --tasks jointly with every block, without mixture-of-experts
                 (`model.use_moe=False`) and without attention (`model.use_attention=False`)
                 (paper, table 3).
sampling         --tasks jointly with each mixture (uniform, proportional, temperature,
                 adaptive; the weights of data.weights are dropped) and with GradNorm loss
                 weighting (the all-tasks step, which trains every task in each step: S steps).
                 The uniform run is the joint run of joint_vs_single, shared; --variants
                 picks some of uniform, proportional, temperature, adaptive, gradnorm.

`--lr_schedule task` runs the joint runs with `train.lr_schedule="task"`: the noam schedule counts
each task's own steps, so a task trained jointly follows the learning rates it has alone (with
the run's schedule, a task of a T-task run passes its warm-up after warmup / T of its own steps
and ends at a lower rate). Its joint runs are named NAME-task_lr and its tables go to
OUT/EXPERIMENT-task_lr/; single-task runs are shared, as both schedules train them alike.

Writes OUT/EXPERIMENT/results.md (mean ± standard deviation over the seeds), results.json (every
run's metrics) and PNG plots: learning curves and per-task gains for joint_vs_single, the task
metric per variant for the others; expert load per task is in each joint run's plots/ folder.
"""

import argparse
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import time

from experiments import common

EXPERIMENTS = ("joint_vs_single", "parse_transfer", "ablations", "sampling")
DEFAULT_TASKS = {"joint_vs_single": "all", "parse_transfer": "parse_en",
                 "ablations": "image_mnist5k,translate_en_de", "sampling": "all"}
MIXTURES = ("uniform", "proportional", "temperature", "adaptive")
SAMPLING_VARIANTS = MIXTURES + ("gradnorm",)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("experiment", choices=EXPERIMENTS)
  p.add_argument("--tasks", default="",
                 help="comma-separated tasks, or 'all' (every prepared embedded task); "
                      f"default per experiment: {DEFAULT_TASKS}")
  p.add_argument("--steps", type=int, default=300, help="S: steps per task")
  p.add_argument("--warmup", type=int, default=100, help="warm-up steps of every run")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--config", default="tiny", help="tiny | default | paper")
  p.add_argument("--out", default="runs/findings")
  p.add_argument("--eval_examples", type=int, default=200, help="per task, of the test split")
  p.add_argument("--lr_schedule", choices=("global", "task"), default="global",
                 help="what the joint runs' schedule counts: the run's steps or each task's")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="config override of every run, e.g. --set model.dropout=0.1")
  p.add_argument("--variants", default=",".join(SAMPLING_VARIANTS),
                 help="sampling only: which of the task weightings to run")
  p.add_argument("--quick", action="store_true",
                 help="tiny model, 4 steps, 1 seed: checks the path")
  args = p.parse_args(argv)
  if args.quick:
    args.steps, args.warmup, args.seeds, args.eval_examples = 4, 2, "0", 8
  args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = sorted(set(args.variants) - set(SAMPLING_VARIANTS))
  if unknown or not args.variants:
    p.error(f"--variants: unknown {unknown}; valid: {','.join(SAMPLING_VARIANTS)}")
  if args.steps <= 0 or not args.seeds:
    p.error("--steps must be positive and --seeds name at least one seed")
  return args


def task_names(spec: str) -> list[str]:
  from data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel

  if spec == "all":
    names = [t.name for t in tasks_lib.installed_tasks()]
    if not names:
      raise SystemExit("No embedded task is prepared: run `python -m data.prepare` first")
    return names
  names = [n.strip() for n in spec.split(",") if n.strip()]
  for name in names:
    tasks_lib.get(name)  # An unknown name fails here, listing the registered ones.
  return names


# ---------------------------------------------------------------------------------------------
# The runs of each experiment: (name, tasks, overrides); steps are T * S unless overridden.

def planned_runs(experiment: str, tasks: list[str],
                 variants=SAMPLING_VARIANTS) -> list[tuple[str, list[str], dict]]:
  joint = "joint-all" if tasks == task_names("all") else "joint-" + "+".join(tasks)
  if experiment == "joint_vs_single":
    return [(f"single-{t}", [t], {}) for t in tasks] + [(joint, tasks, {})]
  if experiment == "parse_transfer":
    everything = task_names("all")
    return [("single-parse_en", ["parse_en"], {}),
            ("joint-parse_en+image_fashion", ["image_fashion", "parse_en"], {}),
            ("joint-all", everything, {})]
  if experiment == "ablations":
    return [(joint, tasks, {}),
            (f"{joint}-no_moe", tasks, {"model.use_moe": False}),
            (f"{joint}-no_attention", tasks, {"model.use_attention": False})]
  if experiment == "sampling":
    # Uniform sampling is the plain joint run (the one of joint_vs_single and ablations).
    runs = {"uniform": (joint, tasks, {}),
            "gradnorm": (f"{joint}-gradnorm", tasks, {"train.step_mode": "all_tasks",
                                                      "train.loss_weighting": "gradnorm"})}
    return [runs.get(v, (f"{joint}-{v}", tasks, {"data.mixture": v})) for v in variants]
  raise ValueError(f"unknown experiment {experiment!r}; valid: {EXPERIMENTS}")


def run_config(args, tasks: list[str], overrides: dict, seed: int):
  config = common.load_config(args.config, args.quick, args.set)
  all_tasks_step = overrides.get("train.step_mode") == "all_tasks"
  common.apply(config, dict(
      data=dict(tasks=",".join(tasks), mixture="uniform", weights=""),
      train=dict(seed=seed, steps=args.steps if all_tasks_step else args.steps * len(tasks),
                 warmup_steps=args.warmup, eval_split="test", eval_max_examples=args.eval_examples,
                 log_every=10, checkpoint_every=0, keep_checkpoints=1, plot=len(tasks) > 1)))
  for dotted, value in overrides.items():
    common.override(config, dotted, value)
  config.lock()
  return config


def with_task_schedule(plan):
  """The plan with its joint runs on the per-task schedule (single runs are the same either way)."""
  return [(f"{name}-task_lr", run_tasks, {**overrides, "train.lr_schedule": "task"})
          if len(run_tasks) > 1 else (name, run_tasks, overrides)
          for name, run_tasks, overrides in plan]


# ---------------------------------------------------------------------------------------------
# Tables.

def metric_names(task_list) -> dict[str, list[str]]:
  """Per task: log-perplexity, token accuracy (not for labels) and its headline metric."""
  out = {}
  for task in task_list:
    names = ["log_perplexity"] + ([] if task.target_modality == "label" else ["token_accuracy"])
    out[task.name] = names + [common.headline_metric(task)]
  return out


def values(rows, run: str, task: str, metric: str) -> list[float]:
  return [r["metrics"][task][metric] for r in rows
          if r["run"] == run and task in r["metrics"] and metric in r["metrics"][task]]


def gain_values(rows, run: str, base: str, task: str, metric: str) -> list[float]:
  """Per seed: sign * (run - base), positive when `run` is better."""
  by = {(r["run"], r["seed"]): r["metrics"].get(task, {}).get(metric) for r in rows}
  return [common.better_sign(metric) * (by[run, s] - by[base, s])
          for (name, s) in by if name == run and by[run, s] is not None
          and by.get((base, s)) is not None]


def joint_vs_single_table(rows, plan, metrics: dict) -> str:
  joint = plan[-1][0]
  lines = ["| task | metric | alone | jointly | gain (jointly - alone, per seed) |",
           "|---|---|---|---|---|"]
  for task, names in metrics.items():
    for metric in names:
      alone = f"single-{task}"
      lines.append(f"| {task} | {metric} | {common.cell(values(rows, alone, task, metric))} | "
                   f"{common.cell(values(rows, joint, task, metric))} | "
                   f"{common.cell(gain_values(rows, joint, alone, task, metric))} |")
  return "\n".join(lines)


def variants_table(rows, plan, metrics: dict, reported: list[str], labels: dict[str, str]) -> str:
  """One row per (reported task, metric), one column per run of the plan (named by `labels`),
  then the gains over the first run."""
  names = [name for name, _, _ in plan]
  heads = [labels[name] for name in names]
  lines = ["| task | metric | " + " | ".join(heads) + " | "
           + " | ".join(f"{head} - {heads[0]}" for head in heads[1:]) + " |",
           "|---|---|" + "---|" * (2 * len(names) - 1)]
  for t in reported:
    for m in metrics[t]:
      cells = [common.cell(values(rows, name, t, m)) for name in names]
      cells += [common.cell(gain_values(rows, name, names[0], t, m)) for name in names[1:]]
      lines.append(f"| {t} | {m} | " + " | ".join(cells) + " |")
  lines += ["", "Runs: " + ", ".join(f"{head} = `{name}`" for head, name in zip(heads, names))
            + f". Gains are per seed against `{names[0]}`; positive is better."]
  return "\n".join(lines)


def short_names(names: list[str], plain: str = "joint") -> list[str]:
  """The run names without the prefix they all share, cut at a "-" (`plain` for the run that is
  that prefix): ["joint-a+b", "joint-a+b-no_moe"] -> ["joint", "no_moe"]."""
  prefix = os.path.commonprefix(names) if len(names) > 1 else ""
  if not (prefix.endswith("-") or all(n == prefix or n[len(prefix)] == "-" for n in names)):
    prefix = prefix[:prefix.rfind("-") + 1]
  return [n[len(prefix):].lstrip("-") or plain for n in names]


def averages_table(rows, plan, tasks: list[str], labels: dict[str, str]) -> str:
  """Per run (named by `labels`): log-perplexity and token accuracy averaged over the tasks,
  seed by seed."""
  lines = ["| run | mean log-perplexity | mean token accuracy |", "|---|---|---|"]
  for name, _, _ in plan:
    per_seed = {}
    for r in rows:
      if r["run"] == name and all(t in r["metrics"] for t in tasks):
        per_seed[r["seed"]] = [sum(r["metrics"][t][m] for t in tasks) / len(tasks)
                               for m in ("log_perplexity", "token_accuracy")]
    lines.append(f"| {labels[name]} | {common.cell([v[0] for v in per_seed.values()])} | "
                 f"{common.cell([v[1] for v in per_seed.values()])} |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots.

def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def task_curve(workdir: pathlib.Path, task: str) -> tuple[list[float], list[float]]:
  """(steps of `task`, its training loss): a joint run's steps are counted by the task's rate."""
  from multimodel import writer  # pylint: disable=import-outside-toplevel

  xs, ys, seen, last = [], [], 0.0, 0
  for record in writer.read(workdir):
    rate = record.get("mixture", {}).get(task, 1.0)
    seen += (record["step"] - last) * rate
    last = record["step"]
    if task in record.get("loss", {}):
      xs.append(seen)
      ys.append(record["loss"][task])
  return xs, ys


def plot_curves(out_dir: pathlib.Path, rows, plan, tasks: list[str]) -> pathlib.Path:
  plt = _pyplot()
  cols = min(4, len(tasks))
  nrows = math.ceil(len(tasks) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
  joint = plan[-1][0]
  for ax, task in zip(axes.flat, tasks):
    for run, color in ((f"single-{task}", "tab:blue"), (joint, "tab:red")):
      for i, r in enumerate(x for x in rows if x["run"] == run):
        xs, ys = task_curve(pathlib.Path(r["workdir"]), task)
        ax.plot(xs, ys, color=color, alpha=0.7, lw=1,
                label=("alone" if run != joint else "jointly") if i == 0 else None)
    ax.set_title(task, fontsize=9)
    ax.set_yscale("log")
    ax.set_xlabel("steps of this task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  fig.suptitle("Training loss per task, alone against jointly (one line per seed)")
  fig.tight_layout()
  path = out_dir / "learning_curves.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_bars(out_dir: pathlib.Path, name: str, labels: list[str], series: dict[str, list[list]],
              ylabel: str, title: str) -> pathlib.Path:
  """One panel per label (their units differ), one bar per series (mean and sd over seeds)."""
  plt = _pyplot()
  cols = min(4, len(labels))
  nrows = math.ceil(len(labels) / cols)
  size = (max(3.2 * cols, 5), 3.2 * nrows + 0.3 * len(series))
  fig, axes = plt.subplots(nrows, cols, figsize=size, squeeze=False)
  colors = [f"C{i}" for i in range(len(series))]
  for j, (ax, label) in enumerate(zip(axes.flat, labels)):
    stats = [common.mean_std(per_label[j]) for per_label in series.values()]
    ax.bar(range(len(series)), [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3,
           color=colors)
    ax.set_xticks([])
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.set_title(label, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  for ax in list(axes.flat)[len(labels):]:
    ax.axis("off")
  for row in axes:
    row[0].set_ylabel(ylabel, fontsize=8)
  bottom = 0.0
  if len(series) > 1:
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=c) for c in colors], list(series),
               loc="lower center", ncol=1, fontsize=8)
    bottom = 0.06 * len(series) / nrows
  fig.suptitle(title)
  fig.tight_layout(rect=(0, bottom, 1, 1))
  path = out_dir / f"{name}.png"
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  from data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel

  tasks = task_names(args.tasks or DEFAULT_TASKS[args.experiment])
  if args.experiment in ("joint_vs_single", "ablations", "sampling") and len(tasks) < 2:
    raise SystemExit(f"{args.experiment} trains tasks jointly: --tasks needs two or more")
  plan = planned_runs(args.experiment, tasks, args.variants)
  if args.lr_schedule == "task":
    plan = with_task_schedule(plan)
  reported = ["parse_en"] if args.experiment == "parse_transfer" else tasks
  metrics = metric_names([tasks_lib.get(t) for t in reported])
  out = pathlib.Path(args.out).absolute()
  out_dir = out / (args.experiment + ("-task_lr" if args.lr_schedule == "task" else ""))
  out_dir.mkdir(parents=True, exist_ok=True)

  rows = []
  for seed in args.seeds:
    for name, run_tasks, overrides in plan:
      workdir = out / "runs" / f"{name}-s{seed}"
      config = run_config(args, run_tasks, overrides, seed)
      start = time.time()
      result = common.run(config, workdir)
      rows.append({"run": name, "seed": seed, "workdir": str(workdir),
                   "steps": config.train.steps, "metrics": result})
      shown = ", ".join(f"{t} {m}={result[t][m]:.3f}" for t in reported if t in result
                        for m in metrics[t][-1:])
      print(f"{name} seed={seed} ({config.train.steps} steps, {time.time() - start:.0f} s): "
            f"{shown}", flush=True)

  seeds = ", ".join(map(str, args.seeds))
  drawn = ("tasks drawn by the run's mixture; GradNorm: S all-tasks steps"
           if args.experiment == "sampling" else "tasks drawn uniformly")
  head = (f"`python -m experiments.findings {' '.join(argv if argv is not None else sys.argv[1:])}`"
          f"\n\nConfig `{args.config}`, S = {args.steps} steps per task (a run of T tasks: T * S "
          f"steps, {drawn}), warm-up {args.warmup} "
          f"{'of each task (per-task schedule)' if args.lr_schedule == 'task' else 'steps'}; "
          f"first {args.eval_examples} test "
          f"examples of each task; mean ± standard deviation over seeds {seeds}.\n")
  plots = []
  if args.experiment == "joint_vs_single":
    table = joint_vs_single_table(rows, plan, metrics)
    plots.append(plot_curves(out_dir, rows, plan, tasks))
    shown = [(t, m) for t in tasks for m in (metrics[t][-1], "log_perplexity")]
    plots.append(plot_bars(
        out_dir, "gain_per_task", [f"{t}\n{m}" for t, m in shown],
        {"jointly - alone": [gain_values(rows, plan[-1][0], f"single-{t}", t, m)
                             for t, m in shown]},
        "gain, jointly - alone (positive: better)", "Joint training against alone, per seed"))
    first_joint = next(r for r in rows if r["run"] == plan[-1][0])
    experts = pathlib.Path(first_joint["workdir"]) / "plots" / "expert_load.png"
    if experts.exists():
      plots.append(pathlib.Path(shutil.copy(experts, out_dir / "expert_load_joint.png")))
  else:
    names = [name for name, _, _ in plan]
    labels = dict(zip(names, short_names(names, "uniform" if args.experiment == "sampling"
                                         else "joint")))
    table = variants_table(rows, plan, metrics, reported, labels)
    if args.experiment == "sampling":
      table += "\n\nAverages over the tasks:\n\n" + averages_table(rows, plan, tasks, labels)
    plots.append(plot_bars(
        out_dir, "metric_per_run", [f"{t} {metrics[t][-1]}" for t in reported],
        {labels[name]: [values(rows, name, t, metrics[t][-1]) for t in reported]
         for name, _, _ in plan}, "task metric", args.experiment))
  text = head + "\n" + table + "\n\nPlots: " + ", ".join(p.name for p in plots) + "\n"
  (out_dir / "results.md").write_text(text)
  (out_dir / "results.json").write_text(json.dumps(
      {"experiment": args.experiment, "config": args.config, "steps_per_task": args.steps,
       "seeds": args.seeds, "eval_examples": args.eval_examples, "runs": rows}, indent=1) + "\n")
  print("\n" + text, flush=True)
  print(f"Written: {out_dir / 'results.md'}, {out_dir / 'results.json'}, "
        + ", ".join(str(p) for p in plots))
  return {"rows": rows, "table": text}


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
