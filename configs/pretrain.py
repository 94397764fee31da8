"""Stage 1: MAE pretraining of a vanilla ViT on unlabeled faces.

  python -m ssfer_jax.main --config configs/pretrain.py:VARIANT --workdir DIR \
      --config.data.dir=DATA_DIR

Variants:
  vit_b16  the paper's recipe (ViT-B/16, 224 px, mask 0.75, 600 epochs, 50 warm-up,
           lr 3.4e-4 at batch 256, AdamW (0.9, 0.95), wd 0.05, norm-pix loss on).
  vit_s16  the same recipe with ViT-S/16, for smaller budgets.
  small    the CPU science recipe's stage 1: the tiny "mu" ViT on 64 px faces in 8 px
           patches, 60 epochs at batch 128.
  cpu      the same model on the demo's faces, in a minute (the demo).
  test     the tiniest model at 32 px, for unit tests.
"""

import ml_collections

from configs import common


def get_config(arg: str = "vit_b16") -> ml_collections.ConfigDict:
  c = common.base_config()
  c.stage = "pretrain_mae"
  # Pretraining never sees val/test: only the training lists of the split.
  c.data.train_lists = ("train_labeled", "train_unlabeled")
  # Continue from an official MAE checkpoint (.pth with torch installed, or .safetensors): the
  # whole model from a full one (mae_visualize_*, *_full), the encoder from mae_pretrain_*.
  c.init_from = ""

  c.model = ml_collections.ConfigDict()
  c.model.size = "B"
  c.model.patch_size = 16
  c.model.stem = "patch"         # "conv": a conv stem per patch (vit.ConvStem)
  c.model.decoder_width = 512
  c.model.decoder_depth = 8
  c.model.decoder_heads = 16
  c.model.mask_ratio = 0.75
  c.model.norm_pix_loss = True   # the paper's choice (its published code had it off)
  c.model.dtype = "bfloat16"
  c.model.remat = False
  c.model.remat_policy = "nothing"  # with remat, what a block keeps (vit.REMAT_POLICIES)
  # jax.nn.dot_product_attention: None = XLA; "cudnn" = flash attention on NVIDIA GPUs
  # (bf16/fp16 only). jax 0.10 does not pick cuDNN by itself.
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)

  c.optim = ml_collections.ConfigDict()
  c.optim.base_lr = 3.4e-4       # lr = base_lr * batch_size / 256
  c.optim.warmup_epochs = 50.0
  c.optim.min_lr = 0.0
  c.optim.b1 = 0.9
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.05
  c.optim.clip_grad_norm = 0.0   # 0 = off

  c.num_epochs = 600
  c.viz_every = 5000
  c.viz_examples = 8

  if arg == "vit_b16":
    pass
  elif arg == "vit_s16":
    c.model.size = "S"
  elif arg in ("small", "cpu", "test"):
    c.model.decoder_width = 64
    c.model.decoder_depth = 1
    c.model.decoder_heads = 4
    c.optim.base_lr = 1.5e-3
    c.checkpoint_every = 100
    c.viz_every = 100
    if arg == "small":
      c.batch_size = 128
      c.num_epochs = 60
      c.optim.warmup_epochs = 5.0
      c.checkpoint_every = 1000
      c.viz_every = 2000
    if arg == "cpu":
      c.batch_size = 64
      c.num_epochs = 30
      c.optim.warmup_epochs = 3.0
    else:
      c.viz_every = 1000
      c.viz_examples = 4
    common.shrink_for_cpu(c, arg)
  else:
    raise ValueError(f"unknown variant {arg!r}; choose vit_b16, vit_s16, small, cpu or test.")
  c.lock()
  return c
