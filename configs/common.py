"""Config pieces every stage shares: run bookkeeping, data, mesh and sharding rules."""

import ml_collections

# Face-specific normalisation used by SSFER's published code (docs/REFERENCE.md section 1).
FACE_MEAN = (0.588, 0.459, 0.402)
FACE_STD = (0.228, 0.202, 0.190)
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# Logical parameter axes -> mesh axes. FSDP shards every width-sized dimension over
# `fsdp`; with an `fsdp` axis of size 1 the same rules mean plain data parallelism.
FSDP_RULES = (
    ("embed", "fsdp"),
    ("mlp", None),
    ("heads", None),
    ("head_dim", None),
    ("qkv", None),
    ("patch", None),
    ("classes", None),
    ("experts", None),
)


def shrink_for_cpu(c: ml_collections.ConfigDict, arg: str) -> None:
  """What every stage's `small`, `cpu` and `test` variants share: the tiny "mu" ViT in
  float32 on a 2-core machine. `small` (the CPU science recipe) and `cpu` (the demo) see 64 px
  faces in 8 px patches (64 tokens: 36 tokens of 16 px at 96 px left the ViT near the class
  prior) through a random crop of at least 60% of the face (0.2 often cuts the mouth away),
  and the classifier reads every token (pool "flatten": with the cls token it stayed near the
  class prior for ~1,000 steps); `test` runs 32 px for 6 steps (unit tests). Call it last: it
  overrides the stage's run lengths for `test`. benchmarks/RESULTS.md ("Making it learn") has
  the measurements."""
  recipe = arg in ("small", "cpu")
  if "size" in c.model:   # stage 3 takes its architecture from the stage-2 model
    c.model.size = "mu"
    c.model.patch_size = 8 if recipe else c.model.patch_size
  if "pool" in c.model and recipe:   # the classifier stages
    c.model.pool = "flatten"
  c.model.dtype = "float32"
  c.data.num_threads = 2
  c.log_every = 10 if arg == "cpu" else 50
  if arg in ("small", "cpu"):
    c.data.image_size = 64
    c.data.crop_scale = (0.6, 1.0)
  else:
    c.data.image_size = 32
    c.batch_size = 16
    c.total_steps = 6
    c.optim.warmup_epochs = 0.0
    c.log_every = 1
    c.checkpoint_every = 3
    c.tensorboard = False
    if "eval" in c:   # the classifier stages: evaluate twice in the 6 steps
      c.eval.every_steps = 3
      c.eval.batch_size = 16


def classifier_optim(*, base_lr: float, reference_batch: int, warmup_epochs: float,
                     warmup_init_lr: float, min_lr: float,
                     schedule: str = "cosine") -> ml_collections.ConfigDict:
  """AdamW of the classifier stages (2 and 3): each sets its rates, the rest is shared."""
  o = ml_collections.ConfigDict()
  o.base_lr = base_lr              # lr = base_lr * batch_size / reference_batch
  o.reference_batch = reference_batch
  o.schedule = schedule            # "cosine" (warm-up, then cosine to min_lr) or "constant"
  o.warmup_epochs = warmup_epochs
  o.warmup_init_lr = warmup_init_lr  # absolute (not scaled with the batch, unlike base_lr)
  o.min_lr = min_lr                # absolute
  o.b1 = 0.9
  o.b2 = 0.999
  o.weight_decay = 0.05
  o.layer_decay = 1.0              # < 1: MAE's layer-wise lr decay (0.65 for ViT-B)
  o.clip_grad_norm = 0.0
  return o


def classifier_eval() -> ml_collections.ConfigDict:
  """Val evaluation of the classifier stages; the best checkpoint on it becomes the result."""
  e = ml_collections.ConfigDict()
  e.every_epochs = 1               # evaluate on val every this many epochs ...
  e.every_steps = 0                # ... or, if > 0, steps; -1 = never (no result.json)
  e.batch_size = 64
  e.select = "accuracy"            # or "mean_class_accuracy", "macro_f1"
  return e


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 256          # global, across all processes and devices
  c.num_epochs = 1
  c.total_steps = 0           # > 0 overrides num_epochs
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.tensorboard = True
  c.peak_tflops_per_device = 0.0   # for MFU; 0 = unknown (CPU). H100 SXM bf16 dense: 989.

  c.data = ml_collections.ConfigDict()
  c.data.dir = ml_collections.config_dict.placeholder(str)  # a `python -m data_prep build` output
  c.data.split = "default"    # DATA_DIR/splits/NAME.json, or a path
  c.data.train_lists = ("train_labeled",)
  # Several builds in one train stream (stages 1 and 2): "DIR[@SPLIT]=WEIGHT,...", each batch
  # round(w x B) rows of each (every record of DIR, or SPLIT's train_lists); data.dir stays
  # the run's reference build (classes, evaluation, figures). "" = data.dir alone.
  c.data.blend = ""
  c.data.image_size = 224
  # The weak view's random resized crop: share of the image's area kept and aspect range
  # (MAE's and timm's defaults; a tight face crop loses the mouth at 0.2, see RESULTS.md).
  c.data.crop_scale = CROP_SCALE
  c.data.crop_ratio = CROP_RATIO
  # The share of the stored image's side the model sees, centred (1 = all): a build framed
  # with a wide margin can be seen closer without rebuilding; predict frames the same.
  c.data.center_crop = 1.0
  c.data.num_threads = 16
  c.data.mean = FACE_MEAN
  c.data.std = FACE_STD

  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = (-1, 1)      # (data, fsdp); -1 takes the remaining devices
  c.mesh.axes = ("data", "fsdp")
  c.sharding_rules = FSDP_RULES
  return c
