"""Tasks: a data source + preprocessing + input/target modality + command token + metrics + weight.

A task is static Python data. `TASKS` holds every registered task by name: the embedded tasks
(built offline by `python -m data.prepare` from the project's own TFDS builders) and the public TFDS
catalogue tasks (downloaded by TFDS on first use, for users with internet). Adding a task is one
`register` call; nothing in the model changes (see `docs/adding_a_task.md`).
"""

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any

from data import preprocess as pp

INPUT_MODALITIES = ("text", "image", "audio", "label")
TARGET_MODALITIES = ("text", "label")

# Command tokens, append-only: a command's id is its index (it selects a row of the model's
# command-token embedding, so reordering would change what trained checkpoints mean).
COMMANDS = (
    "to_label",  # Classify: the target is a class index.
    "to_en",  # Produce English text (translation into English, speech transcription).
    "to_fr",
    "to_de",
    "to_caption",  # Describe a picture in English.
    "to_parse",  # Linearised constituency tree of an English sentence.
    "to_text",  # Any other text output (tasks of your own).
)

DEFAULT_SPLITS = {"train": "train", "eval": "validation", "test": "test"}

Preprocess = Callable[[Mapping[str, Any]], dict[str, Any]]


def command_id(name: str) -> int:
  """Index of a command token in `COMMANDS`."""
  try:
    return COMMANDS.index(name)
  except ValueError:
    raise KeyError(f"Unknown command {name!r}; valid commands: {COMMANDS}") from None


@dataclasses.dataclass(frozen=True)
class Fields:
  """Preprocess that picks `inputs` and `targets` out of a raw example by feature name.

  Nested features are reached with "/" ("captions/text"); `first_target` takes element 0 of a
  sequence feature (COCO's first caption); `lower_target` lowercases a text target.
  """

  inputs: str
  targets: str
  first_target: bool = False
  lower_target: bool = False

  def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
    targets = _lookup(example, self.targets)
    if self.first_target:
      targets = targets[0] if len(targets) else ""
    if self.lower_target:
      targets = pp.as_text(targets).lower()
    return {"inputs": _lookup(example, self.inputs), "targets": targets}


@dataclasses.dataclass(frozen=True)
class TreeLeaves:
  """Preprocess of a parsing task: the target is a linearised tree, the input its leaves.

  The treebank convention (a Penn Treebank parser reads the treebank's own tokens): the input is
  the sentence as the tree splits it into words ("persuaded ," and "Lord 's"), joined by spaces,
  so a tree's leaves can be exactly its input's words (`Task.leaves_are_input`).
  """

  tree: str

  def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
    tree = pp.as_text(_lookup(example, self.tree))
    return {"inputs": " ".join(tree_leaves(tree)), "targets": tree}


_TREE_MARKUP = re.compile(r"\(\S*|\)")


def tree_leaves(tree: str) -> list[str]:
  """The words of a linearised tree, in order: "(S (NP he) (VP walks) .)" -> he, walks, "."."""
  return _TREE_MARKUP.sub(" ", tree).split()


def _lookup(example: Mapping[str, Any], key: str) -> Any:
  if key in example:
    return example[key]
  value = example
  for part in key.split("/"):
    value = value[part]
  return value


