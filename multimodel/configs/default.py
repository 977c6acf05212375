"""The main job: joint training on every installed embedded task on a 2-core CPU machine."""

from multimodel.configs import common


def get_config():
  return common.make(
      model=dict(d_model=256, hidden=1024, num_heads=4, encoder_blocks=4, mixer_blocks=1,
                 decoder_blocks=2, num_experts=8, top_k=2),
  )
