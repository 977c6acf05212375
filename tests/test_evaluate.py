"""Evaluation of a trained run from its checkpoint: a tiny run trained by the real CLI on real
embedded data; the evaluate CLI's table and JSON report; clear errors; parameters-only loading."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from data import tasks
from data.buckets import InputConfig
from data.tokenizer import Tokenizer
from multimodel import checkpoint, evaluate
from tests import tiny_data
from tests.test_export import train_tiny_run

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MULTIMODEL_DATA_DIR", str(tiny_data.data_dir()))
    path = tmp_path_factory.mktemp("run")
    train_tiny_run(path)
    yield path


def test_cli_prints_the_table_and_writes_metrics_and_outputs(workdir):
  environ = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "multimodel.evaluate", "--workdir", str(workdir), "--task",
       "translate_en_fr", "--max_examples", "4", "--step", "2"],
      env=environ, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-4000:]
  header, rule, *rows = result.stdout.splitlines()[1:-1]
  assert header.split() == ["task", "metric", "value"] and set(rule) == {"-", " "}
  assert {r.split()[1] for r in rows} == {"bleu", "chrf", "token_accuracy", "log_perplexity",
                                          "input_gain"}
  assert "translate_en_fr (test split, step 2, 4 examples" in result.stdout
  report = json.loads((workdir / "eval" / "translate_en_fr-test.json").read_text())
  assert (report["task"], report["split"], report["step"], report["examples"]) == (
      "translate_en_fr", "test", 2, 4)
  assert 0 <= report["bleu"] <= 100 and 0 <= report["chrf"] <= 100
  assert 0 <= report["token_accuracy"] <= 1 and np.isfinite(report["log_perplexity"])
  assert [d["index"] for d in report["decoded"]] == [0, 1, 2, 3]
  assert all(isinstance(d["prediction"], str) and d["reference"] for d in report["decoded"])


def test_classifier_report_holds_accuracy_and_predicted_classes(workdir, capsys):
  assert evaluate.main(["--workdir", str(workdir), "--task", "image_mnist5k",
                        "--max_examples", "5"]) == 0
  out = capsys.readouterr().out
  assert "image_mnist5k  accuracy" in out and "image_mnist5k  top5" in out
  report = json.loads((workdir / "eval" / "image_mnist5k-test.json").read_text())
  assert report["examples"] == 5 and 0 <= report["accuracy"] <= report["top5"] <= 1
  assert [d["index"] for d in report["decoded"]] == list(range(5))
  assert all(0 <= d["prediction"] < 10 and 0 <= d["reference"] < 10 for d in report["decoded"])
  correct = sum(d["prediction"] == d["reference"] for d in report["decoded"])
  assert report["accuracy"] == pytest.approx(correct / 5)


def test_no_repeat_ngram_reaches_the_decoder(workdir, capsys, monkeypatch):
  """--no_repeat_ngram goes to the decoder (whose ban tests/test_decode.py checks) and the report;
  without it the task's own (3 for translation), and 0 turns the rule off."""
  from multimodel import decode, evaluation  # pylint: disable=import-outside-toplevel
  seen, make_decoder = [], decode.make_decoder

  def recording(*args, **kwargs):
    seen.append(kwargs.get("no_repeat_ngram"))
    return make_decoder(*args, **kwargs)

  monkeypatch.setattr(decode, "make_decoder", recording)
  args = ["--workdir", str(workdir), "--task", "translate_en_fr", "--max_examples", "2"]
  assert evaluate.main(args + ["--no_repeat_ngram", "3"]) == 0
  report = json.loads((workdir / "eval" / "translate_en_fr-test.json").read_text())
  assert seen == [3] and report["no_repeat_ngram"] == 3 and report["examples"] == 2
  for flag, want in (([], 3), (["--no_repeat_ngram", "0"], 0), (["--no_repeat_ngram", "2"], 2)):
    seen.clear()
    assert evaluate.main(args + flag) == 0
    report = json.loads((workdir / "eval" / "translate_en_fr-test.json").read_text())
    assert seen == [want] and report["no_repeat_ngram"] == want
  tree, label = tasks.get("parse_en"), tasks.get("image_mnist5k")
  assert [evaluation.resolve_no_repeat_ngram(tree, n) for n in (None, 0, 3)] == [0, 0, 0]
  assert evaluation.resolve_no_repeat_ngram(label, None) == 0
  with pytest.raises(SystemExit):
    evaluate.parse_args(args + ["--no_repeat_ngram", "-1"])
  assert "--no_repeat_ngram >= 0" in capsys.readouterr().err


