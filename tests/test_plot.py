"""The plots of runs: `python -m multimodel.plot --compare` over hand-written metrics."""

import json

import numpy as np
import pytest

from multimodel import plot


def write_run(workdir, curves):
  """metrics.jsonl with {task: [values by log step]} as log-perplexity every 10 steps."""
  workdir.mkdir(parents=True)
  steps = len(next(iter(curves.values())))
  with open(workdir / "metrics.jsonl", "w") as f:
    for i in range(steps):
      f.write(json.dumps({"step": 10 * (i + 1),
                          "log_perplexity": {t: v[i] for t, v in curves.items()}}) + "\n")
  return workdir


def test_smooth_is_a_trailing_mean():
  np.testing.assert_allclose(plot._smooth([1.0, 3.0, 5.0, 7.0], 2), [1.0, 2.0, 4.0, 6.0])


def test_compare_draws_every_task_of_every_run(tmp_path):
  a = write_run(tmp_path / "a", {"parse_en": [5.0, 4.0, 3.0], "image_mnist5k": [2.3, 2.0, 1.5]})
  b = write_run(tmp_path / "b", {"parse_en": [5.0, 4.5, 4.0]})
  out = tmp_path / "plots" / "cmp.png"
  assert plot.main(["--compare", str(out), str(a), str(b)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
  a = write_run(tmp_path / "a", {"parse_en": [5.0]})
  assert plot.main(["--compare", str(tmp_path / "x.png"), str(a), str(tmp_path / "nope")]) == 2
  assert "nope/metrics.jsonl does not exist" in capsys.readouterr().err
  assert plot.main(["--compare", str(tmp_path / "x.png")]) == 2
  with pytest.raises(ValueError, match="logged 'accuracy'"):
    plot.plot_compare([a], tmp_path / "y.png", key="accuracy")
