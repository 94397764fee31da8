"""The PyTorch side of `mae_vs_torch.py`: the official MAE model (facebookresearch/mae
`models_mae.MaskedAutoencoderViT`, re-stated with timm's current Block and PatchEmbed, since
the original passes a `qk_scale` timm no longer takes) and its training step: random masking
by argsort of noise, norm-pix loss on the masked patches, backward, AdamW (0.9, 0.95) with
weight decay off for biases and norms, as its `main_pretrain.py`. Runs in the torch
environment (.venv-timm, `make timm-env`); prints one JSON line of step times.

  .venv-timm/bin/python benchmarks/torch_mae.py --width 192 --depth 12 --heads 3 --image 112 \
      --batch 32 --steps 10 --threads 2 [--compile] [--device cuda --dtype bfloat16]
"""

import argparse
import json
import statistics
import time
from functools import partial

import torch
from torch import nn
from timm.models.vision_transformer import Block, PatchEmbed


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


def main():
  ap = argparse.ArgumentParser()
  for name, default in (("width", 192), ("depth", 12), ("heads", 3), ("decoder_width", 512),
                        ("decoder_depth", 8), ("decoder_heads", 16), ("image", 112),
                        ("patch", 16), ("batch", 32), ("steps", 10), ("warmup", 3),
                        ("threads", 2)):
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--device", default="cpu")
  ap.add_argument("--dtype", default="float32", help="float32, or bfloat16 (autocast)")
  ap.add_argument("--compile", action="store_true", help="torch.compile the model")
  ap.add_argument("--parts", action="store_true",
                  help="also time the forward alone and forward + backward")
  args = ap.parse_args()
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = MaskedAutoencoderViT(args.image, args.patch, args.width, args.depth, args.heads,
                               args.decoder_width, args.decoder_depth, args.decoder_heads)
  model.to(args.device).train()
  decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1 and
           not n.endswith(".bias")]
  no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1 or
                                                                            n.endswith(".bias"))]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                           {"params": no_decay, "weight_decay": 0.0}], lr=1.5e-4,
                          betas=(0.9, 0.95))
  forward = torch.compile(model) if args.compile else model
  imgs = torch.randn(args.batch, 3, args.image, args.image, device=args.device)
  autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

  def step():
    with autocast:
      loss = forward(imgs)
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
  if args.parts:   # where the step's time goes: the forward alone, then with the backward
    def forward_only():
      with autocast:
        return forward(imgs)

    def forward_backward():
      opt.zero_grad(set_to_none=True)
      forward_only().backward()

    for name, fn in (("forward", forward_only), ("forward_backward", forward_backward)):
      parts[name] = round(1e3 * statistics.median(timed(fn)), 2)
  print(json.dumps({"framework": f"torch {torch.__version__}", "compile": args.compile,
                    "dtype": args.dtype, "device": args.device, "threads": args.threads,
                    "warmup_s": round(warmup_s, 2), "step_ms": [round(1e3 * x, 2) for x in times],
                    "median_ms": round(1e3 * statistics.median(times), 2), "parts_ms": parts}))


if __name__ == "__main__":
  main()