def test_each_task_decodes_with_its_own_beams(workdir, capsys, monkeypatch):
  """Without --decode a task is decoded as its `Task.beam_size` says (1: greedy); --decode and
  --beam_size override it, and the report says which decoding ran."""
  from multimodel import decode, evaluation  # pylint: disable=import-outside-toplevel
  seen, make_decoder = [], decode.make_decoder

  def recording(*args, **kwargs):
    seen.append((kwargs["method"], kwargs["beam_size"]))
    return make_decoder(*args, **kwargs)

  monkeypatch.setattr(decode, "make_decoder", recording)
  args = ["--workdir", str(workdir), "--task", "translate_en_fr", "--max_examples", "2"]
  for flag, want, beams in (([], "greedy", 1), (["--decode", "beam"], "beam", 4),
                            (["--decode", "beam", "--beam_size", "2"], "beam", 2)):
    seen.clear()
    assert evaluate.main(args + flag) == 0
    report = json.loads((workdir / "eval" / "translate_en_fr-test.json").read_text())
    assert seen[-1][0] == want and report["decode"] == want and report["beam_size"] == beams
    assert report["examples"] == 2
  run = checkpoint.load_run(workdir)
  graphdef, params = evaluate.model_from_run(run)
  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)
  beamed = dataclasses.replace(tasks.get("translate_en_fr"), beam_size=3, max_target_length=12)
  for kwargs, want in (({}, ("beam", 3)), ({"decode": "greedy"}, ("greedy", 3)),
                       ({"beam_size": 2}, ("beam", 2))):
    seen.clear()
    report = evaluation.evaluate_task(graphdef, params, beamed, tokenizer,
                                      InputConfig.from_config(run.config), max_examples=2,
                                      **kwargs)
    assert seen == [want] and report["decode"] == want[0]
    assert report["beam_size"] == (want[1] if want[0] == "beam" else 1)
  assert evaluation.resolve_decode(tasks.get("image_mnist5k"), None, None) == ("greedy", 4)
  with pytest.raises(ValueError, match="beam_size must be >= 1, got 0"):
    evaluation.resolve_decode(beamed, None, 0)
  with pytest.raises(SystemExit):
    evaluate.parse_args(args + ["--beam_size", "0"])
  assert "--beam_size must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("task_name", ["translate_en_fr", "image_mnist5k"])
def test_input_gain_is_what_another_example_s_input_costs(workdir, monkeypatch, task_name):
  """input_gain = log-ppl given another example's input - given its own: nonzero for a model
  that reads its inputs (even this barely trained one), exactly 0 when every example of a batch
  has the same input."""
  from multimodel import evaluation  # pylint: disable=import-outside-toplevel
  run = checkpoint.load_run(workdir)
  graphdef, params = evaluate.model_from_run(run)
  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)

  def report():
    return evaluation.evaluate_task(
        graphdef, params, evaluate.run_task(run, task_name), tokenizer,
        InputConfig.from_config(run.config), max_examples=8, decode="none")

  own = report()
  # Two steps in, the translation model's outputs are nearly uniform: its gain is ~4e-5 nats.
  assert np.isfinite(own["input_gain"]) and abs(own["input_gain"]) > 1e-6
  eval_batches = evaluation.pipeline.eval_batches

  def same_input(*args, **kwargs):
    for batch in eval_batches(*args, **kwargs):
      yield dict(batch, **{k: np.broadcast_to(batch[k][:1], batch[k].shape)
                           for k in ("inputs", "input_mask") if k in batch})

  monkeypatch.setattr(evaluation.pipeline, "eval_batches", same_input)
  assert report()["input_gain"] == pytest.approx(0.0, abs=1e-7)


