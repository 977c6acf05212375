"""The task registry, the catalogue tasks under `tfds.testing.mock_data`, and source errors."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data import buckets as buckets_lib
from data import pipeline
from data import prepare
from data import sources
from data import tasks
from data import tokenizer as tokenizer_lib
from data.errors import SourceError
from multimodel.configs import tiny
from tests import tiny_data

EMBEDDED = {"image_mnist5k", "image_fashion", "translate_en_fr", "translate_fr_en",
            "translate_en_de", "translate_de_en", "speech_en", "caption_stamps", "parse_en",
            "sentiment_reviews"}
CATALOGUE = {"mnist", "cifar10", "imagenet2012", "wmt14_translate_en_de", "wmt14_translate_de_en",
             "wmt14_translate_en_fr", "wmt14_translate_fr_en", "coco_captions", "librispeech"}


def test_registry_holds_the_embedded_and_catalogue_tasks():
  assert {t.name for t in tasks.embedded_tasks()} == EMBEDDED
  assert CATALOGUE <= set(tasks.TASKS)
  assert all(not tasks.get(n).embedded for n in CATALOGUE)


def test_every_task_is_consistent():
  config = tiny.get_config()
  assert len(set(tasks.COMMANDS)) == len(tasks.COMMANDS) <= config.model.num_commands
  for task in tasks.TASKS.values():
    assert tasks.COMMANDS[task.command_id] == task.command
    assert task.metrics and {"train", "eval"} <= set(task.splits)
    if task.target_modality == "label":
      assert 2 <= task.num_classes
      assert task.label_offset + task.num_classes <= config.model.num_labels
    if task.input_modality == "image":
      assert task.image_size


def test_embedded_label_tasks_have_their_own_label_slots():
  # Different class sets never share an output unit: digit 3, "dress" and "great" are apart.
  slots = {}
  for name in sorted(EMBEDDED):
    task = tasks.get(name)
    if task.target_modality == "label":
      for slot in range(task.label_offset, task.label_offset + task.num_classes):
        assert slot not in slots, f"{name} and {slots[slot]} share label slot {slot}"
        slots[slot] = name
  # Catalogue MNIST has the same classes as the embedded MNIST: the same slots.
  assert tasks.get("mnist").label_offset == tasks.get("image_mnist5k").label_offset


def test_commands_are_append_only():
  # Trained checkpoints index the command embedding by these ids: never reorder, only append.
  assert tasks.COMMANDS[:7] == ("to_label", "to_en", "to_fr", "to_de", "to_caption", "to_parse",
                                "to_text")
  assert tasks.command_id("to_fr") == 2
  with pytest.raises(KeyError, match="to_label"):
    tasks.command_id("to_klingon")


def test_unknown_task_fails_with_the_valid_names():
  with pytest.raises(KeyError) as error:
    tasks.get("translate_en_xx")
  message = str(error.value)
  assert "translate_en_xx" in message
  assert all(name in message for name in EMBEDDED | CATALOGUE)
  with pytest.raises(KeyError, match="nope.*valid tasks: .*image_mnist5k"):
    tasks.resolve("image_mnist5k,nope")


def test_task_definitions_are_checked():
  with pytest.raises(ValueError, match="num_classes"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "label", "to_label", ("accuracy",))
  with pytest.raises(ValueError, match="label_offset"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "label", "to_label", ("accuracy",),
               num_classes=2, label_offset=-1)
  with pytest.raises(ValueError, match="input_modality"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "video", "text", "to_text", ("bleu",))
  with pytest.raises(KeyError, match="Unknown command"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "text", "to_xx", ("bleu",))
  with pytest.raises(ValueError, match="already registered"):
    tasks.register(tasks.Task("mnist", "other", tasks.Fields("a", "b"), "text", "text", "to_text",
                              ("bleu",)))
  with pytest.raises(ValueError, match="leaves_are_input needs text inputs and text targets with "
                                       "balanced_brackets"):
    tasks.Task("t", "s", tasks.TreeLeaves("tree"), "text", "text", "to_parse", ("bracket_f1",),
               leaves_are_input=True)
  with pytest.raises(ValueError, match="max_open_run must be >= 0"):
    tasks.Task("t", "s", tasks.TreeLeaves("tree"), "text", "text", "to_parse", ("bracket_f1",),
               balanced_brackets=True, leaves_are_input=True, max_open_run=-1)
  with pytest.raises(ValueError, match="no_repeat_ngram must be >= 0"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "text", "to_text", ("bleu",),
               no_repeat_ngram=-1)
  for bad in (dict(balanced_brackets=True), dict(target_modality="label", num_classes=2)):
    with pytest.raises(ValueError, match="no_repeat_ngram needs text targets that are not trees"):
      tasks.Task("t", "s", tasks.Fields("a", "b"), "text", **{"target_modality": "text", **bad},
                 command="to_text", metrics=("bleu",), no_repeat_ngram=3)
  with pytest.raises(ValueError, match=r"beam_size must be >= 1 \(1: greedy\).*got 0 for a text"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "text", "to_text", ("bleu",), beam_size=0)
  with pytest.raises(ValueError, match="above 1 only with text targets; got 4 for a label target"):
    tasks.Task("t", "s", tasks.Fields("a", "b"), "text", "label", "to_label", ("accuracy",),
               num_classes=2, beam_size=4)


def test_embedded_translation_and_speech_decode_without_repeating_trigrams():
  """The embedded translation and speech tasks decode with the n-gram rule chosen on their
  validation split (docs/results.md, "Decoding that does not repeat itself"); the rest without."""
  ruled = {n for n, t in tasks.TASKS.items() if t.no_repeat_ngram}
  assert ruled == {"translate_en_fr", "translate_fr_en", "translate_en_de", "translate_de_en",
                   "speech_en"}
  assert all(tasks.get(n).no_repeat_ngram == 3 for n in ruled)


def test_only_the_parser_is_decoded_with_beams():
  """parse_en keeps 4 beams, chosen on the main job's validation split, where beams lowered every
  translation direction's chrF (docs/results.md, "Each task decoded its own way")."""
  assert {n: t.beam_size for n, t in tasks.TASKS.items() if t.beam_size != 1} == {"parse_en": 4}


