"""Runs an exported model on files: `python -m multimodel.predict` / `multimodel-predict`.

    python -m multimodel.predict --export EXPORT --task image_mnist5k digit.png photo.jpg
    python -m multimodel.predict --export EXPORT --task speech_en hello.wav
    python -m multimodel.predict --export EXPORT --task translate_en_fr sentences.txt
    python -m multimodel.predict --export EXPORT --task translate_en_fr --text "Hello."
    cat sentences.txt | python -m multimodel.predict --export EXPORT --task translate_en_fr -

One prediction per input, in input order, on stdout: the class name (or index) for classifiers,
the decoded text for sequence targets (`--format jsonl` adds the top classes and their
probabilities, or the token ids). Inputs, by the task's input modality:
  image: PNG or JPEG files (any size and mode: resized so the shorter side is the task's image
         size, centre-cropped, grayscale tiled to RGB, scaled to [-1, 1]);
  audio: WAV files (any rate, mixed down to mono, resampled to the features' rate, log-mel frames);
  text:  UTF-8 text files, `-` (stdin) or `--text LINE`, one input per non-blank line;
  label: the same, one class index per line.
This is the preprocessing of `data.preprocess`, replicated here (and tested against it). Inputs
over the task's length cap are cut to it, with a warning.

Needs only jax, numpy, sentencepiece (text), pillow (images), soundfile and scipy (audio; scipy
comes with jax): nothing of the training code, flax, optax, orbax or TensorFlow is imported.
Images and log-mel features are prepared by `modalities/image_features.py` and
`modalities/audio_features.py` (numpy only; the input pipeline uses the same functions), loaded by
path so that the modality nets next to them are not imported. A file of the wrong kind, a corrupt file or an
unknown task stops with a one-line error naming it (exit status 2).

Shape legend: B batch, S source length, T decoded length, H, W image size, M mel bins,
F audio frames, K top classes.
"""

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import sys
import zipfile

import numpy as np

PAD_ID = 0
EOS_ID = 1


class PredictError(Exception):
  """A problem of the export, the task or an input, reported as one line (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# Preprocessing: the same arrays as `data.preprocess` makes of the same inputs.

def normalize_image(image: np.ndarray, size: int | None) -> np.ndarray:
  """uint8 [H, W, C] (C = 1, 3 or 4) -> float32 [size, size, 3] in [-1, 1]."""
  return _features("image_features").normalize(image, size)


def read_image(path: pathlib.Path) -> np.ndarray:
  """The pixels of an image file as uint8 [H, W, C], C = 1 (grayscale), 3 (RGB) or 4 (RGBA).

  Raises:
    PredictError: not an image PIL can decode, or a truncated or corrupt one.
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as pil:
      pil.load()
      if pil.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte.
        return (np.asarray(pil, np.uint16) >> 8).astype(np.uint8)
      if pil.mode not in ("L", "RGB", "RGBA"):
        pil = pil.convert("L" if pil.mode in ("1", "I", "F", "LA", "La") else "RGB")
      return np.asarray(pil)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise PredictError(f"{path}: not a readable image ({e})") from None


def load_image(path: str | pathlib.Path, size: int | None) -> np.ndarray:
  """An image file -> float32 [size, size, 3], as the input pipeline prepares images."""
  return normalize_image(read_image(pathlib.Path(path)), size)


