"""Speech's beam-search hypotheses rescored by its CTC head: does the encoder's reading help?

    python -m experiments.ctc_rescoring --workdir runs/default [--task speech_en] \
        [--split validation] [--beam_size 8] [--max_examples 200] [--weights 0,0.1,0.3,0.5,0.7,1]

The main job trains speech with a CTC loss over letters on the encoder output (`model.ctc_weight`,
`model.ctc_units`: chars, or chars_and_spaces) besides the attention decoder. This reads a run's
checkpoint and, on the first `--max_examples` of `--split`:
1. decodes with the CTC head alone, greedily (`decode.ctc_best_path`), and scores its letters
   against the reference's (lower-cased, spaces and what the alphabet lacks removed, since a
   "chars" head has no space) by CER, next to the decoder's greedy output reduced to letters the
   same way;
2. takes the N best hypotheses of beam search (`decode.beam_search(return_all=True)`, the task's
   n-gram rule) and picks, for each CTC weight w of `--weights`, the one with the best
   (1 - w) * log P_decoder + w * log P_CTC, log P_CTC being the CTC head's log-likelihood of the
   hypothesis's letters (N-best rescoring, as in joint CTC-attention decoding, Watanabe et al.
   2017; w = 0 is plain beam search, ranked by log-probability without a length penalty).
Prints one table (WER and CER of each) and a last line of JSON; `run` also returns every output.
The run must have a CTC head over letters.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from data import pipeline, preprocess, sources
from data.buckets import InputConfig
from multimodel import evaluation, evaluate, objective
from multimodel import decode as decode_lib
from multimodel import metrics as metrics_lib
from multimodel.model import CTC_ALPHABET, ctc_alphabet


def letters(text: str) -> str:
  """What a CTC head over CTC_ALPHABET can write of `text`: lower-cased, nothing else kept."""
  return "".join(c for c in text.lower() if c in CTC_ALPHABET)


def make_scorer(graphdef, spec, table, space: int, *, beam_size: int, max_length: int,
                no_repeat_ngram: int):
  """A jitted fn(params, inputs, mask) -> N-best tokens [B, N, T], their decoder and CTC
  log-likelihoods [B, N], the CTC head's logits [B, S, L] and frame mask [B, S]."""

  @jax.jit
  def score(params, inputs, input_mask):
    model = nnx.merge(graphdef, params)
    seqs, scores = decode_lib.beam_search(model, spec, inputs, input_mask, beam_size=beam_size,
                                          max_length=max_length, no_repeat_ngram=no_repeat_ngram,
                                          return_all=True)
    lengths = (seqs != 0).sum(-1)  # Counting the EOS, as the length penalty does.
    decoder_logp = scores * decode_lib.gnmt_length_penalty(lengths, 0.6)
    enc, enc_mask, _ = model.encode(spec, inputs, input_mask)
    logits = model.ctc_head(enc).astype(jnp.float32)  # [B, S, L]
    mask = jnp.ones(logits.shape[:2], bool) if enc_mask is None else enc_mask
    batch, n, length = seqs.shape
    labels = objective.ctc_char_labels(
        jnp.where(seqs == decode_lib.EOS_ID, 0, seqs).reshape(batch * n, length), table, space)
    ctc_logp = -optax.ctc_loss(jnp.repeat(logits, n, axis=0),
                               jnp.repeat(1.0 - mask.astype(jnp.float32), n, axis=0), labels,
                               (labels == 0).astype(jnp.float32), blank_id=0).reshape(batch, n)
    return seqs, decoder_logp, ctc_logp, logits, mask

  return score


