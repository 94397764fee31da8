"""Stage 2: supervised fine-tuning with FaceMix on the labeled subset.

  python -m ssfer_jax.main --config configs/finetune.py:VARIANT --workdir DIR \
      --config.data.dir=DATA_DIR --config.init_from=STAGE1_RUN_DIR

Variants:
  vit_b16       the paper's recipe (the default): ViT-B/16 at 224 px, cls pooling, batch 32,
                lr warm-up 5e-5 -> 1e-4 over 5 epochs, cosine to 1e-5 (absolute rates at
                batch 32: reference_batch = 32), 100 epochs (1000 below 500 labels), FaceMix
                L4 with kappa = 1 - IoU, lambda ~ Beta(1, 1) per example.
  vit_b16_code  the published code's: lr 1.5e-4 (at batch 32), wd 0.05, label smoothing
                0.1, weight EMA 0.999, mixup alpha 1 with one lambda per batch and the
                "reverse the batch" pairing (its FaceMix bug, mixing in place, not copied).
  small         the CPU science recipe (pairs with pretrain.py:small, semisup.py:small):
                the tiny "mu" ViT on 64 px faces in 8 px patches, crops of 60-100% of the
                face, a head over every token, 60 epochs of FaceMix; chosen on val
                (benchmarks/RESULTS.md).
  cpu           the same model on the demo's ~250 labels (pairs with pretrain.py:cpu).
  test          the tiniest model at 32 px, for unit tests.
`init_from` (a stage-1 run directory or RUN/checkpoints/STEP) loads the MAE encoder, as does a
weight file in timm or MAE naming (the official mae_pretrain_vit_base.pth, a timm ViT's
.safetensors; `ssfer_jax/pytorch_weights.py`); unset, the classifier starts from scratch.
"""

import ml_collections

from configs import common


def get_config(arg: str = "vit_b16") -> ml_collections.ConfigDict:
  c = common.base_config()
  c.stage = "finetune"
  c.init_from = ""                 # a stage-1 run dir, RUN/checkpoints/STEP, or a timm / MAE
                                   # weight file (.safetensors, .pth); "" = scratch
  c.init_resample = "mae"          # a weight file's position table at another grid: "mae"
                                   # (MAE's bicubic) or "timm" (timm's loader, antialiased)
  c.data.train_lists = ("train_labeled",)
  c.data.eval_lists = ("val",)
  c.batch_size = 32
  c.num_epochs = 100
  c.few_labels = 500               # below this many labeled records ...
  c.few_labels_epochs = 1000       # ... train this many epochs (the paper)

  c.model = ml_collections.ConfigDict()
  c.model.size = "B"
  c.model.patch_size = 16
  c.model.stem = "patch"           # the linear patch embedding; "conv": a conv stem (vit.ConvStem)
  c.model.pool = "cls"             # SSFER: the cls token; MAE's fine-tuning: "gap"
  c.model.pos_embed = "learned"    # from the sin-cos table, as MAE's fine-tuning
  c.model.head_init = "trunc_normal"
  c.model.drop_path_rate = 0.0     # the published code: none; MAE's fine-tuning: 0.1
  c.model.dtype = "bfloat16"
  c.model.remat = False
  c.model.remat_policy = "nothing"  # with remat, what a block keeps (vit.REMAT_POLICIES)
  c.model.attention_impl = ml_collections.config_dict.placeholder(str)

  c.optim = common.classifier_optim(base_lr=1e-4, reference_batch=32, warmup_epochs=5.0,
                                    warmup_init_lr=5e-5, min_lr=1e-5)

  c.loss = ml_collections.ConfigDict()
  c.loss.label_smoothing = 0.0
  c.loss.class_weighting = "none"  # "balanced" (1/n_c) or "sqrt" (1/sqrt(n_c))
  c.loss.logit_adjustment = 0.0    # tau: train on logits + tau log(prior) (Menon et al. 2021)

  c.mix = ml_collections.ConfigDict()
  c.mix.kind = "facemix"           # "none", "mixup", "cutmix", "facemix"
  c.mix.alpha = 1.0                # lambda ~ Beta(alpha, alpha)
  c.mix.lambda_mode = "per_example"  # or "per_batch" (timm's default)
  c.mix.pairing = "swap"           # "reverse" (published), "permutation"; see facemix.py
  c.mix.kappa = "iou"              # "ssim", "psnr"
  c.mix.variant = "L4"             # the paper's L1-L4

  c.ema_decay = 0.0                # weight EMA of the model; 0 = off

  c.eval = common.classifier_eval()
  c.checkpoint_every = 1000
  c.log_every = 50

  if arg == "vit_b16":
    pass
  elif arg == "vit_b16_code":
    c.optim.base_lr = 1.5e-4
    c.loss.label_smoothing = 0.1
    c.ema_decay = 0.999
    c.mix.lambda_mode = "per_batch"
    c.mix.pairing = "reverse"
  elif arg in ("small", "cpu", "test"):
    c.optim.reference_batch = 256
    c.optim.base_lr = 4e-3           # chosen on val among 2e-3, 4e-3, 8e-3, 1.6e-2 (RESULTS.md)
    c.optim.warmup_init_lr = 0.0
    c.optim.min_lr = 1e-5
    c.loss.label_smoothing = 0.1
    c.ema_decay = 0.99
    if arg == "small":
      c.batch_size = 32
      c.num_epochs = 60
      c.optim.warmup_epochs = 3.0
      c.checkpoint_every = 1000
      c.eval.every_epochs = 2
    if arg == "cpu":
      c.batch_size = 32
      c.num_epochs = 30
      c.few_labels_epochs = 60       # the demo's ~250 labels: 7 steps an epoch
      c.optim.warmup_epochs = 3.0
      c.checkpoint_every = 500
      c.eval.every_epochs = 3
    common.shrink_for_cpu(c, arg)
  else:
    raise ValueError(f"unknown variant {arg!r}; choose vit_b16, vit_b16_code, small, cpu or "
                     "test.")
  c.lock()
  return c
