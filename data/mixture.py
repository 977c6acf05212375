"""Joint sampling over tasks: which task trains at each step, and the exact-resume state of it all.

Strategies give each task a rate, multiplied by its weight (`Task.weight`, or the `weights` given):
  uniform       rate = 1
  proportional  rate = n (training examples of the task)
  temperature   rate = n ** (1 / T)  (T = 1 is proportional, T -> inf uniform; T5 and mT5 use this)
  adaptive      rate = exp(recent loss / tau), the loss an exponential moving average of what
                the trainer reports with `report_loss` (tensor2tensor's loss-based mixing); a
                task with no loss reported yet counts as the highest reported average, so every
                task is tried.
Modes:
  "one_task"    each step draws one task with probability rate / sum (the paper's way) and yields
                (task name, batch);
  "all_tasks"   each step yields {task name: batch} of every task; the trainer weights each task's
                loss by `probabilities()` (the weighted multi-task step), or by GradNorm's
                learned weights with `train.loss_weighting=gradnorm`.
The draw of step k depends only on (seed, k) and the rates, so the state is the step count, the loss
averages and every task iterator's state: a small JSON-serialisable dict.
"""

from collections.abc import Iterator, Mapping, Sequence
import math
from typing import Any

import numpy as np

from data import tasks as tasks_lib
from data.buckets import InputConfig
from data.pipeline import Batch, TaskIterator
from data.tasks import Task
from data.tokenizer import Tokenizer

STRATEGIES = ("uniform", "proportional", "temperature", "adaptive")
MODES = ("one_task", "all_tasks")
_MIXTURE_STREAM = 0x6D6978  # Keeps the task draws apart from the iterators' permutations.


def rates(sizes: Mapping[str, int], strategy: str, *, weights: Mapping[str, float] | None = None,
          temperature: float = 2.0, losses: Mapping[str, float | None] | None = None,
          tau: float = 1.0) -> dict[str, float]:
  """Sampling probabilities of the tasks named in `sizes` (they sum to 1)."""
  names = list(sizes)
  if strategy == "uniform":
    raw = [1.0] * len(names)
  elif strategy == "proportional":
    raw = [float(sizes[n]) for n in names]
  elif strategy == "temperature":
    if temperature <= 0:
      raise ValueError(f"temperature must be > 0, got {temperature}")
    raw = [float(sizes[n]) ** (1.0 / temperature) for n in names]
  elif strategy == "adaptive":
    if tau <= 0:
      raise ValueError(f"tau must be > 0, got {tau}")
    known = [v for v in (losses or {}).values() if v is not None]
    fallback = max(known) if known else 0.0
    averages = [(losses or {}).get(n) for n in names]
    averages = [fallback if a is None else a for a in averages]
    top = max(averages)
    raw = [math.exp((a - top) / tau) for a in averages]  # Shifted: no overflow.
  else:
    raise ValueError(f"Unknown mixing strategy {strategy!r}; valid strategies: {STRATEGIES}")
  raw = [r * (1.0 if weights is None else float(weights.get(n, 1.0))) for r, n in zip(raw, names)]
  total = sum(raw)
  if total <= 0:
    raise ValueError(f"Every task has a zero sampling weight: {dict(zip(names, raw))}")
  return {n: r / total for n, r in zip(names, raw)}


def draw(probabilities: Mapping[str, float], seed: int, step: int) -> str:
  """The task of step `step`: a deterministic function of (seed, step) and the probabilities."""
  u = np.random.default_rng([seed, _MIXTURE_STREAM, step]).random()
  names = list(probabilities)
  cumulative = np.cumsum([probabilities[n] for n in names])
  return names[min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")),
                   len(names) - 1)]


