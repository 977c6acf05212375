"""Evaluation metrics: small functions, and registries naming them for the evaluator.

Shapes: B examples, C classes (any leading axes [...] are flattened with B).

Sequence metrics take decoded, detokenised strings, `fn(hyps, refs) -> float`, one reference per
hypothesis, and are corpus-level: BLEU and chrF (sacrebleu, 13a tokenisation) in 0..100; WER and
CER (jiwer) as fractions (can exceed 1); exact match and labelled bracket F1 as fractions in 0..1.
Classification metrics take logits and labels, `fn(logits, labels, weights=None) -> float`.
`log_perplexity` and `token_accuracy` turn the sums the loss function reports into means.
"""

import collections
from collections.abc import Callable, Sequence
import functools
import re

import jiwer
import numpy as np
import sacrebleu


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
  if len(hyps) != len(refs):
    raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")
  if not hyps:
    raise ValueError("no hypotheses to score")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus BLEU in 0..100 (sacrebleu defaults: 13a tokenisation, exp smoothing)."""
  _check(hyps, refs)
  return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus chrF (character 6-grams, beta 2) in 0..100."""
  _check(hyps, refs)
  return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def wer(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus word error rate: word edits / reference words (jiwer's default normalisation)."""
  _check(hyps, refs)
  return float(jiwer.wer(list(refs), list(hyps)))


def cer(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Corpus character error rate: character edits / reference characters."""
  _check(hyps, refs)
  return float(jiwer.cer(list(refs), list(hyps)))


def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> float:
  """Fraction of hypotheses equal to their reference (surrounding whitespace ignored)."""
  _check(hyps, refs)
  return sum(h.strip() == r.strip() for h, r in zip(hyps, refs)) / len(hyps)


# Labelled bracketing of linearised constituency trees.

_TREE_TOKEN = re.compile(r"\(|\)|[^\s()]+")


def tree_spans(tree: str) -> collections.Counter | None:
  """Labelled spans of a linearised tree, or None if it is malformed.

  "(S (NP the man) (VP walks))" has leaves the, man, walks and spans {(S, 0, 3), (NP, 0, 2),
  (VP, 2, 3)}: every bracket, root included, as (label, first leaf, one past its last leaf). A tree
  is malformed unless it is exactly one bracket whose every bracket opens with a label and covers
  at least one leaf.
  """
  tokens = _TREE_TOKEN.findall(tree)
  spans, stack, leaves, i = collections.Counter(), [], 0, 0
  while i < len(tokens):
    token = tokens[i]
    if token == "(":
      if (spans and not stack) or i + 1 == len(tokens) or tokens[i + 1] in ("(", ")"):
        return None  # A second root, or a bracket without a label.
      stack.append((tokens[i + 1], leaves))
      i += 2
      continue
    if token == ")":
      if not stack:
        return None
      label, start = stack.pop()
      if start == leaves:
        return None  # An empty bracket.
      spans[(label, start, leaves)] += 1
    elif not stack:
      return None  # A word outside the tree.
    else:
      leaves += 1
    i += 1
  return spans if spans and not stack else None


def bracket_f1(pred_trees: Sequence[str], gold_trees: Sequence[str]) -> float:
  """Corpus labelled bracket F1 (EVALB-style), a fraction in 0..1.

  Spans (label, start, end) over leaf positions are matched as multisets per sentence; precision
  and recall are pooled over the corpus. A malformed prediction contributes no spans and no
  matches, while its gold spans still count toward recall. Unlike EVALB's COLLINS.prm, every
  bracket counts (no punctuation or label deletion), and leaves are compared by position only.
  """
  _check(pred_trees, gold_trees)
  matched = predicted = gold_total = 0
  for pred, gold in zip(pred_trees, gold_trees):
    gold_spans = tree_spans(gold)
    if gold_spans is None:
      raise ValueError(f"malformed gold tree: {gold!r}")
    pred_spans = tree_spans(pred) or collections.Counter()
    matched += sum((pred_spans & gold_spans).values())
    predicted += sum(pred_spans.values())
    gold_total += sum(gold_spans.values())
  if matched == 0:
    return 0.0
  precision, recall = matched / predicted, matched / gold_total
  return 2 * precision * recall / (precision + recall)


# Classification and teacher-forced metrics.

def top_k_accuracy(logits, labels, k: int = 1, weights=None) -> float:
  """Weighted fraction of labels among the k highest logits.

  Args:
    logits: [..., C].
    labels: int [...].
    k: how many of the top classes count.
    weights: [...] or None (every example counts 1).
  Ties count in the label's favour (its rank is the number of strictly higher logits).
  """
  logits, labels = np.asarray(logits), np.asarray(labels)
  label_logit = np.take_along_axis(logits, labels[..., None], axis=-1)  # [..., 1]
  correct = ((logits > label_logit).sum(-1) < k).astype(np.float64)  # [...]
  w = np.ones_like(correct) if weights is None else np.asarray(weights, np.float64)
  return float((correct * w).sum() / max(w.sum(), 1e-12))


def log_perplexity(nll_sum: float, weight_sum: float) -> float:
  """Mean negative log-likelihood per target token (nats) from the loss's sums; 0 if no tokens."""
  return float(nll_sum) / max(float(weight_sum), 1e-12)


def token_accuracy(correct_sum: float, weight_sum: float) -> float:
  """Fraction of target tokens whose argmax is right, from the loss's sums; 0 if no tokens."""
  return float(correct_sum) / max(float(weight_sum), 1e-12)


SEQUENCE_METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {
    "bleu": bleu,
    "chrf": chrf,
    "wer": wer,
    "cer": cer,
    "exact_match": exact_match,
    "bracket_f1": bracket_f1,
}
CLASSIFICATION_METRICS: dict[str, Callable[..., float]] = {
    "accuracy": functools.partial(top_k_accuracy, k=1),
    "top5": functools.partial(top_k_accuracy, k=5),
}
METRICS: dict[str, Callable[..., float]] = {**CLASSIFICATION_METRICS, **SEQUENCE_METRICS}