def run(workdir: str, task_name: str, split: str, beam_size: int, max_examples: int,
        weights: list[float]) -> dict:
  loaded, task, tokenizer, graphdef, params = evaluate.load_for_task(workdir, task_name)
  model_cfg = loaded.config.model
  if model_cfg.ctc_weight <= 0 or model_cfg.ctc_units == "pieces":
    raise ValueError(f"the run in {workdir} has no CTC head over letters (model.ctc_weight="
                     f"{model_cfg.ctc_weight}, model.ctc_units={model_cfg.ctc_units!r})")
  spec = evaluation.task_spec(task)
  no_repeat = evaluation.resolve_no_repeat_ngram(task, None)
  alphabet = ctc_alphabet(model_cfg.ctc_units)
  score = make_scorer(graphdef, spec, objective.run_ctc_char_table(model_cfg, tokenizer),
                      objective.ctc_space_label(model_cfg.ctc_units), beam_size=beam_size,
                      max_length=task.max_target_length, no_repeat_ngram=no_repeat)
  greedy = decode_lib.make_decoder(graphdef, spec, max_length=task.max_target_length,
                                   no_repeat_ngram=no_repeat)
  source = sources.open_split(task, split)
  examples = []
  for batch in pipeline.eval_batches(task, tokenizer, InputConfig.from_config(loaded.config),
                                     split=split, max_examples=max_examples or None):
    seqs, decoder_logp, ctc_logp, logits, mask = jax.device_get(
        score(params, batch["inputs"], batch.get("input_mask")))
    greedy_tokens = np.asarray(greedy(params, batch["inputs"], batch.get("input_mask")))
    for row, index in enumerate(batch["example_index"]):
      if index < 0:
        continue
      examples.append({
          "index": int(index),
          "reference": preprocess.as_text(task.preprocess(source[int(index)])["targets"]),
          "greedy": tokenizer.decode(greedy_tokens[row]),
          "ctc_greedy": letters(decode_lib.ctc_best_path(logits[row].argmax(-1), mask[row],
                                                         alphabet)),
          "hypotheses": [tokenizer.decode(s) for s in seqs[row]],
          "decoder_logp": decoder_logp[row].tolist(), "ctc_logp": ctc_logp[row].tolist()})
  examples.sort(key=lambda e: e["index"])
  refs = [e["reference"] for e in examples]
  wer, cer = metrics_lib.SEQUENCE_METRICS["wer"], metrics_lib.SEQUENCE_METRICS["cer"]
  picked = {}
  rows = {"greedy": {"wer": wer([e["greedy"] for e in examples], refs),
                     "cer": cer([e["greedy"] for e in examples], refs),
                     "letter_cer": cer([letters(e["greedy"]) for e in examples],
                                       [letters(r) for r in refs])},
          "ctc_greedy": {"letter_cer": cer([e["ctc_greedy"] for e in examples],
                                           [letters(r) for r in refs])}}
  for w in weights:
    picks = []
    for e in examples:
      total = [(1 - w) * d + w * c if np.isfinite(d) else -np.inf
               for d, c in zip(e["decoder_logp"], e["ctc_logp"])]
      picks.append(e["hypotheses"][int(np.argmax(total))])
    picked[w] = picks
    rows[f"beam{beam_size}_ctc{w:g}"] = {
        "wer": wer(picks, refs), "cer": cer(picks, refs),
        "letter_cer": cer([letters(p) for p in picks], [letters(r) for r in refs])}
  return {"workdir": str(workdir), "task": task.name, "split": split, "step": loaded.step,
          "examples": len(examples), "beam_size": beam_size, "rows": rows,
          "_outputs": examples, "_picked": picked}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a run whose audio task has a CTC head")
  p.add_argument("--task", default="speech_en")
  p.add_argument("--split", default="validation")
  p.add_argument("--beam_size", type=int, default=8)
  p.add_argument("--max_examples", type=int, default=200, help="0: the whole split")
  p.add_argument("--weights", default="0,0.1,0.3,0.5,0.7,1",
                 help="CTC weights w of the rescoring, comma-separated, each in [0, 1]")
  args = p.parse_args(argv)
  weights = [float(w) for w in args.weights.split(",")]
  if not all(0.0 <= w <= 1.0 for w in weights):
    p.error(f"--weights must each be in [0, 1], got {args.weights}")
  result = run(args.workdir, args.task, args.split, args.beam_size, args.max_examples, weights)
  print(f"{result['task']} {result['split']}, step {result['step']}, "
        f"{result['examples']} examples")
  print(f"{'decoding':<22}{'WER':>8}{'CER':>8}{'letter CER':>12}")
  for name, row in result["rows"].items():
    cells = "".join(f"{row[k]:>{w}.3f}" if k in row else f"{'-':>{w}}"
                    for k, w in (("wer", 8), ("cer", 8), ("letter_cer", 12)))
    print(f"{name:<22}{cells}")
  print(json.dumps({k: v for k, v in result.items() if not k.startswith("_")}))
  return result


if __name__ == "__main__":
  main()