class Mixture:
  """Batches of several tasks sampled by a strategy; exactly resumable (see the module doc)."""

  def __init__(self, tasks: Sequence[Task | str], tokenizer: Tokenizer | None,
               config: InputConfig = InputConfig(), *, strategy: str = "proportional",
               mode: str = "one_task", temperature: float = 2.0, tau: float = 1.0,
               loss_decay: float = 0.9, weights: Mapping[str, float] | None = None, seed: int = 0,
               iterators: Mapping[str, TaskIterator] | None = None, train_examples: int = 0):
    """Opens a training iterator per task.

    Args:
      tasks: tasks or task names (unknown names fail with the list of valid ones).
      tokenizer: the shared tokenizer (None only when no task has text).
      config: input pipeline settings.
      strategy: one of `STRATEGIES`.
      mode: one of `MODES`.
      temperature: T of the temperature strategy.
      tau: temperature of the adaptive strategy.
      loss_decay: weight of the previous average in the adaptive strategy's moving average.
      weights: per-task multipliers of the rates, by name (default: each task's `weight`);
        entries for registered tasks outside this mixture are ignored.
      seed: seeds the task draws and every iterator's epoch permutations.
      iterators: ready iterators by task name (tests, custom sources); the others are opened.
      train_examples: > 0: the opened iterators train on the first `train_examples` examples of
        their task's train split only (`sizes` then counts those).
    """
    tasks_lib.resolve([t for t in tasks if not isinstance(t, Task)])  # Fails on unknown names.
    resolved = [t if isinstance(t, Task) else tasks_lib.get(t) for t in tasks]
    if not resolved:
      raise ValueError("A mixture needs at least one task")
    names = [t.name for t in resolved]
    if len(set(names)) != len(names):
      raise ValueError(f"Duplicate tasks in mixture: {names}")
    if mode not in MODES:
      raise ValueError(f"Unknown mixture mode {mode!r}; valid modes: {MODES}")
    if strategy not in STRATEGIES:
      raise ValueError(f"Unknown mixing strategy {strategy!r}; valid strategies: {STRATEGIES}")
    # Weights of registered tasks that this mixture lacks are ignored (a config's weights apply to
    # whichever of its tasks are installed); a name that is no task at all is a typo.
    unknown = set(weights or {}) - set(names) - set(tasks_lib.TASKS)
    if unknown:
      raise KeyError(f"Weights for tasks not in the mixture: {sorted(unknown)}; tasks: {names}")
    self.tasks = {t.name: t for t in resolved}
    self.strategy, self.mode, self.seed = strategy, mode, seed
    self.temperature, self.tau, self.loss_decay = temperature, tau, loss_decay
    self.weights = {n: float((weights or {}).get(n, t.weight)) for n, t in self.tasks.items()}
    iterators = dict(iterators or {})
    self.iterators = {
        n: iterators.get(n) or TaskIterator(t, tokenizer, config, seed=seed,
                                            max_examples=train_examples)
        for n, t in self.tasks.items()
    }
    self.sizes = {n: it.size for n, it in self.iterators.items()}
    self.step = 0
    self.losses: dict[str, float | None] = {n: None for n in self.tasks}

  def probabilities(self) -> dict[str, float]:
    """Current sampling probabilities (the loss weights of the all-tasks mode)."""
    return rates(self.sizes, self.strategy, weights=self.weights, temperature=self.temperature,
                 losses=self.losses, tau=self.tau)

  def report_loss(self, task: str, loss: float) -> None:
    """Feeds the adaptive strategy: the trainer reports each task's training loss."""
    if task not in self.losses:
      raise KeyError(f"Task {task!r} is not in this mixture: {list(self.tasks)}")
    loss = float(loss)
    if not math.isfinite(loss):
      return
    previous = self.losses[task]
    self.losses[task] = loss if previous is None else (
        self.loss_decay * previous + (1.0 - self.loss_decay) * loss)

  def __iter__(self) -> Iterator[tuple[str, Batch] | dict[str, Batch]]:
    return self

  def __next__(self) -> tuple[str, Batch] | dict[str, Batch]:
    if self.mode == "all_tasks":
      out = {n: next(it) for n, it in self.iterators.items()}
    else:
      name = draw(self.probabilities(), self.seed, self.step)
      out = (name, next(self.iterators[name]))
    self.step += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: step, loss averages, every task iterator's state."""
    return {
        "step": self.step,
        "losses": dict(self.losses),
        "tasks": {n: it.get_state() for n, it in self.iterators.items()},
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state` result of a mixture of the same tasks."""
    if set(state["tasks"]) != set(self.iterators):
      raise ValueError(f"Mixture state of tasks {sorted(state['tasks'])} does not fit this mixture "
                       f"of {sorted(self.iterators)}")
    self.step = int(state["step"])
    self.losses = {n: (None if state["losses"].get(n) is None else float(state["losses"][n]))
                   for n in self.tasks}
    for name, it in self.iterators.items():
      it.set_state(state["tasks"][name])

