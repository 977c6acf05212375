"""Export and standalone prediction: a tiny run trained by the real CLI on real embedded data is
exported; its programs reproduce the model's own predictions, a subset export keeps only the
modality nets it needs, `multimodel.predict` runs without the training stack and names bad inputs.

Shapes: B batch, S source length, T decoded length, K top classes.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from data import preprocess, sources
from data import tasks as tasks_lib
from data.tokenizer import Tokenizer
from multimodel import checkpoint, decode, evaluate, evaluation, export, predict
from multimodel.model import MultiModel
from tests import tiny_data
from tests.test_decode import tree_prefix_ok
from tests.test_train import train_cmd

ROOT = pathlib.Path(__file__).resolve().parents[1]
DECODE_LENGTH = 24
# Persistent across test runs and modules: the tiny runs compile the same train steps.
CACHE = pathlib.Path(tempfile.gettempdir()) / "multimodel-tests-jax-cache"

# Runs `multimodel.predict` with the training stack made unimportable; exit status 3 if any of
# it (or a module of ours other than the predictor) was imported anyway.
BLOCKED_RUNNER = """
import importlib.abc, sys
BLOCKED = {"flax", "optax", "orbax", "tensorflow", "tensorflow_datasets", "ml_collections",
           "data", "modalities"}
OURS = {"multimodel", "multimodel.predict"}

def blocked(name):
  top = name.split(".")[0]
  return top in BLOCKED or (top == "multimodel" and name not in OURS)

class Blocker(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if blocked(name):
      raise ImportError(f"{name} is not installed")
    return None

sys.meta_path.insert(0, Blocker())
from multimodel import predict
status = predict.main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if blocked(m))
if loaded:
  print("imported:", loaded, file=sys.stderr)
  sys.exit(3)
sys.exit(status)
"""


def train_tiny_run(workdir: pathlib.Path) -> None:
  """2 steps of the real CLI on image_mnist5k and translate_en_fr with a small model."""
  environ = dict(os.environ, MULTIMODEL_DATA_DIR=str(tiny_data.data_dir()), PYTHONPATH=str(ROOT),
                 TF_CPP_MIN_LOG_LEVEL="3")
  environ.pop("XLA_FLAGS", None)
  cmd = train_cmd(workdir, CACHE, "--config.train.steps=2", "--config.train.eval_max_examples=-1",
                  "--config.train.plot=False", "--config.train.checkpoint_every=0")
  result = subprocess.run(cmd, env=environ, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def data_env():
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MULTIMODEL_DATA_DIR", str(tiny_data.data_dir()))
    yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_env):
  workdir = tmp_path_factory.mktemp("run")
  train_tiny_run(workdir)
  return checkpoint.load_run(workdir)


@pytest.fixture(scope="module")
def full_export(run, tmp_path_factory):
  """Both tasks, through the command line."""
  out = tmp_path_factory.mktemp("export")
  environ = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "multimodel.export", "--workdir", str(run.workdir), "--out", str(out),
       f"--max_decode_length={DECODE_LENGTH}"],
      env=environ, capture_output=True, text=True, timeout=600, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-4000:]
  assert "exported image_mnist5k, translate_en_fr" in result.stdout
  return out


@pytest.fixture(scope="module")
def image_export(run, tmp_path_factory):
  """Only image_mnist5k, in process."""
  return export.export(run.workdir, tmp_path_factory.mktemp("image_export"),
                       task_names=["image_mnist5k"])


def pipeline_input(task_name: str, index: int, tokenizer=None) -> np.ndarray:
  """Example `index` of the task's test split, as the input pipeline prepares it."""
  task = tasks_lib.get(task_name)
  return preprocess.for_task(task, tokenizer)(sources.open_split(task, "test")[index])["inputs"]


def load_program(folder: pathlib.Path, task: str):
  return jax.export.deserialize(bytearray((folder / f"{task}.jaxexport").read_bytes()))


