"""Mixtures: strategy rates, draw frequencies (chi-square), adaptive losses, exact resume."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from data import mixture
from data import pipeline
from data import tasks
from data import tokenizer as tokenizer_lib
from tests import tiny_data

SIZES = {"small": 100, "medium": 900, "large": 8100}
CONFIG = pipeline.InputConfig(tokens_per_batch=256, image_batch_size=8)
DRAWS = 4000


def _fake_iterators(sizes):
  """Cheap label -> label iterators of the given sizes (the mixture only needs their batches)."""
  out = {}
  for name, size in sizes.items():
    task = tasks.Task(name, "none", tasks.Fields("x", "y"), "label", "label", "to_label",
                      ("accuracy",), num_classes=2, batch_size=2)
    out[name] = pipeline.TaskIterator(task, None, CONFIG, source=[{"x": i % 2, "y": i % 2}
                                                                  for i in range(size)])
  return out


def _mixture(strategy, **kwargs):
  iterators = _fake_iterators(SIZES)
  return mixture.Mixture([it.task for it in iterators.values()], None, CONFIG, strategy=strategy,
                         iterators=iterators, **kwargs)


def test_rates_follow_each_strategy():
  uniform = mixture.rates(SIZES, "uniform")
  assert all(math.isclose(p, 1 / 3) for p in uniform.values())
  proportional = mixture.rates(SIZES, "proportional")
  assert math.isclose(proportional["large"], 8100 / 9100)
  temperature = mixture.rates(SIZES, "temperature", temperature=2.0)
  assert math.isclose(temperature["small"], 10 / (10 + 30 + 90))  # sqrt of the sizes.
  assert math.isclose(mixture.rates(SIZES, "temperature", temperature=1.0)["small"],
                      proportional["small"])
  adaptive = mixture.rates(SIZES, "adaptive", losses={"small": 3.0, "medium": 1.0, "large": None},
                           tau=2.0)
  e = [math.exp(3 / 2), math.exp(1 / 2), math.exp(3 / 2)]  # No loss yet: the highest average.
  assert math.isclose(adaptive["small"], e[0] / sum(e)) and adaptive["large"] == adaptive["small"]
  weighted = mixture.rates(SIZES, "uniform", weights={"small": 2.0, "large": 0.0})
  assert weighted == pytest.approx({"small": 2 / 3, "medium": 1 / 3, "large": 0.0})
  with pytest.raises(ValueError, match="valid strategies"):
    mixture.rates(SIZES, "greedy")


@pytest.mark.parametrize("strategy,kwargs", [
    ("uniform", {}),
    ("proportional", {}),
    ("temperature", {"temperature": 3.0}),
    ("uniform", {"weights": {"small": 3.0, "medium": 1.0, "large": 0.5}}),
])
def test_draw_frequencies_match_the_strategy(strategy, kwargs):
  probabilities = mixture.rates(SIZES, strategy, **kwargs)
  draws = [mixture.draw(probabilities, seed=1234, step=k) for k in range(DRAWS)]
  observed = np.array([draws.count(n) for n in SIZES])
  expected = np.array([probabilities[n] for n in SIZES]) * DRAWS
  assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_mixture_samples_tasks_at_the_strategy_rates():
  mix = _mixture("temperature", temperature=2.0, seed=7)
  names = [next(mix)[0] for _ in range(2000)]
  probabilities = mix.probabilities()
  observed = np.array([names.count(n) for n in SIZES])
  expected = np.array([probabilities[n] for n in SIZES]) * len(names)
  assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_adaptive_mixture_follows_reported_losses():
  mix = _mixture("adaptive", tau=0.5, loss_decay=0.5)
  assert mix.probabilities() == pytest.approx({n: 1 / 3 for n in SIZES})
  mix.report_loss("small", 4.0)
  mix.report_loss("small", 2.0)
  assert mix.losses["small"] == pytest.approx(3.0)  # 0.5 * 4 + 0.5 * 2.
  mix.report_loss("medium", 1.0)
  mix.report_loss("large", float("nan"))  # Ignored.
  p = mix.probabilities()
  assert p["small"] == pytest.approx(p["large"])  # Unreported: counts as the highest average.
  assert p["small"] / p["medium"] == pytest.approx(math.exp((3.0 - 1.0) / 0.5))
  names = [next(mix)[0] for _ in range(1000)]
  assert names.count("medium") < 0.1 * len(names)
  with pytest.raises(KeyError, match="not in this mixture"):
    mix.report_loss("other", 1.0)


def test_all_tasks_mode_yields_every_task():
  mix = _mixture("proportional", mode="all_tasks")
  step = next(mix)
  assert set(step) == set(SIZES) and all(b["inputs"].shape == (2,) for b in step.values())
  assert sum(mix.probabilities().values()) == pytest.approx(1.0)


def test_unknown_names_fail_with_the_valid_list():
  with pytest.raises(KeyError, match="nonexistent.*valid tasks: .*translate_en_fr"):
    mixture.Mixture(["image_mnist5k", "nonexistent"], None)
  with pytest.raises(ValueError, match="valid modes"):
    _mixture("uniform", mode="some_tasks")
  with pytest.raises(KeyError, match="not in the mixture"):
    _mixture("uniform", weights={"huge": 1.0})


def test_weights_of_tasks_that_are_not_installed_are_ignored():
  # The default config weights every embedded task; a machine without some of them still runs.
  mix = _mixture("uniform", weights={"small": 2.0, "image_fashion": 3.0})
  assert "image_fashion" not in mix.weights and mix.weights["small"] == 2.0


@pytest.mark.parametrize("mode,strategy", [("one_task", "adaptive"), ("all_tasks", "temperature")])
def test_resume_yields_the_same_batches_on_real_data(mode, strategy, monkeypatch):
  tiny_data.use(monkeypatch)
  tok = tokenizer_lib.Tokenizer.load()
  names = ["image_mnist5k", "translate_en_fr", "speech_en"]

  def make():
    return mixture.Mixture(names, tok, CONFIG, strategy=strategy, mode=mode, seed=11)

  def run(mix, steps):
    out = []
    for _ in range(steps):
      item = next(mix)
      out.append(item)
      for name, batch in ([item] if mode == "one_task" else item.items()):
        mix.report_loss(name, float(batch["targets"].mean()))  # Any deterministic loss.
    return out

  first = make()
  run(first, 4)
  state = json.loads(json.dumps(first.get_state()))
  expected = run(first, 5)
  resumed = make()
  resumed.set_state(state)
  got = run(resumed, 5)
  for want, have in zip(expected, got):
    want = dict([want]) if mode == "one_task" else want
    have = dict([have]) if mode == "one_task" else have
    assert set(want) == set(have)
    for name in want:
      assert all(np.array_equal(want[name][k], have[name][k]) for k in want[name])
  assert resumed.get_state() == first.get_state()
