"""The model's FLOP formula (multimodel/flops.py) against XLA's count of the real train step."""

import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from multimodel import flops, moe, optim, trainer
from multimodel.configs import common, tiny
from multimodel.model import MultiModel, TaskSpec

CONFIG = tiny.get_config()

CASES = {  # name: (task, inputs shape and dtype, targets shape)
    "text_to_text": (TaskSpec("text", "text", 3), ((16, 32), jnp.int32), (16, 32)),
    "image_to_label": (TaskSpec("image", "label", 4, num_classes=10), ((8, 28, 28, 3),
                                                                       jnp.float32), (8,)),
    "audio_to_text": (TaskSpec("audio", "text", 5), ((4, 256, 80), jnp.float32), (4, 64)),
}


def abstract_state(config):
  """Shapes of the trainer's state for a config (nothing is initialised)."""
  model = nnx.eval_shape(lambda: MultiModel(config.model, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(model, nnx.Param)
  tx = optim.make(config.train, config.model.d_model)
  scalar = jax.ShapeDtypeStruct((), jnp.int32)
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": scalar,
           "skipped": scalar, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
  return graphdef, tx, state


def xla_over_formula(config, case: str) -> float:
  """XLA's FLOP count of the lowered train step over the formula's (no compilation: fast)."""
  graphdef, tx, state = abstract_state(config)
  task, (inputs_shape, dtype), targets_shape = CASES[case]
  batch = {"inputs": jax.ShapeDtypeStruct(inputs_shape, dtype),
           "targets": jax.ShapeDtypeStruct(targets_shape, jnp.int32)}
  if task.input_modality == "audio":
    batch["input_mask"] = jax.ShapeDtypeStruct(inputs_shape[:2], jnp.bool_)
  step = jax.jit(functools.partial(trainer.train_step, graphdef=graphdef, tx=tx,
                                   tasks=(("task", task),)))
  # benchmarks/mfu.py checks the compiled program's count.
  xla = step.lower(state, {"task": batch}, jax.random.key(0),
                   jnp.ones((1,), jnp.float32)).cost_analysis()["flops"]
  return xla / flops.train_step_flops(config.model, task, inputs_shape, targets_shape)


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_flops_match_xla(case):
  """XLA counts the formula's matmul and convolution FLOPs plus a few % of elementwise work."""
  assert 1.0 <= xla_over_formula(CONFIG, case) <= 1.1


def test_flops_of_a_label_read_by_the_decoder_match_xla():
  config = common.make(model=dict(CONFIG.model.to_dict(), label_head="decoder"),
                       train=CONFIG.train.to_dict(), data=CONFIG.data.to_dict())
  assert 1.0 <= xla_over_formula(config, "image_to_label") <= 1.1
  parts = flops.forward_flops(config.model, CASES["image_to_label"][0], (8, 28, 28, 3), (8,))
  assert parts["output"] == 2 * 8 * config.model.d_model * config.model.num_labels
  assert parts["decoder"] > 0 and parts["mixer"] > 0


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
