"""Plots of a run: `python -m multimodel.plot WORKDIR` writes PNGs into WORKDIR/plots.

- `loss_per_task.png`: training loss of each task against the step.
- `expert_load.png`: which experts each task uses (mean load per expert, one heatmap per MoE layer).

Runs side by side: `python -m multimodel.plot --compare OUT.png WORKDIR [WORKDIR ...]` draws one
panel per task with each run's training log-perplexity (smoothed over a few log steps).
"""

import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from multimodel import writer  # noqa: E402


def plot_losses(records: list[dict], out: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(8, 5))
  tasks = sorted({t for r in records for t in r.get("loss", {})})
  for task in tasks:
    points = [(r["step"], r["loss"][task]) for r in records if task in r.get("loss", {})]
    if points:
      ax.plot(*zip(*points), label=task)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (label-smoothed)")
  ax.set_yscale("log")
  ax.set_title("Loss per task")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = out / "loss_per_task.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def expert_load_matrix(records: list[dict]) -> dict[str, tuple[list[str], np.ndarray]]:
  """{layer: (tasks, [tasks, E] mean load)} over every record of the run."""
  sums: dict[str, dict[str, np.ndarray]] = {}
  counts: dict[str, dict[str, int]] = {}
  for r in records:
    for task, layers in r.get("expert_load", {}).items():
      for layer, load in layers.items():
        sums.setdefault(layer, {}).setdefault(task, 0.0)
        sums[layer][task] = sums[layer][task] + np.asarray(load)
        counts.setdefault(layer, {}).setdefault(task, 0)
        counts[layer][task] += 1
  out = {}
  for layer, per_task in sums.items():
    tasks = sorted(per_task)
    out[layer] = tasks, np.stack([per_task[t] / counts[layer][t] for t in tasks])
  return out


def plot_expert_load(records: list[dict], out: pathlib.Path) -> pathlib.Path | None:
  matrices = expert_load_matrix(records)
  if not matrices:
    return None
  fig, axes = plt.subplots(1, len(matrices), figsize=(6 * len(matrices), 1 + 0.5 * max(
      len(t) for t, _ in matrices.values())), squeeze=False)
  for ax, (layer, (tasks, m)) in zip(axes[0], sorted(matrices.items())):
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_xticks(range(m.shape[1]))
    ax.set_xlabel("expert")
    ax.set_title(f"{layer} MoE: share of routed tokens")
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  path = out / "expert_load.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _smooth(values: list[float], window: int) -> np.ndarray:
  """Trailing mean over `window` points (fewer at the start)."""
  v = np.asarray(values, float)
  c = np.cumsum(np.concatenate([[0.0], v]))
  lo = np.maximum(np.arange(1, len(v) + 1) - window, 0)
  return (c[1:] - c[lo]) / (np.arange(1, len(v) + 1) - lo)


def plot_compare(workdirs: list[str | pathlib.Path], path: str | pathlib.Path, *,
                 key: str = "log_perplexity", window: int = 4) -> pathlib.Path:
  """One panel per task, one curve per run (labelled by its folder name) of `key` by step."""
  runs = {pathlib.Path(w).name: writer.read(w) for w in workdirs}
  tasks = sorted({t for records in runs.values() for r in records for t in r.get(key, {})})
  if not tasks:
    raise ValueError(f"none of {[str(w) for w in workdirs]} logged {key!r}")
  cols = min(len(tasks), 5)
  rows = -(-len(tasks) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  for ax, task in zip(axes.flat, tasks):
    for name, records in runs.items():
      points = [(r["step"], r[key][task]) for r in records if task in r.get(key, {})]
      if points:
        steps, values = zip(*points)
        ax.plot(steps, _smooth(list(values), window), label=name, lw=1.2)
    ax.set_title(task, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=7)
  fig.supxlabel("step", fontsize=9)
  fig.supylabel(f"training {key.replace('_', ' ')}", fontsize=9)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the plots of a run's metrics.jsonl; returns their paths."""
  records = writer.read(workdir)
  out = pathlib.Path(workdir) / "plots"
  out.mkdir(parents=True, exist_ok=True)
  paths = [plot_losses(records, out), plot_expert_load(records, out)]
  return [p for p in paths if p is not None]


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  compare = argv[:1] == ["--compare"]
  workdirs = argv[2:] if compare else argv
  if (compare and len(argv) < 3) or (not compare and len(argv) != 1):
    print("usage: python -m multimodel.plot WORKDIR\n"
          "       python -m multimodel.plot --compare OUT.png WORKDIR [WORKDIR ...]", file=sys.stderr)
    return 2
  for workdir in workdirs:
    metrics = pathlib.Path(workdir) / "metrics.jsonl"
    if not metrics.exists():
      print(f"error: {metrics} does not exist (is {workdir} a training workdir?)", file=sys.stderr)
      return 2
  for path in [plot_compare(workdirs, argv[1])] if compare else plot_run(argv[0]):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
