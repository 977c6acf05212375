"""The main job: joint training on every installed embedded task on a 2-core CPU machine.

D=256 with 8 experts (k=2); 1500 steps of one task each (the paper's way), tasks drawn with
temperature 2 (rate ~ sqrt(size)). About 45 minutes on 2 CPU cores, final evaluation included.
"""

from multimodel.configs import common


def get_config():
  return common.make(
      model=dict(d_model=256, hidden=1024, num_heads=4, encoder_blocks=4, mixer_blocks=1,
                 decoder_blocks=2, num_experts=8, top_k=2),
      train=dict(steps=1500, warmup_steps=400, learning_rate=0.2, log_every=25,
                 checkpoint_every=250, eval_max_examples=200),
      data=dict(text_buckets=(32, 64, 128, 256)),
  )
