"""`caption_stamps`: 64x64 picture -> short English caption (Tux Paint stamps).

Each stamp of the Debian package tuxpaint-stamps-default is a picture (PNG, or SVG rendered with
cairosvg when it is installed) with a `.txt` whose first line is its English description. Pictures
are composited over white, scaled to fit 64x64 keeping their aspect ratio, and centred on white.
Captions are lower-cased first sentences without parenthesised asides, e.g. "a fire truck".
A stamp's path hash picks its split (about 80/10/10).
"""

from collections.abc import Iterator
import functools
import hashlib
import io
import logging
import pathlib
import re

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError

TASK = "caption_stamps"
HINT = "bash data/setup_sources.sh"
STAMPS_DIR = pathlib.Path("/usr/share/tuxpaint/stamps")
SIZE = 64
SPLITS = ("train", "validation", "test")
# Share of the hash space per split, in hundredths.
_SPLIT_BUCKETS = {"test": (0, 10), "validation": (10, 20), "train": (20, 100)}

_ASIDE = re.compile(r"\([^)]*\)")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")
_PUNCTUATION = str.maketrans(
    {"“": "", "”": "", '"': "", "…": "", "‘": "'", "’": "'", "—": " - ", "–": " - "})


def caption(first_line: str) -> str:
  """The short lower-case caption of a stamp description line ('' when nothing is left)."""
  text = _SENTENCE_END.split(first_line.strip())[0]
  text = _ASIDE.sub(" ", text.translate(_PUNCTUATION))
  return " ".join(text.split()).strip("-.!?:;, ").lower()


def split_of(relative_path: str) -> str:
  """The split of a stamp, fixed by the hash of its path relative to STAMPS_DIR."""
  bucket = int.from_bytes(hashlib.sha1(relative_path.encode()).digest()[:8], "big") % 100
  for split, (lo, hi) in _SPLIT_BUCKETS.items():
    if lo <= bucket < hi:
      return split
  raise AssertionError(bucket)


@functools.cache
def _svg_to_png():
  """cairosvg's `svg2png`, or None when cairosvg or libcairo is not installed."""
  try:
    import cairosvg  # pylint: disable=import-outside-toplevel
  except (ImportError, OSError) as e:
    logging.warning("%s: cannot render SVG stamps, skipping them (%s)", TASK, e)
    return None
  return cairosvg.svg2png


def to_square(picture: Image.Image, size: int = SIZE) -> np.ndarray:
  """Composites over white and fits into a white size x size square: uint8 [size, size, 3]."""
  rgba = picture.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  rgb = Image.alpha_composite(white, rgba).convert("RGB")
  scale = size / max(rgb.size)
  width, height = (max(1, round(side * scale)) for side in rgb.size)
  rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
  square = Image.new("RGB", (size, size), (255, 255, 255))
  square.paste(rgb, ((size - width) // 2, (size - height) // 2))
  return np.asarray(square, dtype=np.uint8)


def _load(path: pathlib.Path) -> Image.Image | None:
  """Opens a PNG, or renders an SVG (None when no renderer is installed)."""
  try:
    if path.suffix == ".svg":
      render = _svg_to_png()
      if render is None:
        return None
      # unsafe=True: the package's SVGs declare XML entities (trusted local files).
      picture = Image.open(io.BytesIO(render(bytestring=path.read_bytes(), unsafe=True)))
    else:
      picture = Image.open(path)
    picture.load()
  except Exception as e:  # pylint: disable=broad-except  # Pillow and cairosvg raise many kinds.
    raise SourceError(TASK, path, f"unreadable picture ({e})", HINT) from e
  return picture


def stamps(root: pathlib.Path | None = None) -> list[tuple[pathlib.Path, pathlib.Path]]:
  """Sorted [(caption .txt, picture)] pairs; a PNG is preferred over an SVG of the same stamp."""
  root = STAMPS_DIR if root is None else root
  if not root.is_dir():
    raise SourceError(TASK, root, "missing (Tux Paint stamps)", HINT)
  pairs, no_picture = [], 0
  for txt in sorted(root.rglob("*.txt")):
    picture = next((p for p in (txt.with_suffix(".png"), txt.with_suffix(".svg")) if p.is_file()),
                   None)
    if picture is None:
      no_picture += 1
      continue
    pairs.append((txt, picture))
  if not pairs:
    raise SourceError(TASK, root, "no stamps (picture with a .txt caption) found", HINT)
  if no_picture:
    logging.info("%s: %d captions without a picture skipped", TASK, no_picture)
  return pairs


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields (stamp path, {"image": uint8 [64, 64, 3], "caption": str}) of one split."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}")
  root = STAMPS_DIR
  skipped_svg = 0
  for txt, picture_path in stamps(root):
    key = str(txt.relative_to(root).with_suffix(""))
    if split_of(key) != split:
      continue
    try:
      lines = txt.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise SourceError(TASK, txt, f"unreadable caption ({e})", HINT) from e
    text = caption(lines[0]) if lines else ""
    if not text:
      raise SourceError(TASK, txt, "no English caption on the first line", HINT)
    picture = _load(picture_path)
    if picture is None:
      skipped_svg += 1
      continue
    yield key, {"image": to_square(picture), "caption": text}
  if skipped_svg:
    logging.warning("%s: %d SVG stamps of split %s skipped (no renderer)", TASK, skipped_svg, split)


class CaptionStamps(base.OfflineBuilder):
  """Tux Paint stamp pictures and their English captions."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(SIZE, SIZE, 3)),
            "caption": tfds.features.Text(),
        }),
        supervised_keys=("image", "caption"),
    )

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
