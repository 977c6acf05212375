"""`multimodel_tiny`: D=128, hidden 512, 2 layers. A forward/backward pass takes seconds on CPU."""

from multimodel.configs import common


def get_config():
  return common.make(
      model=dict(d_model=128, hidden=512, num_heads=4, encoder_blocks=2, mixer_blocks=1,
                 decoder_blocks=2, num_experts=4, top_k=2),
  )
