"""Command-line entries: `python train.py` / `multimodel-train`.

    python train.py --config multimodel/configs/default.py --workdir runs/default \
        [--config.train.steps=500 --config.data.tasks=image_mnist5k,translate_en_fr] [--init CKPT]
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from multimodel import host_memory

FLAGS = flags.FLAGS


def _define_train_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (a Python file with get_config()).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory of the run: config, checkpoints, metrics.")
  flags.DEFINE_string("init", None, "Warm-start weights from this checkpoint or workdir.")
  flags.mark_flags_as_required(["config", "workdir"])


def _train(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from multimodel import checkpoint, trainer  # Heavy imports after flag parsing.
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir, init=FLAGS.init)
  except (checkpoint.WorkdirError, trainer.NonFiniteError, KeyError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


def _config_path(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_overrides(argv) -> str | None:
  """An error message for the first `--config.a.b=...` naming no field of the config, else None."""
  path = _config_path(argv)
  if path is None:
    return None
  config = config_flags.config_flags._LoadConfigModule("config", path).get_config()  # noqa
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    keys = arg[len("--config."):].split("=", 1)[0].split(".")
    node, where = config, "config"
    for key in keys:
      if not hasattr(node, "keys") or key not in node:
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"unknown config key {where}.{key} (in {arg}); valid keys of {where}: {valid}"
      node, where = node[key], f"{where}.{key}"
  return None


def train_main(argv=None):
  host_memory.keep_freed_memory()  # Before any thread starts.
  argv = sys.argv if argv is None else argv
  problem = check_overrides(argv)
  if problem:
    print(f"error: {problem}", file=sys.stderr)
    sys.exit(2)
  _define_train_flags()
  app.run(_train, argv=argv)
