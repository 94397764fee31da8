"""The PyTorch side of `vs_torch.py`: a training step of

  --stage mae       the official MAE model (facebookresearch/mae
                    `models_mae.MaskedAutoencoderViT`, re-stated with timm's current Block and
                    PatchEmbed, since the original passes a `qk_scale` timm no longer takes):
                    random masking by argsort of noise, norm-pix loss on the masked patches,
                    as its `main_pretrain.py`;
  --stage finetune  timm's VisionTransformer with our classifier's head (--pool cls, gap, or
                    flatten: every patch token after the final norm into one linear layer),
                    cross-entropy on integer labels;

then backward and AdamW (0.9, 0.95) with weight decay off for biases and norms. Runs in the
torch environment (.venv-timm, `make timm-env`); prints one JSON line of step times.

  .venv-timm/bin/python benchmarks/torch_steps.py --width 192 --depth 12 --heads 3 --image 112 \
      --batch 32 --steps 10 --threads 2 [--stage finetune --pool cls] [--compile]
      [--device cuda --dtype bfloat16]
"""

import argparse
import json
import statistics
import time
from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block, PatchEmbed, VisionTransformer


class MaskedAutoencoderViT(nn.Module):
  """models_mae.py's model: encoder on the visible 25%, decoder on all tokens."""

  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, decoder_embed_dim,
               decoder_depth, decoder_num_heads, mask_ratio=0.75, norm_pix_loss=True):
    super().__init__()
    norm = partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
    n = self.patch_embed.num_patches
    self.p, self.mask_ratio, self.norm_pix_loss = patch_size, mask_ratio, norm_pix_loss
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim), requires_grad=False)
    self.blocks = nn.ModuleList([Block(embed_dim, num_heads, 4.0, qkv_bias=True, norm_layer=norm)
                                 for _ in range(depth)])
    self.norm = norm(embed_dim)
    self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n + 1, decoder_embed_dim),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList([Block(decoder_embed_dim, decoder_num_heads, 4.0,
                                               qkv_bias=True, norm_layer=norm)
                                         for _ in range(decoder_depth)])
    self.decoder_norm = norm(decoder_embed_dim)
    self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * 3)
    torch.nn.init.normal_(self.cls_token, std=0.02)
    torch.nn.init.normal_(self.mask_token, std=0.02)

  def patchify(self, imgs):
    p, h = self.p, imgs.shape[2] // self.p
    x = imgs.reshape(imgs.shape[0], 3, h, p, h, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(imgs.shape[0], h * h, p * p * 3)

  def random_masking(self, x):
    n, length, d = x.shape
    keep = int(length * (1 - self.mask_ratio))
    noise = torch.rand(n, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    return x, torch.gather(mask, 1, ids_restore), ids_restore

  def forward(self, imgs):
    x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
    x, mask, ids_restore = self.random_masking(x)
    cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
    x = torch.cat((cls, x), dim=1)
    for blk in self.blocks:
      x = blk(x)
    x = self.decoder_embed(self.norm(x))
    tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
    for blk in self.decoder_blocks:
      x = blk(x)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]
    target = self.patchify(imgs)
    if self.norm_pix_loss:
      mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
      target = (target - mean) / (var + 1.e-6) ** .5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


class ViTClassifier(nn.Module):
  """timm's ViT with the head of our `vit.ViT` for `pool`: the cls token after the final norm
  ("cls"), the mean of the patch tokens then fc_norm ("gap"), or every patch token after the
  final norm, flattened, into one linear layer ("flatten")."""

  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, num_classes, pool):
    super().__init__()
    flatten = pool == "flatten"
    self.vit = VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=4.0, qkv_bias=True,
        global_pool={"cls": "token", "gap": "avg", "flatten": ""}[pool],
        num_classes=0 if flatten else num_classes, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    tokens = (img_size // patch_size) ** 2
    self.head = nn.Linear(tokens * embed_dim, num_classes) if flatten else None

  def forward(self, imgs):
    if self.head is None:
      return self.vit(imgs)
    return self.head(self.vit.forward_features(imgs)[:, 1:].flatten(1))


def main():
  ap = argparse.ArgumentParser()
  for name, default in (("width", 192), ("depth", 12), ("heads", 3), ("decoder_width", 512),
                        ("decoder_depth", 8), ("decoder_heads", 16), ("image", 112),
                        ("patch", 16), ("batch", 32), ("steps", 10), ("warmup", 3),
                        ("threads", 2)):
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--stage", default="mae", choices=("mae", "finetune"))
  ap.add_argument("--pool", default="cls", choices=("cls", "gap", "flatten"))
  ap.add_argument("--classes", type=int, default=8)
  ap.add_argument("--device", default="cpu")
  ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 (autocast)")
  ap.add_argument("--compile", action="store_true", help="torch.compile the model")
  ap.add_argument("--parts", action="store_true",
                  help="also time the forward alone, forward + backward and the optimiser "
                  "step alone")
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  if args.stage == "mae":
    model = MaskedAutoencoderViT(args.image, args.patch, args.width, args.depth, args.heads,
                                 args.decoder_width, args.decoder_depth, args.decoder_heads)
  else:
    model = ViTClassifier(args.image, args.patch, args.width, args.depth, args.heads,
                          args.classes, args.pool)
  model.to(args.device).train()
  decay, no_decay = [], []   # weight decay off for biases and norms, as MAE's param groups
  for n, p in model.named_parameters():
    if p.requires_grad:
      (no_decay if p.ndim <= 1 or n.endswith(".bias") else decay).append(p)
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                           {"params": no_decay, "weight_decay": 0.0}], lr=1.5e-4,
                          betas=(0.9, 0.95))
  forward = torch.compile(model) if args.compile else model
  imgs = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
  labels = torch.randint(0, args.classes, (args.batch,), device=args.device)
  autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

  def loss_of():
    with autocast:
      out = forward(imgs)
      return out if args.stage == "mae" else nn.functional.cross_entropy(out, labels)

  def step():
    loss = loss_of()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  t = time.perf_counter()
  for _ in range(args.warmup):
    step()
  sync()
  warmup_s = time.perf_counter() - t

  def timed(fn) -> list[float]:
    """Seconds of each of args.steps calls, synchronised."""
    out = []
    for _ in range(args.steps):
      t = time.perf_counter()
      fn()
      sync()
      out.append(time.perf_counter() - t)
    return out

  times = timed(step)
  parts = {}
  if args.parts:   # where the step's time goes: forward alone, with the backward, the update
    def forward_backward():
      opt.zero_grad(set_to_none=True)
      loss_of().backward()

    for name, fn in (("forward", loss_of), ("forward_backward", forward_backward),
                     ("optimizer", opt.step)):   # the update alone, on the last gradients
      parts[name] = round(1e3 * statistics.median(timed(fn)), 2)
  print(json.dumps({"framework": f"torch {torch.__version__}", "compile": args.compile,
                    "dtype": args.dtype, "device": args.device, "threads": args.threads,
                    "warmup_s": round(warmup_s, 2), "step_ms": [round(1e3 * x, 2) for x in times],
                    "median_ms": round(1e3 * statistics.median(times), 2), "parts_ms": parts}))


if __name__ == "__main__":
  main()