def load_params(folder: pathlib.Path) -> dict:
  with np.load(folder / "params.npz", allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def test_export_folder_holds_params_config_tokenizer_tasks_and_programs(run, full_export):
  params = load_params(full_export)  # No pickled object can load: allow_pickle=False.
  assert all(v.dtype == np.float32 for v in params.values())
  assert params.keys() == {k for k in run.params if not k.startswith("modalities/audio/")}
  for key, value in params.items():
    np.testing.assert_array_equal(value, run.params[key], err_msg=key)
  assert sum(v.size for v in params.values()) == json.loads(
      (full_export / "export.json").read_text())["num_parameters"]
  config = json.loads((full_export / "config.json").read_text())
  assert config["model"]["d_model"] == 32
  assert (full_export / "tokenizer.model").read_bytes() == run.tokenizer_bytes
  tasks = json.loads((full_export / "tasks.json").read_text())
  assert sorted(tasks) == ["image_mnist5k", "translate_en_fr"]
  mnist, translate = tasks["image_mnist5k"], tasks["translate_en_fr"]
  assert (mnist["input_modality"], mnist["target_modality"], mnist["num_classes"]) == (
      "image", "label", 10)
  assert mnist["command_id"] == tasks_lib.command_id("to_label") and mnist["image_size"] == 28
  assert mnist["class_names"] == [str(i) for i in range(10)]
  assert mnist["inputs"]["inputs"]["shape"] == [1, 28, 28, 3]
  assert translate["command"] == "to_fr" and translate["metrics"] == ["bleu", "chrf"]
  assert translate["inputs"]["inputs"] == {"shape": [1, 128], "dtype": "int32"}
  assert translate["max_decode_length"] == DECODE_LENGTH
  assert translate["no_repeat_ngram"] == 3 and mnist["no_repeat_ngram"] is None
  assert translate["beam_size"] == 1 and translate["ctc_weight"] == 0.0
  assert mnist["beam_size"] is None and mnist["ctc_weight"] is None
  assert translate["audio_features"]["num_mel_bins"] == 80
  for name in tasks:
    assert load_program(full_export, name).in_avals[-1].shape == tuple(
        tasks[name]["inputs"]["inputs"]["shape"])


def test_run_decoding_follows_the_runs_evaluation():
  """A program decodes as the run's final evaluation: each task's own beams and n-gram rule where
  the run's train.eval_* are unset (or decoded nothing), else the run's."""
  from multimodel.configs import tiny  # pylint: disable=import-outside-toplevel
  train = tiny.get_config().train
  translate, parse = tasks_lib.get("translate_en_fr"), tasks_lib.get("parse_en")
  assert export.run_decoding(translate, train) == {"beam_size": 1, "no_repeat_ngram": 3}
  assert export.run_decoding(parse, train) == {"beam_size": 4, "no_repeat_ngram": 0}
  with train.unlocked():
    train.eval_decode = "none"
  assert export.run_decoding(parse, train) == {"beam_size": 4, "no_repeat_ngram": 0}
  with train.unlocked():
    train.eval_decode, train.eval_no_repeat_ngram = "greedy", 0
  assert export.run_decoding(parse, train)["beam_size"] == 1
  assert export.run_decoding(translate, train) == {"beam_size": 1, "no_repeat_ngram": 0}
  with train.unlocked():
    train.eval_decode, train.eval_beam_size = "beam", 2
  assert export.run_decoding(translate, train)["beam_size"] == 2


def test_a_refused_export_leaves_the_folder_as_it_was(run, image_export, tmp_path, monkeypatch):
  """Every task's decoding is settled before the folder changes: an export refused there (here a
  joint CTC decoding the model cannot do) deletes and writes nothing."""
  out = tmp_path / "export"
  shutil.copytree(image_export, out)
  before = {f.name: f.read_bytes() for f in out.iterdir()}

  def refuse(*args):
    raise ValueError("joint CTC decoding needs a CTC head over letters")

  monkeypatch.setattr(evaluation, "joint_ctc", refuse)
  with pytest.raises(ValueError, match="CTC head"):
    export.export(run.workdir, out)
  assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def classify_in_process(graphdef, params, task_name, images):
  """The model's own top classes: images [B, H, W, 3] -> (probabilities, classes) [B, K]."""
  spec = evaluation.task_spec(tasks_lib.get(task_name))

  @jax.jit
  def top(params, images):
    logits, _ = nnx.merge(graphdef, params)(spec, images, jnp.zeros(images.shape[:1], jnp.int32))
    return jax.lax.top_k(jax.nn.softmax(logits), 5)

  return jax.device_get(top(params, images))


def test_programs_reproduce_the_models_predictions(run, full_export):
  graphdef, params = evaluate.model_from_run(run)  # All modality nets, as in training.
  exported_params = load_params(full_export)

  classify = load_program(full_export, "image_mnist5k")
  for index in range(3):
    image = pipeline_input("image_mnist5k", index)[None]  # [1, 28, 28, 3]
    out = classify.call(exported_params, image)
    probabilities, classes = classify_in_process(graphdef, params, "image_mnist5k", image)
    np.testing.assert_array_equal(out["classes"], classes)
    np.testing.assert_allclose(out["probabilities"], probabilities, rtol=1e-5, atol=1e-6)

  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)
  translate = load_program(full_export, "translate_en_fr")
  task = tasks_lib.get("translate_en_fr")
  decoder = decode.make_decoder(graphdef, evaluation.task_spec(task), max_length=DECODE_LENGTH,
                                no_repeat_ngram=task.no_repeat_ngram)
  loops = decode.make_decoder(graphdef, evaluation.task_spec(task), max_length=DECODE_LENGTH)
  differs = []
  # The trained weights, and random ones (their greedy outputs are long, not just EOS): the
  # parameters are an input of the program, and it decodes with the task's n-gram rule.
  model = MultiModel(run.config.model, rngs=nnx.Rngs(1))
  _, random_params = nnx.split(model, nnx.Param)
  random_flat = dict(zip(checkpoint.param_keys(random_params), jax.tree.leaves(random_params)))
  for state, flat in ((params, exported_params),
                      (random_params, {k: random_flat[k] for k in exported_params})):
    for index in range(2):
      ids = pipeline_input("translate_en_fr", index, tokenizer)
      inputs = np.zeros((1, task.max_input_length), np.int32)  # [1, S]
      inputs[0, :len(ids)] = ids
      tokens = np.asarray(translate.call(flat, inputs)["tokens"])  # [1, T]
      np.testing.assert_array_equal(tokens, np.asarray(decoder(state, inputs)))
      grams = [tuple(tokens[0, i:i + 3]) for i in range(DECODE_LENGTH - 2) if tokens[0, i + 2]]
      assert len(grams) == len(set(grams)), tokens
      differs.append(not np.array_equal(tokens, np.asarray(loops(state, inputs))))
  assert (tokens != 0).sum() > 1
  assert any(differs)  # Without the rule some output repeats a 3-gram: the program has the rule.


