"""Builders of image_mnist5k, image_fashion, translate_en_{fr,de} and sentiment_reviews.

They read the real offline sources (`bash data/setup_sources.sh` installs them).
"""

import collections
import gzip
import logging
import pathlib
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data.builders import image_fashion, image_mnist5k, sentiment_reviews, translate
from data.errors import SourceError

SPLITS = ("train", "validation", "test")
BUILDERS = (image_mnist5k.ImageMnist5k, image_fashion.ImageFashion, translate.TranslateEnFr,
            translate.TranslateEnDe, sentiment_reviews.SentimentReviews)
COMMON_WORDS = {  # A few of the most frequent words of each language.
    "en": {"the", "and", "of", "to", "he", "i", "you", "is"},
    "fr": {"et", "le", "la", "les", "de", "une", "il", "à"},
    "de": {"und", "der", "die", "das", "er", "ich", "zu", "ist"},
}

tfds.disable_progress_bar()


def _words(text: str) -> set[str]:
  return set(re.findall(r"\w+", text.lower()))


def _all(examples) -> dict[str, list[tuple[str, dict]]]:
  return {split: list(examples(split)) for split in SPLITS}


# ------------------------------------------------------------------------------- feature specs.


def test_feature_specs(tmp_path):
  expected = {
      "image_mnist5k": {"image": ((28, 28, 1), np.uint8), "label": ((), np.int64)},
      "image_fashion": {"image": ((28, 28, 1), np.uint8), "label": ((), np.int64)},
      "translate_en_fr": {"en": ((), np.object_), "fr": ((), np.object_)},
      "translate_en_de": {"en": ((), np.object_), "de": ((), np.object_)},
      "sentiment_reviews": {"text": ((), np.object_), "label": ((), np.int64)},
  }
  for cls in BUILDERS:
    builder = cls(data_dir=tmp_path)
    features = builder.info.features
    assert builder.name in expected, builder.name
    assert str(builder.version) == "1.0.0"
    assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
    assert {k: (v.shape, v.np_dtype) for k, v in features.items()} == expected[builder.name]
  assert image_mnist5k.ImageMnist5k(data_dir=tmp_path).info.features["label"].num_classes == 10
  fashion = image_fashion.ImageFashion(data_dir=tmp_path).info.features["label"]
  assert fashion.names[:2] == ["T-shirt/top", "Trouser"] and fashion.num_classes == 10
  sentiment = sentiment_reviews.SentimentReviews(data_dir=tmp_path).info.features["label"]
  assert sentiment.names == ["great", "other"]


# ----------------------------------------------------------------------------------- examples.


def _check_images(splits: dict[str, list[tuple[str, dict]]], num_classes: int):
  for split, examples in splits.items():
    for key, example in examples[:200]:
      image, label = example["image"], example["label"]
      assert image.dtype == np.uint8 and image.shape == (28, 28, 1), (split, key)
      assert image.max() > 0 and 0 <= label < num_classes, (split, key)
    keys = [key for key, _ in examples]
    assert len(keys) == len(set(keys)), split


def test_mnist5k_splits_stratified_and_disjoint():
  splits = _all(image_mnist5k.examples)
  assert {s: len(v) for s, v in splits.items()} == {"train": 4000, "validation": 500, "test": 500}
  for split, per_class in (("train", 400), ("validation", 50), ("test", 50)):
    counts = collections.Counter(example["label"] for _, example in splits[split])
    assert counts == {digit: per_class for digit in range(10)}, split
  _check_images(splits, 10)
  pixels = {s: {ex["image"].tobytes() for _, ex in v} for s, v in splits.items()}
  assert not pixels["train"] & pixels["test"]
  assert not pixels["train"] & pixels["validation"]
  assert not pixels["validation"] & pixels["test"]
  assert len({k for v in splits.values() for k, _ in v}) == 5000  # Each source row used once.


def test_fashion_splits():
  splits = _all(image_fashion.examples)
  assert {s: len(v) for s, v in splits.items()} == {
      "train": 55000, "validation": 5000, "test": 10000}
  validation = collections.Counter(example["label"] for _, example in splits["validation"])
  assert validation == {label: 500 for label in range(10)}
  _check_images(splits, 10)
  train_keys = {key for key, _ in splits["train"]}
  assert not train_keys & {key for key, _ in splits["validation"]}
  sample = {ex["image"].tobytes() for _, ex in splits["train"][:5000]}
  assert not sample & {ex["image"].tobytes() for _, ex in splits["test"]}


