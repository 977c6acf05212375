"""Metrics against their reference tools (sacrebleu's command line, jiwer) and hand-made cases."""

import subprocess
import sys

import jiwer
import numpy as np
import pytest

from multimodel import metrics

HYPS = ["the cat sat on a mat .", "Hello there, Kenobi!", "a completely different line",
        "it's 5 o'clock"]
REFS = ["the cat sat on the mat .", "Hello there, General Kenobi!", "one more reference line",
        "it's 5 o'clock"]


def sacrebleu_cli(metric: str, hyps, refs, tmp_path) -> float:
  """The score printed by `sacrebleu REF -i HYP -m METRIC -b` (6 decimals)."""
  (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
  (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
  out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                        str(tmp_path / "hyp.txt"), "-m", metric, "-b", "-w", "6"],
                       capture_output=True, text=True, check=True).stdout
  return float(out.strip())


@pytest.mark.parametrize("name", ["bleu", "chrf"])
def test_bleu_and_chrf_equal_the_sacrebleu_command_line(name, tmp_path):
  ours = metrics.METRICS[name](HYPS, REFS)
  assert 0.0 < ours < 100.0
  assert ours == pytest.approx(sacrebleu_cli(name, HYPS, REFS, tmp_path), abs=1e-5)
  assert metrics.METRICS[name](REFS, REFS) == pytest.approx(100.0)


def test_wer_and_cer_equal_jiwer():
  assert metrics.wer(HYPS, REFS) == pytest.approx(jiwer.wer(REFS, HYPS))
  assert metrics.cer(HYPS, REFS) == pytest.approx(jiwer.cer(REFS, HYPS))
  # By hand: one substitution in 3 words, one deletion in 2 words -> 2 / 5.
  assert metrics.wer(["a x c", "d"], ["a b c", "d e"]) == pytest.approx(0.4)
  assert metrics.cer(["abd"], ["abc"]) == pytest.approx(1 / 3)
  assert metrics.wer(REFS, REFS) == 0.0


def test_exact_match():
  assert metrics.exact_match(HYPS, REFS) == 0.25
  assert metrics.exact_match([" x "], ["x"]) == 1.0
  with pytest.raises(ValueError):
    metrics.exact_match(["x"], [])


GOLD = "(S (NP the man) (VP walks (PP in (NP the park))) .)"


def test_tree_spans():
  assert metrics.tree_spans(GOLD) == {("S", 0, 7): 1, ("NP", 0, 2): 1, ("VP", 2, 6): 1,
                                      ("PP", 3, 6): 1, ("NP", 4, 6): 1}
  for bad in ["", "the man", "(S (NP the man)", "(S (NP the man)))", "((NP x))", "(S (NP) x)",
              "(S x) (S y)", "(S x) y"]:
    assert metrics.tree_spans(bad) is None, bad


def test_bracket_f1():
  assert metrics.bracket_f1([GOLD], [GOLD]) == 1.0
  # 4 predicted spans, 3 right (S, both NP); gold has 5: P = 3/4, R = 3/5, F1 = 2/3.
  pred = "(S (NP the man) (VP walks in) (NP the park) .)"
  assert metrics.bracket_f1([pred], [GOLD]) == pytest.approx(2 / 3)
  # A malformed prediction matches nothing, but its gold spans (5) still count:
  # pooled with a perfect second sentence (2 spans): P = 2/2, R = 2/7, F1 = 4/9.
  second = "(S (NP it) rains)"
  assert metrics.bracket_f1(["(S (NP the man", second], [GOLD, second]) == pytest.approx(4 / 9)
  assert metrics.bracket_f1(["garbage"], [GOLD]) == 0.0
  # Duplicate spans (a unary chain) match as a multiset: P = 2/3, R = 2/2, F1 = 4/5.
  assert metrics.bracket_f1(["(S (S (NP x)))"], ["(S (NP x))"]) == pytest.approx(4 / 5)
  with pytest.raises(ValueError):
    metrics.bracket_f1([GOLD], ["(S"])


def test_top_k_accuracy():
  logits = np.array([[0.1, 0.5, 0.2, 0.9],   # label 1 ranks 2nd
                     [0.8, 0.1, 0.0, 0.3],   # label 0 ranks 1st
                     [0.0, 0.1, 0.2, 0.3]])  # label 0 ranks 4th
  labels = np.array([1, 0, 0])
  assert metrics.top_k_accuracy(logits, labels, k=1) == pytest.approx(1 / 3)
  assert metrics.top_k_accuracy(logits, labels, k=2) == pytest.approx(2 / 3)
  assert metrics.top_k_accuracy(logits, labels, k=4) == 1.0
  assert metrics.top_k_accuracy(logits, labels, k=2, weights=np.array([1, 1, 0])) == 1.0
  assert metrics.METRICS["accuracy"](logits, labels) == pytest.approx(1 / 3)
  top5 = metrics.METRICS["top5"](np.random.default_rng(0).normal(size=(4, 3, 10)),
                                 np.zeros((4, 3), int))
  assert 0.0 <= top5 <= 1.0


def test_sums_to_means_and_registry():
  assert metrics.log_perplexity(12.0, 4.0) == 3.0
  assert metrics.token_accuracy(3.0, 4.0) == 0.75
  assert metrics.token_accuracy(0.0, 0.0) == 0.0
  assert set(metrics.METRICS) == {"accuracy", "top5", "bleu", "chrf", "wer", "cer",
                                  "exact_match", "bracket_f1"}
  assert set(metrics.SEQUENCE_METRICS) <= set(metrics.METRICS)
