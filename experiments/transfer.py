"""Transfer to a task the joint model never saw: fine-tuned against from scratch and frozen body.

    python -m experiments.transfer [--joint WORKDIR] [--target sentiment_reviews] \
        [--sizes 50,200,1000] [--seeds 0,1] [--steps 150] [--l2sp 0.1,0.01] [--out runs/transfer]

1. The joint model: `--joint` (a workdir or checkpoint of a run that did not train on the target),
   or else a short joint run (`--joint_steps`) on every prepared embedded task except the target
   (or `--joint_tasks`), trained into OUT/joint and reused when the script runs again.
2. For every N in `--sizes` and every seed in `--seeds`, `--steps` steps on the first N train
   examples of the target task (`data.train_examples=N`), in these variants:
     scratch   random initialisation;
     finetune  every parameter from the joint model (`--init`), all trained;
     frozen    from the joint model with the body frozen (`train.freeze=encoder/.*,mixer/.*,
               decoder/.*`): only the modality nets, the command embeddings and the heads train;
     l2spA     as finetune, plus the L2-SP penalty of alpha A, for each A in `--l2sp` (if given).
   Every run has the same model, schedule and data for a given (N, seed); runs are in
   OUT/runs/VARIANT-nN-sSEED, and a finished run is read back instead of trained again.
3. Each run is scored on the first `--eval_examples` of the target's test split with the task's
   metric (`--metric`; accuracy for classification). Written: OUT/results.md (mean and standard
   deviation over seeds per variant and N, and each variant's gain over scratch), OUT/results.json
   (every run) and OUT/transfer_gain.png; the table is printed too.

`--quick` shrinks everything (a model of width 32 without experts, 4 steps, N in 8 and 16, one
seed) to check the whole path in one to three minutes on 2 CPU cores; its numbers mean nothing.
"""

import argparse
import json
import logging
import math
import pathlib
import sys
import time

from experiments import common

VARIANTS = ("scratch", "finetune", "frozen")  # Then one "l2sp{alpha}" per --l2sp value.
BODY = "encoder/.*,mixer/.*,decoder/.*"

def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="runs/transfer", help="folder of the runs and the results")
  p.add_argument("--joint", default="", help="joint workdir or checkpoint (default: train one)")
  p.add_argument("--target", default="sentiment_reviews", help="the task the joint model never saw")
  p.add_argument("--joint_tasks", default="",
                 help="tasks of the joint run (default: every prepared embedded task but --target)")
  p.add_argument("--config", default="tiny", help="config of the runs: tiny | default | paper")
  p.add_argument("--joint_steps", type=int, default=600)
  p.add_argument("--joint_warmup", type=int, default=200)
  p.add_argument("--steps", type=int, default=150, help="steps of every run on the target")
  p.add_argument("--warmup", type=int, default=50, help="warm-up steps of the runs on the target")
  p.add_argument("--learning_rate", type=float, default=0.2, help="noam multiplier, every run")
  p.add_argument("--sizes", default="50,200,1000", help="target training examples N")
  p.add_argument("--seeds", default="0,1")
  p.add_argument("--l2sp", default="", help="comma-separated alphas > 0: one l2sp variant each")
  p.add_argument("--eval_examples", type=int, default=500, help="of the test split (0 = all)")
  p.add_argument("--metric", default="", help="default: the target task's headline metric")
  p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                 help="config override of every run, e.g. --set model.use_moe=False")
  p.add_argument("--quick", action="store_true", help="tiny settings: checks the path, fast")
  args = p.parse_args(argv)
  if args.quick:
    args.joint_steps, args.joint_warmup, args.steps, args.warmup = 4, 2, 4, 2
    args.sizes, args.seeds, args.eval_examples = "8,16", "0", 16
  args.sizes = [int(n) for n in args.sizes.split(",") if n.strip()]
  args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  args.l2sp = [float(a) for a in args.l2sp.split(",") if a.strip()]
  if any(a <= 0 for a in args.l2sp):
    p.error("--l2sp values must be > 0")
  if not args.sizes or min(args.sizes) <= 0 or not args.seeds:
    p.error("--sizes needs positive numbers and --seeds at least one seed")
  return args


# ---------------------------------------------------------------------------------------------
# Configs of the runs.

def base_config(args, joint_model=None):
  """The config every run starts from: --config, --quick, --set, and the joint run's model."""
  config = common.load_config(args.config, args.quick, args.set)
  if joint_model is not None:  # The fine-tuned runs must have the joint model's shapes.
    common.apply(config, joint_model)
  common.apply(config, dict(train=dict(learning_rate=args.learning_rate, log_every=10,
                                       checkpoint_every=0, keep_checkpoints=1, plot=False)))
  return config