@dataclasses.dataclass(frozen=True)
class Task:
  """One task. Lengths count tokens for text and 10 ms frames for audio.

  Attributes:
    name: registry key.
    source: TFDS name of the data ("translate_en_fr", "wmt14_translate/de-en").
    preprocess: raw TFDS example -> {"inputs": ..., "targets": ...} raw values: image uint8
      [H, W, C], text str, waveform [N] (int16 or float in [-1, 1]) at `sample_rate`, int label.
    input_modality: one of `INPUT_MODALITIES`.
    target_modality: one of `TARGET_MODALITIES`.
    command: name of the command token (in `COMMANDS`).
    metrics: names of the evaluation metrics ("accuracy", "bleu", "wer", ...).
    splits: TFDS split names for the keys "train", "eval" (evaluation during training) and "test".
    num_classes: number of classes of a label target (0 for text targets).
    label_offset: first of the task's `num_classes` slots in the model's shared label space
      (`model.num_labels` slots). Tasks whose classes mean the same thing share slots (`mnist`
      and `image_mnist5k`); tasks with different classes get disjoint slots, so that one output
      unit never has to mean "digit 3" and "dress" at once.
    weight: default sampling weight multiplier in a mixture.
    embedded: True when the data is built offline by `python -m data.prepare` into
      `data.paths.tfds_dir()`; False for TFDS catalogue datasets (TFDS downloads them when first
      read).
    max_input_length: cap of a text or audio input; longer training examples are skipped (with a
      label target, the input is cut to the cap instead).
    max_target_length: cap of a text target, EOS included.
    image_size: images are resized and centre-cropped to this square size (required with image
      inputs; sources whose images already have this size pass through untouched).
    sample_rate: rate of the waveform `preprocess` returns (resampled to the features' rate).
    input_buckets: bucket lengths of the inputs (None: the pipeline's defaults for the modality).
    target_buckets: bucket lengths of text targets (None: the pipeline's defaults).
    batch_size: fixed batch size (None: by tokens for sequences, the image batch size for images).
    symbols: markup of the task's text that the shared tokenizer keeps as one piece each (a tree's
      "(NP" and ")"), so that the model reads and writes it one token at a time. `python -m
      data.prepare` trains the tokenizer with every installed task's symbols.
    balanced_brackets: text targets are bracketed (linearised trees): decoding keeps their brackets
      balanced and stops where the outermost one closes (`decode.keep_brackets_balanced`).
    leaves_are_input: with `balanced_brackets`, a text input is the target tree's words (as
      `TreeLeaves` makes it): decoding writes exactly the input's pieces, in order, as the tree's
      leaves, never a bracket inside a word nor an empty one (`decode.keep_input_leaves`).
    max_open_run: with `leaves_are_input`, decoding opens at most this many brackets in a row
      (0: no limit), a setting of the decoder chosen on the validation split.
    no_repeat_ngram: decoding never repeats an n-gram of this many tokens in an output (0: off;
      `decode.ban_repeated_ngrams`), the default of evaluation and exported programs, chosen on
      the validation split; not for trees, whose brackets repeat.
    beam_size: decoding keeps this many beams (1: greedy), the default of evaluation and exported
      programs, chosen on the validation split.
  """

  name: str
  source: str
  preprocess: Preprocess
  input_modality: str
  target_modality: str
  command: str
  metrics: tuple[str, ...]
  splits: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_SPLITS))
  num_classes: int = 0
  label_offset: int = 0
  weight: float = 1.0
  embedded: bool = False
  max_input_length: int = 256
  max_target_length: int = 256
  image_size: int | None = None
  sample_rate: int = 16000
  input_buckets: tuple[int, ...] | None = None
  target_buckets: tuple[int, ...] | None = None
  batch_size: int | None = None
  symbols: tuple[str, ...] = ()
  balanced_brackets: bool = False
  leaves_are_input: bool = False
  max_open_run: int = 0
  no_repeat_ngram: int = 0
  beam_size: int = 1

  def __post_init__(self):
    if self.input_modality not in INPUT_MODALITIES:
      raise ValueError(f"task {self.name!r}: input_modality {self.input_modality!r} not in "
                       f"{INPUT_MODALITIES}")
    if self.target_modality not in TARGET_MODALITIES:
      raise ValueError(f"task {self.name!r}: target_modality {self.target_modality!r} not in "
                       f"{TARGET_MODALITIES}")
    command_id(self.command)
    if self.target_modality == "label" and self.num_classes < 2:
      raise ValueError(f"task {self.name!r}: a label target needs num_classes >= 2")
    if self.input_modality == "label" and self.num_classes < 2:
      raise ValueError(f"task {self.name!r}: a label input needs num_classes >= 2")
    if self.label_offset < 0:
      raise ValueError(f"task {self.name!r}: label_offset must be >= 0, got {self.label_offset}")
    missing = {"train", "eval"} - set(self.splits)
    if missing:
      raise ValueError(f"task {self.name!r}: splits lacks {sorted(missing)}")
    if self.input_modality == "image" and not self.image_size:
      raise ValueError(f"task {self.name!r}: image inputs need image_size")
    if self.weight < 0:
      raise ValueError(f"task {self.name!r}: weight must be >= 0, got {self.weight}")
    if self.leaves_are_input and not (self.balanced_brackets and self.input_modality == "text"
                                      and self.target_modality == "text"):
      raise ValueError(f"task {self.name!r}: leaves_are_input needs text inputs and text targets "
                       f"with balanced_brackets")
    if self.max_open_run < 0:
      raise ValueError(f"task {self.name!r}: max_open_run must be >= 0 (0: no limit), got "
                       f"{self.max_open_run}")
    if self.no_repeat_ngram < 0:
      raise ValueError(f"task {self.name!r}: no_repeat_ngram must be >= 0 (0: off), got "
                       f"{self.no_repeat_ngram}")
    if self.no_repeat_ngram and (self.target_modality != "text" or self.balanced_brackets):
      raise ValueError(f"task {self.name!r}: no_repeat_ngram needs text targets that are not "
                       f"trees (balanced_brackets repeat their brackets)")
    if self.beam_size < 1 or (self.beam_size > 1 and self.target_modality != "text"):
      raise ValueError(f"task {self.name!r}: beam_size must be >= 1 (1: greedy), and above 1 only "
                       f"with text targets; got {self.beam_size} for a {self.target_modality} "
                       f"target")

  @property
  def command_id(self) -> int:
    return command_id(self.command)

  def split(self, key: str) -> str:
    """TFDS split name of "train", "eval" or "test" (or a TFDS split name, returned as is)."""
    return self.splits.get(key, key)


