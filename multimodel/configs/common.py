"""Defaults shared by every config, and `make()` which applies a variant's overrides and locks.

Legend used across the project for shapes: B batch, S source length, T target length, D width,
H heads, E experts, K top-k, V vocabulary, C expert capacity.
"""

import copy

import ml_collections
from ml_collections import config_dict

MODEL = dict(
    d_model=128,  # D: width of the shared body.
    hidden=512,  # Hidden width of the feed-forward experts (and of the dense layer when MoE is off).
    num_heads=4,  # H
    encoder_blocks=2,  # Conv blocks in the encoder; the MoE sits after block max(n // 2, 1) (from 1).
    mixer_blocks=1,  # Causal conv blocks in the I/O mixer (after its attention).
    decoder_blocks=2,  # Decoder blocks of (causal conv block + attention); MoE in the middle.
    kernel_size=3,  # Separable-conv kernel along the sequence.
    dilations=(1, 1, 2, 4),  # Dilation of each of the 4 conv steps of a conv block.
    dropout=0.1,
    # Word dropout on the decoder's input (Sennrich & Zhang 2019): in training, each target token
    # fed to the decoder (teacher forcing) has its embedding zeroed with this probability, so that
    # predicting the next token from the previous ones pays less and reading the input more.
    # Sequence targets only; the command token is never dropped. 0 = off.
    target_word_dropout=0.0,
    # Add the sinusoid timing signal to the encoder output where the cross-attentions project it
    # to keys (not to values), so that a decoder position can look up an input position directly
    # rather than through what of the input's timing signal survives the encoder's blocks.
    memory_timing=False,
    # Audio inputs with text targets: weight of an auxiliary CTC loss on the encoder output
    # (joint CTC-attention training; `objective.ctc_loss`). 0 = off.
    ctc_weight=0.0,
    # What that CTC loss predicts: "pieces" (the target's SentencePiece ids, scored by the text
    # softmax) or "chars" (their letters a-z and apostrophes, scored by a 28-way head of its own;
    # for English transcripts: other scripts have no labels there, use "pieces") or
    # "chars_and_spaces" (those and the space between words, 29-way: the head's best path is then
    # a transcript, scored by evaluation as `ctc_wer` and `ctc_cer`).
    ctc_units="pieces",
    use_attention=True,  # Ablation switch: False removes every attention layer.
    use_moe=True,  # Ablation switch: False replaces every MoE with a dense feed-forward layer.
    num_experts=8,  # E
    top_k=2,  # K
    moe_loss_coef=1e-2,
    capacity_factor=1.25,  # Expert buffer C = ceil(capacity_factor * tokens * K / E) in training.
    eval_capacity_factor=2.0,  # Same, for evaluation and decoding.
    vocab_size=8192,  # V: the shared SentencePiece vocabulary (id 0 = pad, 1 = end of sequence).
    tie_embeddings=True,  # Text logits reuse the text embedding matrix.
    num_labels=1000,  # Size of the shared label space of categorical targets.
    num_commands=32,  # Slots of the command-token embedding table.
    label_smoothing=0.1,
    # Where the layer norms of the attention and expert blocks sit: "post" (the paper's and
    # tensor2tensor's, norm(x + f(x))) or "pre" (x + f(norm(x)), with a final norm after the
    # encoder and the decoder; Xiong et al. 2020). The conv steps end in their own norm in both.
    norm="post",
    # What a class-label target reads: "pool" (the mean of the encoder output plus the command
    # embedding, the decoder skipped; the paper's) or "decoder" (the decoder's output at the
    # command token, a target of length 1: attention picks what of the input to read).
    label_head="pool",
    dtype="float32",  # Compute dtype: "float32" or "bfloat16" (parameters stay float32).
    image=dict(
        channels=3,  # Input channels the stem expects (grayscale images are tiled to RGB).
        stem_filters=32,  # Filters of the first of the two entry convolutions (the second doubles it).
        res_blocks=1,  # Residual separable-conv blocks, each halving H and W (paper: 3, i.e. 16x).
    ),
    audio=dict(
        sample_rate=16000,
        frame_length=400,  # 25 ms at 16 kHz.
        frame_step=160,  # 10 ms at 16 kHz.
        num_mel_bins=80,
        conv_filters=64,
        conv_layers=2,  # Strided 2-D convs, each halving time and frequency.
        # Each mel bin of each utterance to zero mean and unit variance over its real frames
        # (`modalities.audio.normalize_utterance`) before the convs.
        normalize=False,
        # SpecAugment in training (`modalities.audio.spec_augment`): bands of up to `freq_width`
        # mel bins and spans of up to `time_ratio` of each utterance's frames set to its mean.
        # 0 masks: off.
        spec_augment=dict(freq_masks=0, freq_width=27, time_masks=0, time_ratio=0.05),
    ),
)