def _features(name: str):
  """`modalities/NAME.py` (numpy only), loaded by path: importing the `modalities` package would
  import the modality nets (flax) along with it."""
  module = sys.modules.get(f"modalities.{name}") or sys.modules.get(f"multimodel_predict_{name}")
  if module is not None:
    return module
  path = pathlib.Path(__file__).resolve().parents[1] / "modalities" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"multimodel_predict_{name}", path)
  if spec is None or not path.is_file():
    raise PredictError(f"modalities/{name}.py not found next to {pathlib.Path(__file__)}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  sys.modules[f"multimodel_predict_{name}"] = module
  return module


def read_audio(path: pathlib.Path) -> tuple[np.ndarray, int]:
  """A sound file's samples, float32 [N] in [-1, 1] (channels averaged), and its rate.

  Raises:
    PredictError: not a sound file soundfile can read.
  """
  import soundfile  # pylint: disable=import-outside-toplevel
  try:
    wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # [N, channels]
  except (RuntimeError, ValueError, TypeError, EOFError) as e:  # LibsndfileError is a RuntimeError.
    raise PredictError(f"{path}: not a readable WAV file ({e})") from None
  return wave.mean(axis=1), int(rate)


def log_mel(wave: np.ndarray, rate: int, features: dict) -> np.ndarray:
  """Waveform [N] float at `rate` -> float32 [F, M] log-mel frames (`features` of tasks.json)."""
  audio_features = _features("audio_features")
  wave = audio_features.resample(np.asarray(wave, np.float32), rate, features["sample_rate"])
  return audio_features.log_mel(wave, features["sample_rate"], features["frame_length"],
                                   features["frame_step"], features["num_mel_bins"])


def load_audio(path: str | pathlib.Path, features: dict) -> np.ndarray:
  """A WAV file -> float32 [F, M] log-mel frames, as the input pipeline prepares audio."""
  wave, rate = read_audio(pathlib.Path(path))
  return log_mel(wave, rate, features)


def read_lines(path: str | pathlib.Path) -> list[tuple[str, str]]:
  """The non-blank lines of a UTF-8 text file ("-": stdin) as (where, line) pairs.

  Raises:
    PredictError: binary or non-UTF-8 content.
  """
  if str(path) == "-":
    return [(f"<stdin>:{i}", line.strip()) for i, line in enumerate(sys.stdin, 1) if line.strip()]
  data = pathlib.Path(path).read_bytes()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise PredictError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if "\x00" in text:
    raise PredictError(f"{path}: not a text file (it holds NUL bytes)")
  return [(f"{path}:{i}", line.strip()) for i, line in enumerate(text.splitlines(), 1)
          if line.strip()]


# ---------------------------------------------------------------------------------------------
# The export folder.

@dataclasses.dataclass
class Export:
  """An export folder (see `multimodel.export`): tasks.json read, the rest loaded on demand."""

  path: pathlib.Path
  tasks: dict[str, dict]

  @classmethod
  def open(cls, path: str | pathlib.Path) -> "Export":
    path = pathlib.Path(path)
    if not (path / "tasks.json").is_file():
      raise PredictError(f"{path} is not an export folder (no tasks.json); write one with "
                         "`python -m multimodel.export --workdir RUN --out FOLDER`")
    return cls(path, json.loads((path / "tasks.json").read_text()))

  def task(self, name: str) -> dict:
    if name not in self.tasks:
      raise PredictError(f"task {name!r} is not in the export {self.path}; its tasks: "
                         f"{', '.join(sorted(self.tasks))}")
    return self.tasks[name]

  def params(self) -> dict[str, np.ndarray]:
    """{"/"-joined path: array}: the program's first argument (no pickled objects are read)."""
    path = self.path / "params.npz"
    try:
      with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise PredictError(f"{path}: not readable parameters ({e})") from None

  def tokenizer(self):
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    path = self.path / "tokenizer.model"
    if not path.is_file():
      raise PredictError(f"{path} is missing: the export has no tokenizer for text")
    return spm.SentencePieceProcessor(model_proto=path.read_bytes())

  def program(self, name: str):
    """The deserialized `jax.export.Exported` of a task."""
    import jax  # pylint: disable=import-outside-toplevel
    path = self.path / self.task(name)["program"]
    try:
      exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except Exception as e:  # pylint: disable=broad-except  # Missing, truncated or foreign bytes.
      raise PredictError(f"{path}: not a readable exported program ({type(e).__name__}: {e})"
                         ) from None
    backend = jax.default_backend()
    if backend not in exported.platforms:
      raise PredictError(
          f"the program of task {name!r} was exported for {', '.join(exported.platforms)} but "
          f"jax runs on {backend} here: export again with --platforms "
          f"{','.join(exported.platforms + (backend,))}, or set JAX_PLATFORMS=cpu")
    return exported


# ---------------------------------------------------------------------------------------------
# Inputs -> program arguments -> predictions.

KIND = {"image": "PNG or JPEG images", "audio": "WAV audio files",
        "text": "UTF-8 text files with one input per line (or --text LINE)",
        "label": "text files with one class index per line (or --text INDEX)"}


def read_inputs(name: str, info: dict, files: list[str], texts: list[str],
                tokenizer=None) -> list[tuple[str, np.ndarray]]:
  """(where, preprocessed input) of every input: one per image or audio file, one per line.

  Raises:
    PredictError: a missing file or one of the wrong kind, naming the file, the task and what it
      expects.
  """
  modality = info["input_modality"]
  if texts and modality in ("image", "audio"):
    raise PredictError(f"task {name!r} expects {KIND[modality]}, not --text lines")
  items = []
  for f in files:
    path = pathlib.Path(f)
    if f != "-" and not path.is_file():
      raise PredictError(f"{f}: no such file" if not path.exists() else f"{f}: not a file")
    try:
      if modality == "image":
        items.append((f, load_image(path, info["image_size"])))
      elif modality == "audio":
        items.append((f, load_audio(path, info["audio_features"])))
      else:
        items += [(where, line_input(line, modality, info, tokenizer))
                  for where, line in read_lines(f)]
    except PredictError as e:
      raise PredictError(f"{e}; task {name!r} expects {KIND[modality]}") from None
  for i, text in enumerate(texts, 1):
    if not text.strip():
      raise PredictError(f"--text {i} is blank; task {name!r} expects {KIND[modality]}")
    items.append((f"--text {i}", line_input(text.strip(), modality, info, tokenizer)))
  if not items:
    raise PredictError(f"no inputs: task {name!r} expects {KIND[modality]}")
  return items


def line_input(line: str, modality: str, info: dict, tokenizer) -> np.ndarray:
  """One line of text -> int32 [L] SentencePiece ids (no EOS, as inputs have none), or a class
  index for a label input."""
  if modality == "label":
    try:
      index = int(line)
    except ValueError:
      raise PredictError(f"{line!r} is not a class index") from None
    if not 0 <= index < info["num_classes"]:
      raise PredictError(f"class index {index} outside [0, {info['num_classes']})")
    return np.asarray(index, np.int32)
  return np.asarray(tokenizer.encode(line, out_type=int), np.int32)  # [L], no EOS on inputs.


def batches(items: list[np.ndarray], info: dict):
  """Program arguments [inputs[, input_mask]] of B inputs at a time, padded to the program's
  shapes (sequences to S; the last batch with copies of its last input). Yields (args, count)."""
  spec = info["inputs"]["inputs"]
  b, shape = spec["shape"][0], spec["shape"][1:]
  for start in range(0, len(items), b):
    chunk = items[start:start + b]
    count = len(chunk)
    chunk = chunk + [chunk[-1]] * (b - count)
    inputs = np.zeros([b] + shape, spec["dtype"])
    mask = np.zeros(inputs.shape[:2], bool) if "input_mask" in info["inputs"] else None
    for row, x in enumerate(chunk):
      if info["input_modality"] in ("text", "audio"):
        inputs[row, :len(x)] = x
        if mask is not None:
          mask[row, :len(x)] = True
      else:
        inputs[row] = x
    yield ([inputs] if mask is None else [inputs, mask]), count


def _fit(where: str, x: np.ndarray, info: dict) -> np.ndarray:
  """Cuts a text or audio input to the program's length S, with a warning."""
  if info["input_modality"] not in ("text", "audio"):
    return x
  length = info["inputs"]["inputs"]["shape"][1]
  if len(x) > length:
    unit = "tokens" if info["input_modality"] == "text" else "frames"
    print(f"warning: {where}: {len(x)} {unit}; the model reads the first {length}",
          file=sys.stderr)
  return x[:length]


def predict(export: Export, name: str, files: list[str], texts: list[str] = ()) -> list[dict]:
  """Predictions of task `name` for the inputs, one dict per input, in order.

  Each dict holds "input" (where it came from) and "prediction" (class name or index, or decoded
  text), plus "top" ([class, probability] of the K best) or "tokens" (the decoded ids).
  """
  info = export.task(name)
  needs_tokenizer = "text" in (info["input_modality"], info["target_modality"])
  tokenizer = export.tokenizer() if needs_tokenizer else None
  items = read_inputs(name, info, list(files), list(texts), tokenizer)
  items = [(where, _fit(where, x, info)) for where, x in items]

  import jax  # pylint: disable=import-outside-toplevel
  program = export.program(name)
  params = jax.device_put(export.params())
  names = info.get("class_names")
  results = []
  arrays = [x for _, x in items]
  for args, count in batches(arrays, info):
    out = jax.device_get(program.call(params, *args))
    for row in range(count):
      where = items[len(results)][0]
      if info["target_modality"] == "label":
        classes, probs = out["classes"][row].tolist(), out["probabilities"][row].tolist()
        label = lambda i: names[i] if names else str(i)
        results.append({"input": where, "prediction": label(classes[0]),
                        "top": [[label(i), round(p, 6)] for i, p in zip(classes, probs)]})
      else:
        tokens = [int(t) for t in out["tokens"][row]]
        results.append({"input": where, "prediction": decode_text(tokenizer, tokens),
                        "tokens": until_eos(tokens)})
  return results


def until_eos(tokens: list[int]) -> list[int]:
  """The ids up to and including the first EOS."""
  return tokens[:tokens.index(EOS_ID) + 1] if EOS_ID in tokens else tokens


def decode_text(tokenizer, ids: list[int]) -> str:
  """Text of decoded ids: stops at EOS, skips padding and ids outside the vocabulary."""
  size = tokenizer.get_piece_size()
  return tokenizer.decode([i for i in until_eos(ids) if i not in (PAD_ID, EOS_ID) and i < size])


# ---------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="multimodel-predict", description="Runs an exported model on images, audio or text.")
  parser.add_argument("--export", required=True, help="The folder multimodel-export wrote.")
  parser.add_argument("--task", required=True, help="One of the exported tasks.")
  parser.add_argument("files", nargs="*", metavar="FILE",
                      help="Image, WAV or text files (text: one input per line; '-': stdin).")
  parser.add_argument("--text", action="append", default=[], metavar="LINE",
                      help="A literal text input (repeatable).")
  parser.add_argument("--format", default="plain", choices=("plain", "jsonl"),
                      help="plain: one prediction per line; jsonl: one JSON object per line.")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  """The command line; returns the exit status (2 on a problem with the export or an input)."""
  args = parse_args(argv)
  try:
    export = Export.open(args.export)
    results = predict(export, args.task, args.files, args.text)
  except PredictError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r in results:
    print(json.dumps(r, ensure_ascii=False) if args.format == "jsonl" else r["prediction"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