@pytest.mark.parametrize("beam_size", [1, 3])
def test_tree_programs_decode_with_the_bracket_rule(run, beam_size):
  """A task with `balanced_brackets` and `leaves_are_input` (parse_en) gets the tokenizer's bracket
  and word tables in its program: it decodes as the evaluation's decoder with them does, and its
  random-weight outputs, which would otherwise not be trees, open one, never close more brackets
  than it opened, and write the input's pieces as their words; with `beam_size` > 1 it is the
  evaluation's beam search (parse_en's own decoding, `Task.beam_size`)."""
  task = tasks_lib.get("parse_en")
  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)
  deltas = evaluation.bracket_deltas(task, tokenizer)
  assert deltas is not None and evaluation.bracket_deltas(tasks_lib.get("translate_en_fr"),
                                                          tokenizer) is None
  model = MultiModel(run.config.model, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model, nnx.Param)
  flat = dict(zip(checkpoint.param_keys(params), jax.tree.leaves(params)))
  starts = evaluation.word_starts(task, tokenizer)
  assert starts is not None and evaluation.word_starts(tasks_lib.get("translate_en_fr"),
                                                       tokenizer) is None
  rules = dict(bracket_deltas=deltas, word_starts=starts, max_open_run=task.max_open_run)
  fn = jax.jit(export.prediction_fn(graphdef, params, task, max_decode_length=DECODE_LENGTH,
                                    beam_size=beam_size, **rules))
  decoder = decode.make_decoder(graphdef, evaluation.task_spec(task), max_length=DECODE_LENGTH,
                                method="beam" if beam_size > 1 else "greedy",
                                beam_size=beam_size, **rules)
  inputs = np.zeros((2, task.max_input_length), np.int32)  # [2, S]
  for row, index in enumerate((0, 1)):
    ids = pipeline_input("parse_en", index, tokenizer)
    inputs[row, :len(ids)] = ids
  tokens = np.asarray(fn(flat, inputs)["tokens"])  # [2, T]
  np.testing.assert_array_equal(tokens, np.asarray(decoder(params, inputs)))
  if beam_size > 1:  # Beam search finds other trees than greedy decoding here.
    greedy = decode.make_decoder(graphdef, evaluation.task_spec(task), max_length=DECODE_LENGTH,
                                 **rules)
    assert not np.array_equal(tokens, np.asarray(greedy(params, inputs)))
  deltas = np.pad(deltas, (0, run.config.model.vocab_size - len(deltas)))  # Ids past the tokens.
  assert all(tree_prefix_ok(row.tolist(), deltas=deltas) for row in tokens)
  for row, words in zip(tokens, inputs):  # Its leaves are the input's first pieces.
    leaves = [i for i in row.tolist() if deltas[i] == 0 and i > 1]
    assert leaves == words[:len(leaves)].tolist(), (row, words)


