"""experiments/ctc_rescoring.py: the CTC head's greedy letters and N-best rescoring (tiny run)."""

import json

import numpy as np
import pytest

from experiments import ctc_rescoring
from multimodel import trainer
from tests import tiny_data
from tests.test_train import small_config


def test_letters():
  assert ctc_rescoring.letters("Press 1, then 'Enter'!") == "pressthen'enter'"


def _run(tmp_path, monkeypatch, eval_max_examples=-1, train=None, **model):
  """A 2-step run of speech_en alone on the tiny data; `train` and `model` update the config."""
  tiny_data.use(monkeypatch)
  config = small_config(steps=2, eval_max_examples=eval_max_examples, **(train or {}))
  with config.unlocked():
    config.data.tasks = "speech_en"
    config.data.weights = ""
    config.data.text_buckets = (64,)
    config.data.tokens_per_batch = 256
    config.model.audio.conv_filters = 8
    config.model.update(model)
  trainer.train_and_evaluate(config, tmp_path, progress=False)
  return tmp_path


@pytest.mark.parametrize("units", ["chars", "chars_and_spaces"])
def test_rescoring_picks_by_the_weighted_sum(tmp_path, monkeypatch, units):
  workdir = _run(tmp_path, monkeypatch, eval_max_examples=4, ctc_weight=0.3, ctc_units=units)
  # The run's own evaluation scores the CTC head's transcripts when the head writes spaces.
  final = json.loads((workdir / "eval" / "speech_en-test.json").read_text())
  assert ("ctc_wer" in final and "ctc_cer" in final) == (units == "chars_and_spaces")
  if units == "chars_and_spaces":
    assert final["ctc_wer"] >= 0 and all("ctc_prediction" in d for d in final["decoded"])
  result = ctc_rescoring.run(str(workdir), "speech_en", "test", beam_size=3, max_examples=6,
                             weights=[0.0, 1.0])
  assert result["examples"] == 6
  assert set(result["rows"]) == {"greedy", "ctc_greedy", "beam3_ctc0", "beam3_ctc1"}
  for row in result["rows"].values():
    assert all(np.isfinite(v) and v >= 0 for v in row.values())
  for i, out in enumerate(result["_outputs"]):
    assert len(out["hypotheses"]) == 3
    ctc = np.asarray(out["ctc_logp"])
    assert (ctc[np.isfinite(ctc)] <= 1e-4).all()  # Log-likelihoods.
    finite = np.isfinite(out["decoder_logp"])
    best_decoder = int(np.argmax(np.where(finite, out["decoder_logp"], -np.inf)))
    best_ctc = int(np.argmax(np.where(finite, ctc, -np.inf)))
    assert result["_picked"][0.0][i] == out["hypotheses"][best_decoder]
    assert result["_picked"][1.0][i] == out["hypotheses"][best_ctc]


def test_a_run_without_a_letter_ctc_head_is_refused(tmp_path, monkeypatch):
  workdir = _run(tmp_path, monkeypatch, ctc_weight=0.0)
  with pytest.raises(ValueError, match="no CTC head over letters.*ctc_weight=0.0"):
    ctc_rescoring.run(str(workdir), "speech_en", "test", beam_size=2, max_examples=2,
                      weights=[0.0])