def bracket_depths(tree: str) -> list[int]:
  """The number of open brackets after each "(" or ")" of a text."""
  depths = [0]
  for char in tree:
    if char in "()":
      depths.append(depths[-1] + (1 if char == "(" else -1))
  return depths[1:]


@pytest.mark.parametrize("decode", ["greedy", None])  # None: the task's own, 4 beams.
def test_tree_outputs_keep_their_brackets_balanced(workdir, decode):
  """parse_en's outputs (`balanced_brackets`) open one tree, never close an unopened bracket and
  end where it closes, and their words are the input's (`leaves_are_input`), even from this barely
  trained model (which writes no trees of its own); greedily and with the task's beams."""
  from multimodel import evaluation  # pylint: disable=import-outside-toplevel
  run = checkpoint.load_run(workdir)
  graphdef, params = evaluate.model_from_run(run)
  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)
  task = dataclasses.replace(tasks.get("parse_en"), max_target_length=24)

  def outputs(task):
    report = evaluation.evaluate_task(graphdef, params, task, tokenizer,
                                      InputConfig.from_config(run.config), max_examples=4,
                                      decode=decode)
    return [(d["prediction"], d["reference"]) for d in report["decoded"]]

  def over_its_words(tree, reference):  # Some words, the first of the input's (a prefix).
    words = " ".join(tasks.tree_leaves(tree))
    return bool(words) and " ".join(tasks.tree_leaves(reference)).startswith(words)

  for tree, reference in outputs(task):
    depths = bracket_depths(tree)
    assert tree.startswith("(") and min(depths) >= 0 and 0 not in depths[:-1], tree
    assert over_its_words(tree, reference), (tree, reference)
  balanced = outputs(dataclasses.replace(task, leaves_are_input=False))
  assert not all(over_its_words(*pair) for pair in balanced)  # The rules had work to do.
  plain = outputs(dataclasses.replace(task, balanced_brackets=False, leaves_are_input=False))
  assert not all(tree.startswith("(") for tree, _ in plain)


@pytest.mark.parametrize("args, message", [
    (["--task", "no_such_task"], "unknown task; the run in {w} was not trained on 'no_such_task'; "
                                 "its tasks: image_mnist5k, translate_en_fr"),
    (["--task", "translate_en_de"], "the run in {w} was not trained on 'translate_en_de'; its "
                                    "tasks: image_mnist5k, translate_en_fr"),
    (["--task", "image_mnist5k", "--step", "7"], "{w} has no checkpoint of step 7; its steps: [2]"),
])
def test_errors_name_the_problem(workdir, capsys, args, message):
  assert evaluate.main(["--workdir", str(workdir), *args]) == 2
  assert capsys.readouterr().err.strip() == "error: " + message.format(w=workdir)


def test_missing_workdir(tmp_path, capsys):
  assert evaluate.main(["--workdir", str(tmp_path / "nothing"), "--task", "image_mnist5k"]) == 2
  assert "the folder does not exist" in capsys.readouterr().err
  assert evaluate.main(["--workdir", str(tmp_path), "--task", "image_mnist5k"]) == 2
  assert "holds no checkpoint" in capsys.readouterr().err


def test_load_run_reads_parameters_config_and_tokenizer(workdir):
  run = checkpoint.load_run(workdir)
  assert run.step == 2 and run.task_names == ["image_mnist5k", "translate_en_fr"]
  assert run.config.model.d_model == 32 and run.config.model.dilations == (1, 1, 2, 4)
  assert run.tokenizer_bytes and run.tokenizer_bytes[:2] != b"{}"
  # Parameters only: the optimizer's moments are not read.
  assert all(k.split("/")[0] in ("commands", "encoder", "mixer", "decoder", "modalities")
             for k in run.params)
  graphdef, params = evaluate.model_from_run(run)
  assert len(checkpoint.param_keys(params)) == len(run.params)
  flat, meta = checkpoint.restore_params(workdir)
  assert {"/".join(k) for k in flat} == run.params.keys()
  assert meta["tasks"] == run.task_names
  subset = evaluate.model_from_run(run, ("image", "label"))[1]
  assert not [k for k in checkpoint.param_keys(subset) if k.startswith("modalities/text")]