def test_subset_export_keeps_only_the_nets_it_needs(image_export, full_export, tmp_path, capsys):
  params = load_params(image_export)
  assert not [k for k in params if k.startswith(("modalities/text/", "modalities/audio/"))]
  assert [k for k in params if k.startswith("modalities/image/")]
  assert [k for k in params if k.startswith("modalities/label/")]
  assert params.keys() < load_params(full_export).keys()
  assert json.loads((image_export / "export.json").read_text())["modalities"] == ["image", "label"]
  assert sorted(p.name for p in image_export.glob("*.jaxexport")) == ["image_mnist5k.jaxexport"]
  assert not (image_export / "translate_en_fr.jaxexport").exists()
  # Same predictions as the export of every net.
  image = pipeline_input("image_mnist5k", 0)[None]
  subset = load_program(image_export, "image_mnist5k").call(params, image)
  full = load_program(full_export, "image_mnist5k").call(load_params(full_export), image)
  np.testing.assert_array_equal(subset["classes"], full["classes"])

  lines = tmp_path / "lines.txt"
  lines.write_text("Hello world.\n")
  assert predict.main(["--export", str(image_export), "--task", "translate_en_fr",
                       str(lines)]) == 2
  err = capsys.readouterr().err
  assert "task 'translate_en_fr' is not in the export" in err and "image_mnist5k" in err


def run_blocked(*args) -> subprocess.CompletedProcess:
  environ = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-c", BLOCKED_RUNNER, *map(str, args)], env=environ,
                        capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_predict_runs_without_the_training_stack(run, full_export, tmp_path):
  raw = sources.open_split(tasks_lib.get("image_mnist5k"), "test")[1]["image"]  # uint8 [H, W, 1]
  png = tmp_path / "digit.png"
  Image.fromarray(raw[..., 0]).save(png)
  result = run_blocked("--export", full_export, "--task", "image_mnist5k", "--format", "jsonl",
                       png)
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = result.stdout.splitlines()
  got = json.loads(line)
  graphdef, params = evaluate.model_from_run(run)
  _, classes = classify_in_process(graphdef, params, "image_mnist5k", pipeline_input(
      "image_mnist5k", 1)[None])
  assert got["input"] == str(png) and got["prediction"] == str(classes[0, 0])
  assert [c for c, _ in got["top"]] == [str(c) for c in classes[0]]

  result = run_blocked("--export", full_export, "--task", "translate_en_fr", "--format", "jsonl",
                       "--text", "The house is small.")
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = result.stdout.splitlines()
  got = json.loads(line)
  tokenizer = Tokenizer.from_bytes(run.tokenizer_bytes)
  inputs = np.zeros((1, 128), np.int32)
  ids = tokenizer.encode("The house is small.")
  inputs[0, :len(ids)] = ids
  translate = load_program(full_export, "translate_en_fr")
  tokens = translate.call(load_params(full_export), inputs)["tokens"][0]  # [T]
  assert got["prediction"] == tokenizer.decode(tokens)
  assert got["tokens"] == predict.until_eos([int(t) for t in tokens])