def _alpha(variant: str) -> float:
  """The L2-SP coefficient of a variant: "l2sp0.01" -> 0.01, others 0."""
  return float(variant[len("l2sp"):]) if variant.startswith("l2sp") else 0.0


def _label(variant: str) -> str:
  return f"l2sp (alpha {_alpha(variant):g})" if _alpha(variant) else variant


def run_config(base, args, variant: str, n: int, seed: int):
  config = base.copy_and_resolve_references()
  with config.unlocked():
    common.apply(config, dict(
        data=dict(tasks=args.target, train_examples=n),
        train=dict(seed=seed, steps=args.steps, warmup_steps=args.warmup, eval_split="test",
                   eval_max_examples=args.eval_examples, freeze=BODY if variant == "frozen" else "",
                   l2sp=_alpha(variant))))
  config.lock()
  return config


# ---------------------------------------------------------------------------------------------
# The runs.

def joint_model(args, out: pathlib.Path) -> tuple[pathlib.Path, dict | None]:
  """The joint run's workdir (trained here unless --joint names one) and its model section."""
  from data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  from multimodel import checkpoint, trainer  # pylint: disable=import-outside-toplevel

  if args.joint:
    _, meta = checkpoint.restore_params(args.joint)
    if args.target in meta["tasks"]:
      raise SystemExit(f"The joint run {args.joint} trained on {args.target}: transfer to a task "
                       "it never saw needs a run without it")
    print(f"joint model: {args.joint} (tasks: {', '.join(meta['tasks'])})", flush=True)
    return pathlib.Path(args.joint), checkpoint.config_from_json(meta["config"]).model.to_dict()
  names = [n.strip() for n in args.joint_tasks.split(",") if n.strip()] or [
      t.name for t in tasks_lib.installed_tasks() if t.name != args.target]
  if args.target in names:
    raise SystemExit(f"--joint_tasks must not hold the target task {args.target}")
  if not names:
    raise SystemExit("No prepared embedded task besides the target: run `python -m data.prepare`")
  config = base_config(args)
  with config.unlocked():
    common.apply(config, dict(data=dict(tasks=",".join(names)),
                              train=dict(steps=args.joint_steps, warmup_steps=args.joint_warmup,
                                         eval_max_examples=-1, log_every=25,
                                         checkpoint_every=200)))
  workdir = out / "joint"
  common.same_settings(config, workdir)
  done = checkpoint.checkpoint_steps(workdir / "checkpoints")[-1:] == [args.joint_steps]
  if done:
    print(f"joint model: {workdir} ({args.joint_steps} steps on {', '.join(names)})", flush=True)
    return workdir, None
  print(f"joint model: training {args.joint_steps} steps on {', '.join(names)} in {workdir}",
        flush=True)
  start = time.time()
  trainer.train_and_evaluate(config, workdir, progress=False)
  print(f"joint model: done in {time.time() - start:.0f} s", flush=True)
  return workdir, None


def headline_metric(args, task) -> str:
  if args.metric:
    return args.metric
  return common.headline_metric(task)


# ---------------------------------------------------------------------------------------------
# The table and the plot.

def summarise(rows: list[dict], variants, sizes, metric: str) -> dict:
  """{(variant, n): (mean, std, count)} of `metric` over the seeds; std 0 for one seed."""
  out = {}
  for variant in variants:
    for n in sizes:
      values = [r["metrics"][metric] for r in rows if r["variant"] == variant and r["n"] == n
                and isinstance(r["metrics"].get(metric), (int, float))]
      if values:
        out[variant, n] = (*common.mean_std(values), len(values))
  return out


def gains(rows: list[dict], variants, sizes, metric: str) -> dict:
  """{(variant, n): (mean, std)} of the per-seed difference to scratch (better is positive)."""
  sign = common.better_sign(metric)
  by_key = {(r["variant"], r["n"], r["seed"]): r["metrics"].get(metric) for r in rows}
  out = {}
  for variant in variants:
    if variant == "scratch":
      continue
    for n in sizes:
      diffs = [sign * (by_key[variant, n, s] - by_key["scratch", n, s])
               for (v, m, s) in by_key if v == variant and m == n
               and by_key.get(("scratch", n, s)) is not None and by_key[variant, n, s] is not None]
      if diffs:
        out[variant, n] = common.mean_std(diffs)
  return out


def majority_accuracy(task, max_examples: int) -> float | None:
  """Accuracy of always answering the most frequent class on the scored test examples."""
  if task.target_modality != "label":
    return None
  from data import sources  # pylint: disable=import-outside-toplevel
  source = sources.open_split(task, "test")
  size = len(source) if max_examples <= 0 else min(max_examples, len(source))
  labels = [int(task.preprocess(source[i])["targets"]) for i in range(size)]
  return max(labels.count(c) for c in set(labels)) / size


