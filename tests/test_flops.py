"""The model's FLOP formula (multimodel/flops.py) against XLA's count of the real train step."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from multimodel import flops, moe, optim, trainer
from multimodel.configs import tiny
from multimodel.model import MultiModel, TaskSpec

CONFIG = tiny.get_config()

CASES = {  # name: (task, inputs shape and dtype, targets shape)
    "text_to_text": (TaskSpec("text", "text", 3), ((16, 32), jnp.int32), (16, 32)),
    "image_to_label": (TaskSpec("image", "label", 4, num_classes=10), ((8, 28, 28, 3),
                                                                       jnp.float32), (8,)),
    "audio_to_text": (TaskSpec("audio", "text", 5), ((4, 256, 80), jnp.float32), (4, 64)),
}


@pytest.fixture(scope="module")
def abstract_state():
  """Shapes of the trainer's state for the tiny config (nothing is initialised)."""
  model = nnx.eval_shape(lambda: MultiModel(CONFIG.model, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make(CONFIG.train, CONFIG.model.d_model)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": scalar,
           "skipped": scalar, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return graphdef, tx, state


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_flops_match_xla(abstract_state, case):
  """XLA counts the formula's matmul and convolution FLOPs plus a few % of elementwise work."""
  graphdef, tx, state = abstract_state
  task, (inputs_shape, dtype), targets_shape = CASES[case]
  batch = {"inputs": jax.ShapeDtypeStruct(inputs_shape, dtype),
           "targets": jax.ShapeDtypeStruct(targets_shape, jnp.int32)}
  if task.input_modality == "audio":
    batch["input_mask"] = jax.ShapeDtypeStruct(inputs_shape[:2], jnp.bool_)
  step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx,
                                   tasks=(("task", task),)))
  # The lowered program's count (no compilation: fast); benchmarks/mfu.py checks the compiled one.
  xla = step.lower(state, {"task": batch}, jax.random.key(0),
                   jnp.ones((1,), jnp.float32)).cost_analysis()["flops"]
  formula = flops.train_step_flops(CONFIG.model, task, inputs_shape, targets_shape)
  assert 1.0 <= xla / formula <= 1.1, (case, xla, formula)


def test_active_experts_exclude_only_the_capacity_padding():
  task, _, _ = CASES["text_to_text"]
  cfg = CONFIG.model
  executed = flops.forward_flops(cfg, task, (16, 32), (16, 32), experts="executed")
  active = flops.forward_flops(cfg, task, (16, 32), (16, 32), experts="active")
  assert {k: v for k, v in executed.items() if not k.endswith("moe")} == {
      k: v for k, v in active.items() if not k.endswith("moe")}
  tokens, d, h = 16 * 32, cfg.d_model, cfg.hidden
  slots = cfg.num_experts * moe.capacity(tokens, cfg.num_experts, cfg.top_k, cfg.capacity_factor)
  padding = 2 * 2 * (slots - tokens * cfg.top_k) * d * h  # two expert layers, 2 * m * k * n
  assert executed["encoder_moe"] - active["encoder_moe"] == padding
  assert flops.train_step_flops(cfg, task, (16, 32), (16, 32), experts="executed") - \
      flops.train_step_flops(cfg, task, (16, 32), (16, 32), experts="active") == 3 * 2 * padding


def test_label_targets_skip_the_decoder():
  parts = flops.forward_flops(CONFIG.model, CASES["image_to_label"][0], (8, 28, 28, 3), (8,))
  assert not {"mixer", "decoder", "decoder_moe"} & set(parts)
  assert parts["output"] == 2 * 8 * CONFIG.model.d_model * CONFIG.model.num_labels
  assert flops.encoder_length(CONFIG.model, "image", (8, 28, 28, 3)) == 7 * 7  # 28 / 4