TASKS: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Adds `task` to `TASKS`; a second task of the same name is an error unless `replace`."""
  if task.name in TASKS and not replace and TASKS[task.name] != task:
    raise ValueError(f"A task named {task.name!r} is already registered")
  TASKS[task.name] = task
  return task


def get(name: str) -> Task:
  """The registered task called `name`; an unknown name fails with the list of valid ones."""
  try:
    return TASKS[name]
  except KeyError:
    raise KeyError(f"Unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}") from None


def resolve(names: str | list[str] | tuple[str, ...]) -> list[Task]:
  """Tasks of a comma-separated string or a list of names, checked all at once."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in names if n not in TASKS]
  if unknown:
    raise KeyError(f"Unknown task(s) {unknown}; valid tasks: {', '.join(sorted(TASKS))}")
  return [TASKS[n] for n in names]


def embedded_tasks() -> list[Task]:
  """The tasks built offline by `python -m data.prepare`, by name."""
  return [t for _, t in sorted(TASKS.items()) if t.embedded]


def installed_tasks() -> list[Task]:
  """The embedded tasks whose prepared data exists in `data.paths.tfds_dir()`."""
  from data import sources  # pylint: disable=import-outside-toplevel
  return [t for t in embedded_tasks() if sources.is_prepared(t)]


_IMAGE_METRICS = ("accuracy", "top5")
_TRANSLATE_METRICS = ("bleu", "chrf")
_SPEECH_METRICS = ("wer", "cer")
# Translation and speech are decoded without repeating a 3-gram of pieces: the job's greedy
# translations looped ("the valley of the valley of ..."). Chosen on the validation split (the job,
# 200 examples a direction): chrF with n = 0 / 2 / 3 / 4 en->fr 18.4 / 19.8 / 20.5 / 19.6, fr->en
# 21.8 / 23.9 / 24.2 / 24.1, en->de 22.9 / 24.6 / 24.6 / 24.4, de->en 23.2 / 25.1 / 25.5 / 25.3;
# speech WER 1.05 -> 1.00 with 3 (docs/results.md, "Decoding that does not repeat itself").
_NO_REPEAT_NGRAM = 3
# The brackets of a linearised tree: "(" with each constituent label link-grammar writes, and ")".
# One piece each, a test tree is 35 pieces on average instead of 44, and every ")" is a token of
# its own (the tokenizer otherwise learns "))))" as one piece, and the model must count).
TREE_LABELS = ("S", "SBAR", "SINV", "SQ", "NP", "VP", "PP", "ADJP", "ADVP", "PRT", "QP", "WHNP",
               "WHADVP", "WHPP", "WHADJP")
TREE_SYMBOLS = tuple(f"({label}" for label in TREE_LABELS) + (")",)

# Embedded tasks (builders in `data/builders/`).
register(Task("image_mnist5k", "image_mnist5k", Fields("image", "label"), "image", "label",
              "to_label", _IMAGE_METRICS, num_classes=10, embedded=True, image_size=28))
register(Task("image_fashion", "image_fashion", Fields("image", "label"), "image", "label",
              "to_label", _IMAGE_METRICS, num_classes=10, label_offset=10, embedded=True,
              image_size=28))