def markdown(rows, variants, sizes, metric: str, args, joint: str, used: dict,
             majority: float | None = None) -> str:
  table = summarise(rows, variants, sizes, metric)
  gain = gains(rows, variants, sizes, metric)
  cell = lambda m, s: f"{m:.3f} ± {s:.3f}"
  head = [f"N = {n}" + (f" ({used[n]} used)" if used.get(n, n) != n else "") for n in sizes]
  lines = [f"Transfer to `{args.target}` ({metric} on the first {args.eval_examples or 'all'} test "
           f"examples; mean ± standard deviation over seeds {', '.join(map(str, args.seeds))}; "
           f"{args.steps} steps per run; joint model: `{joint}`).", "",
           "| variant | " + " | ".join(head) + " |", "|---|" + "---|" * len(sizes)]
  for variant in variants:
    values = [cell(*table[variant, n][:2]) if (variant, n) in table else "-" for n in sizes]
    lines.append(f"| {_label(variant)} | " + " | ".join(values) + " |")
  if majority is not None:
    lines += ["", f"Always answering the most frequent class scores {majority:.3f} on these "
              "test examples."]
  lines += ["", f"Gain over scratch ({metric}, per seed, then mean ± standard deviation; "
            "positive is better):", "", "| variant | " + " | ".join(head) + " |",
            "|---|" + "---|" * len(sizes)]
  for variant in variants:
    if variant != "scratch":
      values = [cell(*gain[variant, n]) if (variant, n) in gain else "-" for n in sizes]
      lines.append(f"| {_label(variant)} | " + " | ".join(values) + " |")
  return "\n".join(lines) + "\n"


def plot(rows, variants, sizes, metric: str, path: pathlib.Path, target: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  gain = gains(rows, variants, sizes, metric)
  fig, ax = plt.subplots(figsize=(6, 4))
  for variant in variants:
    points = [(n, *gain[variant, n]) for n in sizes if (variant, n) in gain]
    if points:
      n, mean, std = zip(*points)
      ax.errorbar(n, mean, yerr=std, marker="o", capsize=3, label=_label(variant))
  ax.axhline(0.0, color="gray", lw=0.8)
  ax.set_xscale("log")
  ax.set_xticks(sizes, [str(n) for n in sizes])
  ax.set_xlabel(f"training examples of {target}")
  ax.set_ylabel(f"{metric} gain over scratch")
  ax.set_title("Transfer from the joint model (mean and sd over seeds)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
  args = parse_args(argv)
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
  from data import tasks as tasks_lib  # pylint: disable=import-outside-toplevel

  target = tasks_lib.get(args.target)
  metric = headline_metric(args, target)
  out = pathlib.Path(args.out).absolute()
  out.mkdir(parents=True, exist_ok=True)
  joint_dir, joint_model_cfg = joint_model(args, out)
  base = base_config(args, joint_model_cfg)
  variants = list(VARIANTS) + [f"l2sp{alpha:g}" for alpha in args.l2sp]
  from data import sources  # pylint: disable=import-outside-toplevel
  train_size = len(sources.open_split(target, "train"))
  used = {n: min(n, train_size) for n in args.sizes}  # A smaller split is used whole.

  rows = []
  for n in args.sizes:
    for seed in args.seeds:
      for variant in variants:
        workdir = out / "runs" / f"{variant}-n{n}-s{seed}"
        start = time.time()
        metrics = common.run(run_config(base, args, variant, n, seed), workdir,
                             None if variant == "scratch" else str(joint_dir))[args.target]
        rows.append({"variant": variant, "n": n, "seed": seed, "workdir": str(workdir),
                     "metrics": metrics})
        value = metrics.get(metric, math.nan)
        print(f"{variant:>8}  N={n:<5} seed={seed}  {metric}={value:.4f}  "
              f"({time.time() - start:.0f} s)", flush=True)

  majority = majority_accuracy(target, args.eval_examples) if metric == "accuracy" else None
  text = markdown(rows, variants, args.sizes, metric, args, str(joint_dir), used, majority)
  (out / "results.md").write_text(text)
  (out / "results.json").write_text(json.dumps(
      {"target": args.target, "metric": metric, "joint": str(joint_dir), "steps": args.steps,
       "sizes": args.sizes, "seeds": args.seeds, "examples_used": used,
       "majority_class_accuracy": majority, "runs": rows},
      indent=1) + "\n")
  plot(rows, variants, args.sizes, metric, out / "transfer_gain.png", args.target)
  print("\n" + text, flush=True)
  print(f"Written: {out / 'results.md'}, {out / 'results.json'}, {out / 'transfer_gain.png'}")
  return {"rows": rows, "metric": metric, "table": text}


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
