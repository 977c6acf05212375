"""Builders of speech_en, caption_stamps and parse_en, on small slices of their real sources."""

import itertools
import pathlib
import re
import time

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data.builders import caption_stamps, espeak, parse_en, speech_en
from data.errors import SourceError

TRANSCRIPT = re.compile(r"^[a-z']+( [a-z']+)*$")


def _prepare_small(builder_cls, data_dir: pathlib.Path, n: int = 3):
  """Builds every split capped at `n` examples and returns the splits read back."""
  builder = builder_cls(data_dir=str(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(max_examples_per_split=n))
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  sources = builder.as_data_source()
  assert {name: len(source) for name, source in sources.items()} == {
      "train": n, "validation": n, "test": n}
  return builder, sources


def _balanced(tree: str) -> bool:
  depth = 0
  for ch in tree:
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth < 0:
      return False
  return depth == 0


# speech_en ----------------------------------------------------------------------------------------


@pytest.fixture(name="small_speech")
def fixture_small_speech(monkeypatch):
  """Few synthesised utterances per split; all real recordings; one eSpeak reading of each."""
  monkeypatch.setattr(speech_en, "SYNTH_SIZES", {"train": 12, "validation": 4, "test": 0})
  monkeypatch.setattr(speech_en, "PROMPT_READINGS", {"train": 1, "validation": 0, "test": 0})


def test_speech_features(tmp_path):
  builder = speech_en.SpeechEn(data_dir=str(tmp_path))
  assert builder.name == "speech_en" and str(builder.version) == "1.3.0"
  audio = builder.info.features["audio"]
  assert isinstance(audio, tfds.features.Audio)
  assert audio.shape == (None,) and audio.dtype == np.int16 and audio.sample_rate == 16000
  assert isinstance(builder.info.features["text"], tfds.features.Text)
  assert isinstance(builder.info.features["source"], tfds.features.Text)


def test_speech_examples_are_short_16k_int16_with_clean_transcripts():
  got = list(itertools.islice(speech_en.examples("train"), 8))
  assert {ex["source"] for _, ex in got} == {"asterisk", "espeak"}
  for _, ex in got:
    audio = ex["audio"]
    assert audio.dtype == np.int16 and audio.ndim == 1
    assert 0.1 <= len(audio) / speech_en.SAMPLE_RATE <= speech_en.MAX_SECONDS
    assert np.abs(audio.astype(np.int32)).max() > 1000  # Not silence.
    assert TRANSCRIPT.match(ex["text"]), ex["text"]
    # Both sources hold the real recordings' band only (nothing above 4 kHz).
    power = np.abs(np.fft.rfft(audio.astype(np.float64))) ** 2
    hz = np.fft.rfftfreq(len(audio), 1 / speech_en.SAMPLE_RATE)
    assert power[hz > 4200].sum() < 1e-3 * power.sum(), ex["source"]


def test_speech_test_split_is_real_and_unseen_in_train(small_speech):
  del small_speech
  test = dict(speech_en.examples("test"))
  train = dict(speech_en.examples("train"))
  validation = dict(speech_en.examples("validation"))
  assert len(test) > 100
  assert {ex["source"] for ex in test.values()} == {"asterisk"}
  assert {ex["source"] for ex in train.values()} == {"asterisk", "espeak"}
  assert {ex["source"] for ex in validation.values()} == {"asterisk", "espeak"}
  assert not set(test) & set(train) and not set(test) & set(validation)
  assert not set(train) & set(validation)
  test_texts = {ex["text"] for ex in test.values()}
  assert not test_texts & {ex["text"] for ex in train.values()}
  # No synthesised verse of either split equals a real test transcript.
  assert not test_texts & set(speech_en.verse_texts(exclude=set()))
  # eSpeak reads each train recording's transcript (PROMPT_READINGS["train"] = 1 here), and only
  # those: the real speaker's test and validation transcripts are never spoken in train.
  real_train = {ex["text"] for key, ex in train.items() if key.startswith("asterisk/")}
  prompts = [ex for key, ex in train.items() if key.startswith("espeak_prompt/")]
  assert {ex["source"] for ex in prompts} == {"espeak"}
  assert {ex["text"] for ex in prompts} == real_train
  assert not any(key.startswith("espeak_prompt/") for key in validation)


def test_speech_train_holds_the_real_recordings_at_other_speeds():
  recordings = [r for r in speech_en.real_recordings()
                if speech_en.real_split(r[2]) == "train"][:3]
  got = dict(speech_en._real_examples("train", recordings))  # pylint: disable=protected-access
  speeds = speech_en.REAL_SPEEDS["train"]
  assert len(got) == len(speeds) * len(recordings)
  for name, _, text in recordings:
    original = got[f"asterisk/{name}"]["audio"]
    for speed in speeds:
      copy = got[f"asterisk/{name}" + ("" if speed == 1.0 else f"/x{speed:g}")]
      assert copy["text"] == text and copy["source"] == "asterisk"
      assert abs(len(copy["audio"]) * speed / len(original) - 1) < 0.01  # speed x as fast.
      audio = copy["audio"].astype(np.float64)
      power = np.abs(np.fft.rfft(audio)) ** 2
      hz = np.fft.rfftfreq(len(audio), 1 / speech_en.SAMPLE_RATE)
      assert power[hz > 4200].sum() < 1e-3 * power.sum(), speed  # Still the real band only.
  # Validation and test hold each recording once, as it is.
  for split in ("validation", "test"):
    assert speech_en.REAL_SPEEDS[split] == (1.0,)


def test_speech_prompt_readings_differ_in_voice(monkeypatch):
  monkeypatch.setattr(speech_en, "PROMPT_READINGS", {"train": 3, "validation": 0, "test": 0})
  recordings = speech_en.real_recordings()[:40]
  got = list(speech_en._prompt_examples("train", recordings))  # pylint: disable=protected-access
  texts = {text for _, _, text in recordings if speech_en.real_split(text) == "train"}
  assert texts and len(got) == 3 * len(texts)
  by_text = {}
  for key, ex in got:
    by_text.setdefault(ex["text"], []).append((key, ex["audio"]))
  for text, readings in by_text.items():
    assert len({key for key, _ in readings}) == 3
    assert len({speech_en.voice_of(text, r) for r in (1, 2, 3)}) == 3
    assert len({audio.tobytes() for _, audio in readings}) == 3  # Three different recordings.


def test_speech_is_deterministic(small_speech):
  del small_speech
  first = list(speech_en.examples("validation"))
  again = list(speech_en.examples("validation"))
  assert [k for k, _ in first] == [k for k, _ in again]
  assert all(np.array_equal(a["audio"], b["audio"]) for (_, a), (_, b) in zip(first, again))


def test_espeak_same_request_same_samples_in_any_process():
  # en-us+f3 uses both the flutter state kept between utterances and the random generator.
  request = ("the lord is my shepherd", "en-us+f3", 160, 50)
  with espeak.Synthesizer() as synth:
    first = synth.speak(*request)
    synth.speak("something else entirely", "en+klatt", 190, 30)
    assert np.array_equal(first, synth.speak(*request))
    with pytest.raises(espeak.EspeakError, match="voice"):
      synth.speak("hello", "no-such-voice", 160, 50)
  time.sleep(1.1)  # The library seeds its random generator from the clock (seconds).
  with espeak.Synthesizer() as other:
    assert np.array_equal(first, other.speak(*request))


def test_speech_normalize():
  assert speech_en.normalize("Press 1 to mute, or # to exit.") == "press one to mute or pound to exit"
  assert speech_en.normalize("Dash [-]. (1 second of silence)") == "dash"
  assert speech_en.verse_transcript("God`s Spirit [was] hovering.") == "god's spirit was hovering"
  assert speech_en.verse_transcript("Psalm 3 A Psalm by David.") is None
  assert speech_en.normalize("[this is a simple beep tone]") is None
  assert speech_en.normalize("H.323") is None
  assert speech_en.number_words(162) == "one hundred sixty two"


def test_speech_prepare_and_read_back(tmp_path):
  builder, sources = _prepare_small(speech_en.SpeechEn, tmp_path)
  assert builder.info.features["audio"].sample_rate == 16000
  for split, source in sources.items():
    ex = source[0]
    assert ex["audio"].dtype == np.int16 and ex["audio"].ndim == 1
    assert len(ex["audio"]) <= speech_en.MAX_SECONDS * 16000
    assert TRANSCRIPT.match(ex["text"].decode())
    if split == "test":
      assert all(source[i]["source"] == b"asterisk" for i in range(len(source)))


def test_speech_missing_transcripts(monkeypatch, tmp_path):
  missing = tmp_path / "core-sounds-en.txt.gz"
  monkeypatch.setattr(speech_en, "TRANSCRIPTS", missing)
  with pytest.raises(SourceError, match=r"speech_en.*core-sounds-en\.txt\.gz") as info:
    next(speech_en.examples("test"))
  assert info.value.task == "speech_en" and info.value.path == str(missing)


def test_speech_missing_bible(monkeypatch, tmp_path):
  missing = tmp_path / "bible.db"
  monkeypatch.setattr(speech_en, "bible_db_path", lambda: missing)
  with pytest.raises(SourceError, match="speech_en.*bible.db"):
    list(itertools.islice(speech_en.examples("validation"), 3))


def test_speech_corrupt_recording(monkeypatch, tmp_path):
  (tmp_path / "activated.wav").write_bytes(b"not a wav file")
  monkeypatch.setattr(speech_en, "ASTERISK_DIR", tmp_path)
  with pytest.raises(SourceError, match=r"speech_en.*activated\.wav"):
    next(speech_en.examples("test"))


# caption_stamps -----------------------------------------------------------------------------------


def test_caption_features(tmp_path):
  builder = caption_stamps.CaptionStamps(data_dir=str(tmp_path))
  assert builder.name == "caption_stamps" and str(builder.version) == "1.0.0"
  image = builder.info.features["image"]
  assert isinstance(image, tfds.features.Image)
  assert image.shape == (64, 64, 3) and image.dtype == np.uint8
  assert isinstance(builder.info.features["caption"], tfds.features.Text)


def test_caption_examples():
  got = list(itertools.islice(caption_stamps.examples("test"), 10))
  assert len(got) == 10
  for _, ex in got:
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["image"].min() < 200  # Something is drawn on the white background.
    assert ex["caption"] and ex["caption"] == ex["caption"].lower()
    assert ex["caption"] == " ".join(ex["caption"].split())


def test_caption_splits_disjoint():
  test = dict(caption_stamps.examples("test"))
  validation = dict(caption_stamps.examples("validation"))
  assert len(test) > 50 and len(validation) > 50
  assert not set(test) & set(validation)
  assert {caption_stamps.split_of(k) for k in test} == {"test"}
  total = len(caption_stamps.stamps())
  assert 0.05 < len(test) / total < 0.15


def test_caption_to_square_keeps_aspect_over_white():
  picture = Image.new("RGBA", (200, 100), (255, 0, 0, 255))
  picture.putpixel((0, 0), (0, 0, 0, 0))  # Transparent -> white.
  square = caption_stamps.to_square(picture)
  assert square.shape == (64, 64, 3) and square.dtype == np.uint8
  assert (square[:15] == 255).all() and (square[-15:] == 255).all()  # Padding above and below.
  assert (square[32, 5:60] == (255, 0, 0)).all()


def test_caption_svg_rendered_or_left_out():
  svg_only = next(txt for txt, picture in caption_stamps.stamps() if picture.suffix == ".svg")
  picture = caption_stamps._load(svg_only.with_suffix(".svg"))  # pylint: disable=protected-access
  if caption_stamps._svg_to_png() is None:  # pylint: disable=protected-access
    assert picture is None
  else:
    assert caption_stamps.to_square(picture).min() < 200


def test_caption_prepare_and_read_back(tmp_path):
  _, sources = _prepare_small(caption_stamps.CaptionStamps, tmp_path)
  for source in sources.values():
    ex = source[0]
    assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert ex["caption"].decode()


def test_caption_missing_and_corrupt(monkeypatch, tmp_path):
  missing = tmp_path / "stamps"
  monkeypatch.setattr(caption_stamps, "STAMPS_DIR", missing)
  with pytest.raises(SourceError, match="caption_stamps.*stamps"):
    next(caption_stamps.examples("train"))
  missing.mkdir()
  (missing / "thing.txt").write_text("A thing.\nfr.utf8=Une chose.\n")
  (missing / "thing.png").write_bytes(b"not a png")
  with pytest.raises(SourceError, match=r"caption_stamps.*thing\.png"):
    next(caption_stamps.examples(caption_stamps.split_of("thing")))


# parse_en -----------------------------------------------------------------------------------------


def test_parse_features(tmp_path):
  builder = parse_en.ParseEn(data_dir=str(tmp_path))
  assert builder.name == "parse_en" and str(builder.version) == "1.0.0"
  assert isinstance(builder.info.features["sentence"], tfds.features.Text)
  assert isinstance(builder.info.features["tree"], tfds.features.Text)


def test_parse_examples_and_disjoint_splits():
  splits = {s: dict(itertools.islice(parse_en.examples(s), 25)) for s in parse_en.SPLIT_SIZES}
  sentences = {s: {ex["sentence"] for ex in got.values()} for s, got in splits.items()}
  assert all(len(found) == 25 for found in sentences.values())
  assert not sentences["train"] & sentences["validation"]
  assert not sentences["train"] & sentences["test"]
  assert not sentences["validation"] & sentences["test"]
  for split, got in splits.items():
    for ex in got.values():
      assert parse_en.split_of(ex["sentence"]) == split
      tree = ex["tree"]
      assert tree.startswith("(S") and tree.endswith(")") and _balanced(tree), tree
      assert tree == " ".join(tree.split()) and not re.search(r"[{}\[\]]|\w\.[a-z]", tree), tree
      words = ex["sentence"].split()
      assert parse_en.MIN_WORDS <= len(words) <= parse_en.MAX_WORDS


def test_parse_linearize():
  raw = "(S (NP God.m)\n   (VP saw.v-d\n       (NP the light.s)\n       , and.j-v saw.v-d)\n   .)\n"
  assert parse_en.linearize(raw) == "(S (NP God) (VP saw (NP the light) , and saw) .)"
  assert parse_en.linearize("(NP Canaan{!<CAPITALIZED-WORDS>} ,.j Mr.)") == "(NP Canaan , Mr.)"


def test_parse_prepare_and_read_back(tmp_path):
  _, sources = _prepare_small(parse_en.ParseEn, tmp_path)
  for source in sources.values():
    ex = source[0]
    assert ex["sentence"].decode() and _balanced(ex["tree"].decode())


def test_parse_missing_and_corrupt_bible(monkeypatch, tmp_path):
  bible = tmp_path / "bible.db"
  monkeypatch.setattr(parse_en, "bible_db_path", lambda: bible)
  with pytest.raises(SourceError, match=r"parse_en.*bible\.db.*missing"):
    next(parse_en.examples("train"))
  bible.write_bytes(b"this is not sqlite" * 100)
  with pytest.raises(SourceError, match=r"parse_en.*bible\.db.*not a readable"):
    next(parse_en.examples("train"))