def test_preprocessing_equals_the_input_pipeline(run, tmp_path):
  # Grayscale PNG of a real example, at its own size: the pipeline's array exactly.
  raw = sources.open_split(tasks_lib.get("image_mnist5k"), "test")[0]["image"]
  Image.fromarray(raw[..., 0]).save(tmp_path / "digit.png")
  np.testing.assert_array_equal(predict.load_image(tmp_path / "digit.png", 28),
                                pipeline_input("image_mnist5k", 0))
  # Resized and cropped: RGB JPEG, RGBA PNG, grayscale to a larger size.
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 57, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(tmp_path / "photo.jpg")
  Image.fromarray(np.concatenate([rgb, rgb[..., :1]], -1)).save(tmp_path / "alpha.png")
  for name, size in (("photo.jpg", 28), ("alpha.png", 16), ("digit.png", 64)):
    decoded = np.asarray(Image.open(tmp_path / name))
    expected = preprocess.image(decoded, size)
    got = predict.load_image(tmp_path / name, size)
    assert got.shape == (size, size, 3)
    np.testing.assert_array_equal(got, expected, err_msg=name)

  # Audio: 16-bit WAV at 22.05 kHz, resampled to 16 kHz, log-mel.
  import soundfile  # pylint: disable=import-outside-toplevel
  wave = (np.sin(np.arange(11025) * 0.05) * 8000).astype(np.int16)
  soundfile.write(tmp_path / "tone.wav", wave, 22050, subtype="PCM_16")
  features = {"sample_rate": 16000, "frame_length": 400, "frame_step": 160, "num_mel_bins": 80}
  expected = preprocess.audio(wave, 22050, preprocess.AudioFeatures())
  np.testing.assert_allclose(predict.load_audio(tmp_path / "tone.wav", features), expected,
                             rtol=1e-5, atol=1e-5)

  # Text: the same ids as the project's tokenizer.
  line = "Où est la gare ? The station's 3rd exit."
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  processor = spm.SentencePieceProcessor(model_proto=run.tokenizer_bytes)
  ids = predict.line_input(line, "text", {}, processor).tolist()
  assert ids == Tokenizer.from_bytes(run.tokenizer_bytes).encode(line)


def test_bad_inputs_fail_with_named_errors(full_export, tmp_path, capsys):
  raw = sources.open_split(tasks_lib.get("image_mnist5k"), "test")[0]["image"]
  Image.fromarray(raw[..., 0]).save(tmp_path / "digit.png")
  truncated = tmp_path / "truncated.png"
  truncated.write_bytes((tmp_path / "digit.png").read_bytes()[:60])
  text = tmp_path / "notes.txt"
  text.write_text("not an image\n")

  def fails(*args):
    assert predict.main(["--export", str(full_export), *map(str, args)]) == 2
    return capsys.readouterr().err

  err = fails("--task", "image_mnist5k", truncated)
  assert str(truncated) in err and "not a readable image" in err and "image_mnist5k" in err
  err = fails("--task", "image_mnist5k", text)
  assert f"{text}: not a readable image" in err and "expects PNG or JPEG images" in err
  err = fails("--task", "translate_en_fr", tmp_path / "digit.png")
  assert "digit.png: not UTF-8 text" in err and "expects UTF-8 text files" in err
  err = fails("--task", "image_mnist5k", tmp_path / "missing.png")
  assert "missing.png: no such file" in err
  err = fails("--task", "no_such_task", text)
  assert "'no_such_task' is not in the export" in err and "translate_en_fr" in err

  # An audio task (its inputs are read before its program): a text file is not a WAV file.
  audio_export = tmp_path / "audio_export"
  audio_export.mkdir()
  tasks = json.loads((full_export / "tasks.json").read_text())
  tasks["speech_en"] = dict(tasks["translate_en_fr"], input_modality="audio",
                            program="speech_en.jaxexport")
  (audio_export / "tasks.json").write_text(json.dumps(tasks))
  shutil.copy(full_export / "tokenizer.model", audio_export)
  assert predict.main(["--export", str(audio_export), "--task", "speech_en", str(text)]) == 2
  err = capsys.readouterr().err
  assert f"{text}: not a readable WAV file" in err and "'speech_en' expects WAV audio" in err

  # As a process: exit status 2 and one line, no traceback.
  result = run_blocked("--export", full_export, "--task", "image_mnist5k", truncated)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
