"""tensor2tensor `multimodel_base` sizes in the paper's layout.

D=512, hidden 2048, 8 heads, 30 experts, k=2, MoE loss 1e-2, dropout 0.1, label smoothing 0.1;
encoder of 6 conv blocks, mixer of attention + 2 conv blocks, decoder of 4 blocks; image stem with
3 residual blocks (16x downsampling, the Xception entry flow).
"""

from multimodel.configs import common


def get_config():
  return common.make(
      model=dict(d_model=512, hidden=2048, num_heads=8, encoder_blocks=6, mixer_blocks=2,
                 decoder_blocks=4, num_experts=30, top_k=2, moe_loss_coef=1e-2, dropout=0.1,
                 label_smoothing=0.1, image=dict(stem_filters=32, res_blocks=3)),
  )