def test_installed_tasks_are_the_prepared_ones(monkeypatch):
  tiny_data.use(monkeypatch)
  installed = {t.name for t in tasks.installed_tasks()}
  expected = {n for n in EMBEDDED if tasks.get(n).source in
              {tasks.get(m).source for m in tiny_data.TASKS}}
  assert installed == expected  # translate_fr_en / de_en come with their sources.


def test_fields_preprocess_reads_nested_and_first_values():
  example = {"image": np.zeros((2, 2, 3), np.uint8),
             "captions": {"text": np.array([b"A dog.", b"A cat."]), "id": np.array([1, 2])}}
  out = tasks.get("coco_captions").preprocess(example)
  assert out["targets"] == b"A dog." and out["inputs"] is example["image"]
  speech = tasks.get("librispeech").preprocess({"speech": np.zeros(3), "text": b"HELLO WORLD"})
  assert speech["targets"] == "hello world"


def test_a_parse_reads_the_words_of_its_tree():
  """parse_en's input is its tree's leaves (the treebank's tokens), so decoding can hold a tree to
  them (`leaves_are_input`)."""
  tree = "(S (NP (NP the Lord 's) will) (VP be (VP done)) .)"
  assert tasks.tree_leaves(tree) == ["the", "Lord", "'s", "will", "be", "done", "."]
  out = tasks.get("parse_en").preprocess({"sentence": b"The Lord's will be done.",
                                          "tree": tree.encode()})
  assert out == {"inputs": "the Lord 's will be done .", "targets": tree}
  assert tasks.get("parse_en").leaves_are_input and tasks.get("parse_en").max_open_run == 2


@pytest.mark.parametrize("name", sorted(CATALOGUE))
def test_catalogue_task_gives_model_ready_batches_under_mock_data(name, monkeypatch):
  tiny_data.use(monkeypatch)
  tok = tokenizer_lib.Tokenizer.load()
  task = tasks.get(name)
  config = pipeline.InputConfig(tokens_per_batch=256, image_batch_size=8)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
    it = pipeline.TaskIterator(task, tok, config, seed=0)
    batch = next(it)
    evals = list(pipeline.eval_batches(task, tok, config))
  assert it.size == 12
  specs = it.batch_specs()
  assert any(buckets_lib.matches(batch, spec) for spec in specs), (batch.keys(), specs)
  assert sum(int(b["example_mask"].sum()) for b in evals) == 12
  if task.input_modality == "image":
    assert batch["inputs"].shape[1:] == (task.image_size, task.image_size, 3)
    assert -1.0 <= batch["inputs"].min() and batch["inputs"].max() <= 1.0
  if task.target_modality == "text":
    assert (batch["targets"] == tokenizer_lib.EOS_ID).sum(axis=1).min() >= 1
  else:
    assert batch["targets"].min() >= 0 and batch["targets"].max() < task.num_classes


def test_unprepared_task_names_the_task_and_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("MULTIMODEL_DATA_DIR", str(tmp_path))
  with pytest.raises(SourceError, match=r"task 'image_mnist5k'.*prepared data not found") as error:
    sources.open_split(tasks.get("image_mnist5k"), "train")
  assert str(tmp_path) in error.value.path
  assert "data.prepare --tasks image_mnist5k" in str(error.value)


def test_missing_source_file_names_the_file_and_task(tmp_path, monkeypatch, capsys):
  import data.builders.image_mnist5k as mnist_builder  # pylint: disable=import-outside-toplevel
  missing = tmp_path / "gone" / "mnist_5k.csv.gz"
  monkeypatch.setattr(mnist_builder, "SOURCE", missing)
  monkeypatch.setenv("MULTIMODEL_DATA_DIR", str(tmp_path / "data"))
  with pytest.raises(Exception) as error:
    prepare.build(tasks.get("image_mnist5k"))
  found = prepare.source_error(error.value)
  assert isinstance(found, SourceError)
  assert found.task == "image_mnist5k" and found.path == str(missing)
  assert str(missing) in str(found) and "image_mnist5k" in str(found)

  # The command reports it in one line, goes on, and does not fail for a missing source.
  code = prepare.main(["--tasks", "image_mnist5k"])
  out = capsys.readouterr().out
  assert code == 0
  line = next(l for l in out.splitlines() if l.startswith("image_mnist5k: skipped"))
  assert str(missing) in line and "task 'image_mnist5k'" in line


def test_prepare_rejects_unknown_tasks(capsys):
  assert prepare.main(["--tasks", "image_mnist5k,not_a_task"]) == 2
  assert "not_a_task" in capsys.readouterr().err