@pytest.mark.parametrize("lang", ["fr", "de"])
def test_translate_split_by_book(lang):
  splits = _all(lambda split: translate.examples(split, lang))
  books = {split: {int(key.split("-")[1]) for key, _ in examples if key.startswith("bible-")}
           for split, examples in splits.items()}
  assert books["validation"] == set(translate.VALIDATION_BOOKS)
  assert books["test"] == set(translate.TEST_BOOKS)
  assert not books["train"] & (books["validation"] | books["test"])
  assert len(books["train"]) == 66 - 8
  for split, low, high in (("train", 25000, 50000), ("validation", 1500, 3000),
                           ("test", 2000, 3500)):
    assert low <= len(splits[split]) <= high, (split, len(splits[split]))
  for side in ("en", lang):
    train = {example[side] for _, example in splits["train"]}
    assert not train & {example[side] for _, example in splits["test"]}, side
    assert not train & {example[side] for _, example in splits["validation"]}, side


@pytest.mark.parametrize("lang", ["fr", "de"])
def test_translate_text_is_clean_and_in_its_language(lang):
  test = list(translate.examples("test", lang))
  for side in ("en", lang):
    texts = [example[side] for _, example in test]
    assert all(text and text == text.strip() for text in texts)
    assert not [t for t in texts if re.search(r"[`\[\]{}*]|\(\d+:\d+|\s{2}", t)][:3], side
    in_language = sum(bool(_words(t) & COMMON_WORDS[side]) for t in texts) / len(texts)
    assert in_language > 0.9, (side, in_language)
    others = set().union(*(COMMON_WORDS[o] for o in COMMON_WORDS if o != side))
    foreign_only = others - COMMON_WORDS[side] - {"die", "i"}  # "die" is English too.
    foreign = sum(len(_words(t) & foreign_only) > 2 for t in texts) / len(texts)
    assert foreign < 0.05, (side, foreign)


def test_translate_en_de_adds_ding_to_train_only():
  train = list(translate.examples("train", "de"))
  ding = [example for key, example in train if key.startswith("ding-")]
  assert 15000 < len(ding) < 20000
  for example in ding[:2000]:
    for text in example.values():
      assert not re.search(r"[{}\[\]()]", text), text
      assert text[0].isupper() and text[-1] in ".!?\"'“”»«’", text
  for split in ("validation", "test"):
    assert all(key.startswith("bible-") for key, _ in translate.examples(split, "de"))
  assert not any(key.startswith("ding-") for key, _ in translate.examples("train", "fr"))


def test_parse_ding_line():
  line = ("Er kam (endlich) nach Hause. {adj} [ugs.] | jdm. etw. geben | Nein; Nie! :: "
          "He came home at last. [coll.] | to give sb. sth. | No!\n")
  assert translate.parse_ding_line(line) == [("Er kam nach Hause.", "He came home at last.")]
  assert translate.parse_ding_line("# Version :: devel\n") == []
  assert translate.parse_ding_line("Ein Satz hier. | Zwei :: One sentence here.\n") == []


def test_clean_verse():
  assert translate.clean_verse("God`s [own] Spirit. BOOK II Psalm 42 For the Chief.", "en") == (
      "God's own Spirit.")
  assert translate.clean_verse("(7:26) L'Éternel dit à Moïse. -Haran vint. -", "fr") == (
      "L'Éternel dit à Moïse. Haran vint.")
  assert translate.clean_verse("Sein Name wird ewig sein. * * *", "de") == (
      "Sein Name wird ewig sein.")
  assert translate.clean_verse("(*)", "de") == ""


def test_sentiment_splits():
  splits = _all(sentiment_reviews.examples)
  sizes = {s: len(v) for s, v in splits.items()}
  assert sizes["validation"] == 500 and sizes["test"] == 1000 and 3400 < sizes["train"] <= 3500
  labels = {s: collections.Counter(ex["label"] for _, ex in v) for s, v in splits.items()}
  assert labels["validation"] == {0: 325, 1: 175}  # Same share of great as training (65%).
  assert labels["test"] == {0: 658, 1: 342}
  texts = {s: [ex["text"] for _, ex in v] for s, v in splits.items()}
  assert all(t and "<br" not in t and "&quot;" not in t for v in texts.values() for t in v)
  assert not set(texts["train"]) & set(texts["test"])
  assert not set(texts["train"]) & set(texts["validation"])
  assert not set(texts["validation"]) & set(texts["test"])
  in_english = sum(bool(_words(t) & COMMON_WORDS["en"]) for t in texts["test"]) / 1000
  assert in_english > 0.95


# ------------------------------------------------------------------------ prepare, read back.