for _src, _tgt in (("en", "fr"), ("fr", "en"), ("en", "de"), ("de", "en")):
  _pair = "en_fr" if "fr" in (_src, _tgt) else "en_de"
  register(Task(f"translate_{_src}_{_tgt}", f"translate_{_pair}", Fields(_src, _tgt), "text",
                "text", f"to_{_tgt}", _TRANSLATE_METRICS, embedded=True, max_input_length=128,
                max_target_length=128, no_repeat_ngram=_NO_REPEAT_NGRAM))
register(Task("speech_en", "speech_en", Fields("audio", "text"), "audio", "text", "to_en",
              _SPEECH_METRICS, embedded=True, max_input_length=1024, max_target_length=128,
              no_repeat_ngram=_NO_REPEAT_NGRAM))
register(Task("caption_stamps", "caption_stamps", Fields("image", "caption"), "image", "text",
              "to_caption", ("bleu", "chrf"), embedded=True, image_size=64, max_target_length=32))
# The parser reads the tree's words (the source's `sentence` as link-grammar splits it), and its
# trees are decoded over exactly them, opening at most two brackets in a row: parse-only, 900
# steps, test bracket F1 greedy 0.385 -> 0.486, beam 0.438 -> 0.607 (docs/results.md, "Trees over
# their input's words"; 2 was chosen on the validation split). It is decoded with 4 beams: in the
# main job, validation bracket F1 0.529 greedy -> 0.619 (docs/results.md, "Each task decoded its
# own way"; beams lowered every translation direction's chrF).
register(Task("parse_en", "parse_en", TreeLeaves("tree"), "text", "text", "to_parse",
              ("exact_match", "bracket_f1"), embedded=True, max_input_length=64,
              max_target_length=256, input_buckets=(16, 16, 32, 64),
              target_buckets=(32, 64, 128, 256), symbols=TREE_SYMBOLS,
              balanced_brackets=True, leaves_are_input=True, max_open_run=2, beam_size=4))
# Reviews are cut to their first 64 pieces: a batch then holds 32 of them instead of 8, and the
# opening sentences carry the verdict. Alone, `default` config, 300 steps: test accuracy 0.735 cut
# at 64 against 0.585 (the majority class) at 256, in half the time (docs/results.md).
register(Task("sentiment_reviews", "sentiment_reviews", Fields("text", "label"), "text", "label",
              "to_label", ("accuracy",), num_classes=2, label_offset=20, embedded=True,
              max_input_length=64))

# Public TFDS catalogue tasks (need internet on first use; imagenet2012 needs a manual download).
_CATALOGUE_SPLITS = {"train": "train", "eval": "test", "test": "test"}
register(Task("mnist", "mnist", Fields("image", "label"), "image", "label", "to_label",
              _IMAGE_METRICS, splits=_CATALOGUE_SPLITS, num_classes=10, image_size=28))
register(Task("cifar10", "cifar10", Fields("image", "label"), "image", "label", "to_label",
              _IMAGE_METRICS, splits=_CATALOGUE_SPLITS, num_classes=10, label_offset=30,
              image_size=32))
register(Task("imagenet2012", "imagenet2012", Fields("image", "label"), "image", "label",
              "to_label", _IMAGE_METRICS, num_classes=1000, image_size=64,
              splits={"train": "train", "eval": "validation", "test": "validation"}))
for _src, _tgt in (("en", "de"), ("de", "en"), ("en", "fr"), ("fr", "en")):
  _other = _tgt if _src == "en" else _src
  register(Task(f"wmt14_translate_{_src}_{_tgt}", f"wmt14_translate/{_other}-en",
                Fields(_src, _tgt), "text", "text", f"to_{_tgt}", _TRANSLATE_METRICS,
                max_input_length=128, max_target_length=128))
register(Task("coco_captions", "coco_captions",
              Fields("image", "captions/text", first_target=True), "image", "text", "to_caption",
              ("bleu", "chrf"), image_size=64, max_target_length=64,
              splits={"train": "train", "eval": "val", "test": "test"}))
register(Task("librispeech", "librispeech", Fields("speech", "text", lower_target=True), "audio",
              "text", "to_en", _SPEECH_METRICS, max_input_length=2048, max_target_length=256,
              splits={"train": "train_clean100", "eval": "dev_clean", "test": "test_clean"}))
del _src, _tgt, _pair, _other
