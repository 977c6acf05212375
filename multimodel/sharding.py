"""Logical axis names of parameters and activations, and their mapping onto a device mesh.

Modules tag parameters with logical names (`nnx.with_partitioning(init, (EMBED, MLP))`); the config
maps logical names to mesh axes (`data`, `expert`), so that sharding is chosen without touching the
modules. `None` means replicated.
"""

EMBED = "embed"  # D
MLP = "mlp"  # hidden of feed-forward layers and experts
HEADS = "heads"  # H * head_dim of attention projections
VOCAB = "vocab"  # V
EXPERT = "expert"  # E
LABELS = "labels"  # the shared label space
CONV = "conv"  # kernel taps / channels of convolutions (replicated)

# Default mapping from logical axes to mesh axes: experts sharded across the `expert` mesh axis,
# everything else replicated; the batch is sharded across `data`.
DEFAULT_RULES = (
    (EXPERT, "expert"),
    (EMBED, None),
    (MLP, None),
    (HEADS, None),
    (VOCAB, None),
    (LABELS, None),
    (CONV, None),
)
