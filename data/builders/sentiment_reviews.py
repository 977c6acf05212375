"""Amazon fine-food reviews from R's `modeldata` (`small_fine_foods`): review text -> great/other.

Source: the lazy-load database `/usr/lib/R/site-library/modeldata/data/Rdata.{rdb,rdx}` of Debian's
`r-cran-modeldata`, objects `training_data` (4,000) and `testing_data` (1,000), read with `rdata`.
The `.rdx` index is an ordinary gzipped RDS file mapping each object to (offset, length) in the
`.rdb`; each block there is a 4-byte big-endian length, a 1-byte codec (`Z` raw LZMA2, `2` bzip2,
`1` zlib, `0` stored) and the compressed serialisation of the object.

HTML line breaks and tags are removed from the text. Test is `testing_data` unchanged. Training
reviews are deduplicated and those whose text occurs in the test set dropped; validation is 500 of
them, stratified by class (smallest SHA-256 of the text first); train is the rest.
"""

import bz2
import functools
import hashlib
import html
import lzma
import pathlib
import re
import struct
import warnings
import zlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError

TASK = "sentiment_reviews"
HINT = ("run `bash data/setup_sources.sh` or `apt-get install r-cran-modeldata` (needs root) "
        "and `pip install rdata==1.1.0`")
RDB = pathlib.Path("/usr/lib/R/site-library/modeldata/data/Rdata.rdb")
NAMES = ("great", "other")
VALIDATION_SIZE = 500
SPLITS = ("train", "validation", "test")


def _decompress(block: bytes, compressed: int) -> bytes:
  """One block of an R lazy-load database, as R's `R_decompress1/2/3` read it."""
  size, body = struct.unpack(">I", block[:4])[0], block[4:]
  if compressed == 1:
    data = zlib.decompress(body)
  else:
    codec, body = body[:1], body[1:]
    if codec == b"Z":
      data = lzma.decompress(body, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    elif codec == b"2":
      data = bz2.decompress(body)
    elif codec == b"1":
      data = zlib.decompress(body)
    elif codec == b"0":
      data = body
    else:
      raise ValueError(f"unknown block codec {codec!r}")
  if len(data) != size:
    raise ValueError(f"block decompressed to {len(data)} bytes, expected {size}")
  return data


def read_lazyload_object(rdb: pathlib.Path, name: str):
  """Object `name` of an R lazy-load database (`.rdb` with its `.rdx` index), converted by rdata.

  Data frames (also tibbles) come back as `pandas.DataFrame`, factors as categoricals.
  """
  import rdata  # pylint: disable=g-import-not-at-top  (heavy: pandas, xarray)

  index = rdata.read_rds(rdb.with_suffix(".rdx"))
  offset, length = (int(x) for x in index["variables"][name])
  with open(rdb, "rb") as f:
    f.seek(offset)
    block = f.read(length)
  parsed = rdata.parser.parse_data(_decompress(block, int(index["compressed"][0])),
                                   extension=".rds")
  constructors = {**rdata.conversion.DEFAULT_CLASS_MAP,
                  "tbl_df": rdata.conversion.dataframe_constructor}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Missing constructor for R class tbl": data.frame is right.
    return rdata.conversion.convert(parsed, constructors)


def clean_review(text: str) -> str:
  """Plain text of a review: `<br />` and other tags removed, entities decoded, spaces collapsed."""
  text = re.sub(r"<[^<>]*>", " ", text.replace("<br />", " "))
  return re.sub(r"\s+", " ", html.unescape(text)).strip()


def _table(rdb: pathlib.Path, name: str) -> list[tuple[str, int]]:
  """[(clean text, label index)] of one object."""
  try:
    frame = read_lazyload_object(rdb, name)
    rows = list(zip(frame["review"], frame["score"]))
  except ModuleNotFoundError as e:
    raise SourceError(TASK, rdb, f"cannot read it without {e.name!r}", HINT) from e
  except Exception as e:  # rdata and the codecs raise many kinds on a damaged file.
    raise SourceError(TASK, rdb, f"cannot read object {name!r} ({type(e).__name__}: {e})",
                      HINT) from e
  if any(str(label) not in NAMES for _, label in rows) or not rows:
    raise SourceError(TASK, rdb, f"object {name!r} has labels other than {NAMES}", HINT)
  return [(clean_review(str(text)), NAMES.index(str(label))) for text, label in rows]


@functools.lru_cache(maxsize=2)
def _load(rdb: pathlib.Path) -> dict[str, list[tuple[str, str, int]]]:
  """Returns split -> [(key, text, label index)]."""
  for path in (rdb, rdb.with_suffix(".rdx")):
    if not path.is_file():
      raise SourceError(TASK, path, "not found (is r-cran-modeldata installed?)", HINT)
  training, testing = _table(rdb, "training_data"), _table(rdb, "testing_data")
  test = [(f"test-{i}", text, label) for i, (text, label) in enumerate(testing)]
  seen = {text for text, _ in testing}
  kept = []
  for i, (text, label) in enumerate(training):
    if text and text not in seen:
      seen.add(text)
      kept.append((f"train-{i}", text, label))
  validation_keys = set()
  for label in range(len(NAMES)):
    members = [k for k in kept if k[2] == label]
    quota = round(VALIDATION_SIZE * len(members) / len(kept)) if label < len(NAMES) - 1 else (
        VALIDATION_SIZE - len(validation_keys))
    members.sort(key=lambda k: hashlib.sha256(k[1].encode()).digest())
    validation_keys.update(key for key, _, _ in members[:quota])
  return {
      "train": [k for k in kept if k[0] not in validation_keys],
      "validation": [k for k in kept if k[0] in validation_keys],
      "test": test,
  }


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields `(key, {"text": str, "label": int})` of one split; label 0 great, 1 other."""
  for key, text, label in _load(RDB)[split]:
    yield key, {"text": text, "label": label}


class SentimentReviews(base.OfflineBuilder):
  """Amazon fine-food reviews labelled great or other; validation carved from training."""

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=NAMES),
        }),
        supervised_keys=("text", "label"),
        homepage="https://modeldata.tidymodels.org/reference/small_fine_foods.html",
    )

  def check_sources(self) -> None:
    _load(RDB)

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