@pytest.mark.parametrize("cls", BUILDERS, ids=lambda cls: cls.name)
def test_download_and_prepare_reads_back(cls, tmp_path):
  builder = cls(data_dir=tmp_path)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      max_examples_per_split=6, try_download_gcs=False))
  assert sorted(builder.info.splits) == sorted(SPLITS)
  assert list(pathlib.Path(builder.data_dir).glob("*.array_record*"))
  features = builder.info.features
  for split in SPLITS:
    source = builder.as_data_source(split=split)
    assert len(source) == 6
    for example in (source[0], source[5]):
      assert set(example) == set(features)
      for name, value in example.items():
        feature = features[name]
        if isinstance(feature, tfds.features.Image):
          assert value.dtype == np.uint8 and value.shape == (28, 28, 1)
        elif isinstance(feature, tfds.features.ClassLabel):
          assert 0 <= int(value) < feature.num_classes
        else:
          assert isinstance(value, bytes) and value.decode("utf-8").strip()


# ------------------------------------------------------------------------------ source errors.

MISSING = [
    ("image_mnist5k", image_mnist5k, "SOURCE", "mnist_5k.csv.gz", image_mnist5k.examples),
    ("image_fashion", image_fashion, "SOURCE_DIR", "fashion-mnist", image_fashion.examples),
    ("translate_en_fr", translate, "BIBLE_DB", "bible.db",
     lambda split: translate.examples(split, "fr")),
    ("translate_en_de", translate, "BIBLE_DB", "bible.db",
     lambda split: translate.examples(split, "de")),
    ("sentiment_reviews", sentiment_reviews, "RDB", "Rdata.rdb", sentiment_reviews.examples),
]


@pytest.mark.parametrize("task,module,constant,name,examples", MISSING, ids=[m[0] for m in MISSING])
def test_missing_source_raises_naming_file_and_task(tmp_path, monkeypatch, task, module, constant,
                                                    name, examples):
  monkeypatch.setattr(module, constant, tmp_path / "absent" / name)
  with pytest.raises(SourceError) as error:
    next(examples("train"))
  assert error.value.task == task
  assert str(tmp_path / "absent" / name) in error.value.path
  assert task in str(error.value) and error.value.path in str(error.value)
  assert "setup_sources.sh" in str(error.value)


def test_missing_source_fails_prepare(tmp_path, monkeypatch):
  monkeypatch.setattr(image_mnist5k, "SOURCE", tmp_path / "mnist_5k.csv.gz")
  with pytest.raises(SourceError, match="image_mnist5k.*mnist_5k.csv.gz"):
    image_mnist5k.ImageMnist5k(data_dir=tmp_path / "tfds").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def test_corrupt_sources_raise(tmp_path, monkeypatch):
  csv = tmp_path / "mnist_5k.csv.gz"
  csv.write_bytes(gzip.compress(b"1,2,3\n"))
  monkeypatch.setattr(image_mnist5k, "SOURCE", csv)
  with pytest.raises(SourceError, match="image_mnist5k.*expected 5000 rows"):
    next(image_mnist5k.examples("test"))

  fashion = tmp_path / "fashion"
  fashion.mkdir()
  for part in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
    (fashion / f"{part}-ubyte.gz").write_bytes(b"not gzip")
  monkeypatch.setattr(image_fashion, "SOURCE_DIR", fashion)
  with pytest.raises(SourceError, match="image_fashion.*train-images-idx3-ubyte.gz"):
    next(image_fashion.examples("test"))

  db = tmp_path / "bible.db"
  db.write_bytes(b"not a database" * 100)
  monkeypatch.setattr(translate, "BIBLE_DB", db)
  with pytest.raises(SourceError, match="translate_en_fr.*bible.db"):
    next(translate.examples("test", "fr"))

  rdb = tmp_path / "Rdata.rdb"
  rdb.write_bytes(b"\0" * 64)
  rdb.with_suffix(".rdx").write_bytes(gzip.compress(b"garbage"))
  monkeypatch.setattr(sentiment_reviews, "RDB", rdb)
  with pytest.raises(SourceError, match="sentiment_reviews.*Rdata.rdb"):
    next(sentiment_reviews.examples("test"))


def test_translate_en_de_without_ding_logs_once(tmp_path, monkeypatch, caplog):
  monkeypatch.setattr(translate, "DING", tmp_path / "de-en")
  with caplog.at_level(logging.WARNING):
    keys = [key for key, _ in translate.examples("train", "de")]
    keys += [key for key, _ in translate.examples("train", "de")]
  assert keys and all(key.startswith("bible-") for key in keys)
  messages = [r.getMessage() for r in caplog.records if str(tmp_path / "de-en") in r.getMessage()]
  assert len(messages) == 1 and "translate_en_de" in messages[0]
