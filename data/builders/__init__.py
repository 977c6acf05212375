"""TFDS builders of the embedded tasks. Importing this package registers them with TFDS.

Each module defines one or more `tfds.core.GeneratorBasedBuilder` classes (TFDS names are the snake
case of the class names) and reads its sources offline (see `../../shared/DATA.md`). They derive
from `base.OfflineBuilder`, which holds their version, file format, splits and example generation.
"""

import importlib

MODULES = (
    "image_mnist5k",
    "image_fashion",
    "translate",  # translate_en_fr, translate_en_de
    "sentiment_reviews",
    "speech_en",
    "caption_stamps",
    "parse_en",
)


def import_all() -> tuple[str, ...]:
  """Imports every builder module (registers the builders with TFDS); returns their names."""
  for name in MODULES:
    importlib.import_module(f"{__name__}.{name}")
  return MODULES