TRAIN = dict(
    seed=0,
    steps=1000,
    step_mode="one_task",  # "one_task": one task per step (the paper); "all_tasks": weighted sum.
    # Loss weights of the all-tasks step: "mixture" (the mixture's sampling rates) or "gradnorm"
    # (GradNorm, Chen et al. 2018: learnt weights that balance the tasks' gradient norms on the
    # encoder's last block, multimodel/gradnorm.py; needs step_mode="all_tasks").
    loss_weighting="mixture",
    gradnorm_alpha=1.5,  # GradNorm's asymmetry: > 0 gives more weight to the slower tasks.
    gradnorm_lr=0.025,  # Learning rate of the GradNorm weights (plain gradient steps).
    learning_rate=0.2,  # Multiplier of the noam schedule.
    warmup_steps=4000,
    # What the noam schedule counts: "global" (the run's steps) or "task" (the steps of the task
    # being trained so far, kept in the state): with one task per step, every task then follows
    # the schedule it would follow alone (experiments/findings.py compares the two).
    lr_schedule="global",
    # Steps at the end of the run over which the noam rate falls linearly to zero (0 = none; a
    # warmup-stable-decay schedule, multimodel/optim.py). Counts the run's steps: needs
    # lr_schedule="global".
    cooldown_steps=0,
    adam_b1=0.85,
    adam_b2=0.997,
    adam_eps=1e-6,
    clip_norm=2.0,
    log_every=20,  # Steps between metrics.jsonl / TensorBoard records.
    checkpoint_every=200,
    keep_checkpoints=3,
    max_nonfinite_in_row=20,  # Skipped steps in a row (non-finite loss or gradient) before stopping.
    eval_split="test",  # Split of the final per-task evaluation.
    eval_max_examples=1000,  # Per task, in the final evaluation (0 = the whole split).
    # Decoding of sequence tasks in the final evaluation: "greedy", "beam" (of eval_beam_size
    # beams), "none" (skips it); None: each task's own (`Task.beam_size`: 4 beams for parse_en).
    eval_decode=config_dict.placeholder(str),
    eval_beam_size=config_dict.placeholder(int),  # Beams of "beam" (None: the task's own, or 4);
    # with eval_decode unset, only the tasks decoded with beams use it.
    # The final evaluation's outputs never repeat an n-gram this long (0: off; None: each task's
    # own `Task.no_repeat_ngram`, 3 for translation and speech).
    eval_no_repeat_ngram=config_dict.placeholder(int),
    # Audio tasks with text targets are decoded jointly with the model's CTC head over letters,
    # beams ranked by (1 - w) log P_decoder + w log P_CTC (decode.JointCTC; 0: the decoder alone).
    eval_ctc_weight=0.0,
    mesh_data=-1,  # Devices along the batch axis (-1: all that the expert axis leaves).
    mesh_expert=1,  # Devices along the expert axis.
    plot=True,  # Write PNG plots into the workdir at the end.
    compilation_cache="~/.cache/multimodel/jax",  # Persistent XLA cache ("" disables it).
    # Fine-tuning (docs/transfer.md). Comma-separated regular expressions, each matched in full
    # against parameter paths such as "encoder/blocks/0/steps/1/conv/pointwise/kernel": matching
    # parameters are never updated and get no optimizer state ("encoder/.*,mixer/.*,decoder/.*"
    # freezes the body). A pattern that matches nothing is an error.
    freeze="",
    # L2-SP (Li et al. 2018): adds l2sp / 2 * ||w - w0||^2 over the parameters copied from the
    # --init checkpoint (w0 = their copied values); new parameters get no such term. Needs --init.
    l2sp=0.0,
)

DATA = dict(
    tasks="installed",  # Comma-separated task names, or "installed" (every prepared embedded task).
    mixture="temperature",  # uniform | proportional | temperature | adaptive
    temperature=2.0,
    adaptive_tau=1.0,  # p ~ exp(recent loss / tau) for the adaptive mixture.
    adaptive_decay=0.9,  # Weight of the previous average in the adaptive mixture's loss average.
    weights="",  # Per-task multipliers of the sampling rate: "task=2.0,task=0.5".
    tokens_per_batch=2048,
    batch_multiple=8,
    image_batch_size=32,
    text_buckets=(16, 32, 64, 128, 256),
    audio_buckets=(128, 256, 512, 1024, 2048),
    # One batch shape per task (its longest bucket). Always on with train.step_mode="all_tasks",
    # whose step would otherwise compile one program per combination of the tasks' shapes.
    single_bucket=False,
    imports="",  # Comma-separated modules to import first (they register custom tasks).
    data_dir="",  # Prepared data; "" means $MULTIMODEL_DATA_DIR or ~/.cache/multimodel.
    train_examples=0,  # > 0: train on only the first N examples of each task's train split.
)


def _update(section: dict, overrides: dict, where: str):
  for key, value in overrides.items():
    if key not in section:
      raise KeyError(f"Unknown config key {where}.{key}; valid keys: {sorted(section)}")
    if isinstance(value, dict):
      _update(section[key], value, f"{where}.{key}")
    else:
      section[key] = value


def make(model=None, train=None, data=None):
  """Returns the locked config: defaults updated by the variant's overrides.

  Args:
    model: overrides of `MODEL` (nested dicts update nested sections).
    train: overrides of `TRAIN`.
    data: overrides of `DATA`.
  """
  sections = {"model": copy.deepcopy(MODEL), "train": copy.deepcopy(TRAIN),
              "data": copy.deepcopy(DATA)}
  for name, overrides in (("model", model), ("train", train), ("data", data)):
    _update(sections[name], overrides or {}, name)
  config = ml_collections.ConfigDict(sections)
  config.lock()
  return config
