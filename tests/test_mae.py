"""MAE: patch order, masking, targets, loss, encoder -> ViT transfer, reconstruction, MAE table."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssfer_jax.models import param_table
from ssfer_jax.models.mae import (MAE, masked_mse, patch_targets, patchify, random_masking,
                                  reconstruct_images, unpatchify)
from ssfer_jax.models.vit import encoder_params_from_mae, ViT, vit_kwargs

MU = vit_kwargs("mu")  # width 64, depth 2, 4 heads, mlp 256
DEC = dict(decoder_width=32, decoder_depth=2, decoder_heads=4)
AXIS_NAMES = {"embed", "mlp", "heads", "head_dim", "qkv", "patch", None}


def _images(b=2, h=32, w=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


def _rngs(mask_seed=1):
  # rbg params key: threefry dominates the compile time of an init on CPU.
  return {"params": jax.random.key(0, impl="rbg"), "mask": jax.random.key(mask_seed)}


@pytest.fixture(scope="module")
def mae_and_vars():
  model = MAE(**MU, **DEC)
  return model, model.init(_rngs(), _images(), train=False)


def test_patchify_matches_mae_order_and_round_trips():
  imgs = np.asarray(_images(h=32, w=48))
  nchw = imgs.transpose(0, 3, 1, 2).reshape(2, 3, 2, 16, 3, 16)  # MAE: (N, 3, h, p, w, p)
  want = np.einsum("nchpwq->nhwpqc", nchw).reshape(2, 6, 16 * 16 * 3)
  np.testing.assert_array_equal(patchify(imgs, 16), want)
  np.testing.assert_array_equal(unpatchify(patchify(imgs, 16), 16, 2, 3), imgs)
  with pytest.raises(ValueError, match="divisible"):
    patchify(imgs[:, :30], 16)


def test_random_masking():
  b, l, ratio = 6, 49, 0.75
  keep = int(l * (1 - ratio))
  x = jnp.broadcast_to(jnp.arange(l, dtype=jnp.float32)[None, :, None], (b, l, 3))
  visible, mask, ids_restore = random_masking(x, ratio, jax.random.key(0))
  assert visible.shape == (b, keep, 3) and mask.shape == (b, l) and ids_restore.shape == (b, l)
  np.testing.assert_array_equal(mask.sum(axis=1), l - keep)
  kept = np.asarray(visible[:, :, 0]).astype(int)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(mask), kept, axis=1), 0)
  # The decoder's unshuffle: visible tokens then placeholders, gathered by ids_restore.
  filled = jnp.concatenate([visible, jnp.full((b, l - keep, 3), -1.0)], axis=1)
  restored = np.asarray(jnp.take_along_axis(filled, ids_restore[..., None], axis=1))[..., 0]
  np.testing.assert_array_equal(restored, np.where(mask == 1, -1.0, np.arange(l)))
  assert len({tuple(row) for row in np.asarray(mask)}) == b  # every example its own mask
  everything, mask0, restore0 = random_masking(x, 0.0, jax.random.key(1))
  assert not mask0.any()
  np.testing.assert_array_equal(jnp.take_along_axis(everything, restore0[..., None], axis=1), x)
  other = random_masking(x, ratio, jax.random.key(2))[1]
  assert not np.array_equal(mask, other)


def test_norm_pix_target_is_mae_formula():
  imgs = _images()
  t = np.asarray(patchify(imgs, 16), np.float64)
  mean = t.mean(-1, keepdims=True)
  var = t.var(-1, ddof=1, keepdims=True)  # torch's default (unbiased) var, as MAE
  np.testing.assert_allclose(patch_targets(imgs, 16, True), (t - mean) / np.sqrt(var + 1e-6),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(patch_targets(imgs, 16, False), patchify(imgs, 16))


def test_loss_counts_only_masked_patches():
  rng = np.random.default_rng(0)
  pred, target = rng.standard_normal((2, 2, 8, 12)).astype(np.float32)
  mask = np.array([[1, 0, 1, 1, 0, 0, 1, 0], [0, 0, 0, 1, 1, 1, 1, 0]], np.float32)
  loss = masked_mse(pred, target, mask)
  per_patch = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(loss, (per_patch * mask).sum() / mask.sum(), rtol=1e-6)
  noise = rng.standard_normal(pred.shape).astype(np.float32)
  np.testing.assert_allclose(masked_mse(pred + noise * (1 - mask[..., None]), target, mask), loss, rtol=1e-6)
  assert not np.isclose(masked_mse(pred + noise * mask[..., None], target, mask), loss)


def test_mae_forward(mae_and_vars):
  model, variables = mae_and_vars
  imgs = _images()
  loss, aux = model.apply(variables, imgs, train=True, rngs={"mask": jax.random.key(3)})
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(loss)
  assert aux["pred"].shape == aux["target"].shape == (2, 4, 768) and aux["pred"].dtype == jnp.float32
  np.testing.assert_array_equal(aux["mask"].sum(1), 3)  # 4 patches, keep int(4 * 0.25) = 1
  np.testing.assert_allclose(aux["target"], patch_targets(imgs, 16, True))
  np.testing.assert_allclose(loss, masked_mse(aux["pred"], aux["target"], aux["mask"]))
  loss_fn = lambda p: model.apply({"params": p}, imgs, train=True, rngs={"mask": jax.random.key(3)})[0]
  grads = jax.jit(jax.grad(loss_fn))(nn.unbox(variables)["params"])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["mask_token"]).sum()) > 0


def test_mae_bf16_compute():
  model = MAE(**MU, **DEC, dtype=jnp.bfloat16)
  imgs = _images()
  variables = model.init(_rngs(), imgs, train=False)
  assert {p.dtype for p in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  loss, aux = model.apply(variables, imgs.astype(jnp.bfloat16), train=True, rngs={"mask": jax.random.key(3)})
  assert loss.dtype == jnp.float32 and np.isfinite(loss) and aux["pred"].dtype == jnp.float32


def test_every_mae_param_has_logical_names(mae_and_vars):
  leaves = jax.tree.leaves(mae_and_vars[1], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf.names


def test_mae_encoder_params_load_into_vit():
  imgs = _images()
  mae = MAE(**MU, **DEC, mask_ratio=0.0)
  mae_params = mae.init(_rngs(), imgs, train=False)["params"]
  latent, mask, ids_restore = mae.apply({"params": mae_params}, imgs, train=False,
                                        rngs={"mask": jax.random.key(4)}, method=MAE.encode)
  assert not mask.any()
  patches = jnp.take_along_axis(latent[:, 1:], ids_restore[..., None], axis=1)  # back to image order

  vit = ViT(num_classes=0, **MU)
  vit_params = vit.init(_rngs(), imgs, train=False)["params"]
  vit_params = {**vit_params, **encoder_params_from_mae(mae_params)}
  tokens = vit.apply({"params": vit_params}, imgs, train=False, method=ViT.encode)
  np.testing.assert_allclose(tokens[:, 1:], patches, atol=1e-5)
  np.testing.assert_allclose(vit.apply({"params": vit_params}, imgs, train=False), latent[:, 0], atol=1e-5)
  assert set(encoder_params_from_mae(mae_params, pool="gap")) == {"embedding", "cls", "encoder"}


def test_reconstruct_images():
  imgs = _images(b=2, h=32, w=48)
  mask = jnp.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 1, 0, 0]], jnp.float32)
  for norm in (True, False):
    perfect = reconstruct_images(patch_targets(imgs, 16, norm), imgs, mask, norm, 16)
    np.testing.assert_allclose(perfect["reconstruction"], imgs, atol=1e-4)
    np.testing.assert_allclose(perfect["pasted"], imgs, atol=1e-4)
  out = reconstruct_images(jnp.zeros((2, 6, 768)), imgs, mask, True, 16)
  removed = np.asarray(mask, bool)[..., None]
  orig = np.asarray(patchify(imgs, 16))
  np.testing.assert_array_equal(patchify(out["masked"], 16), np.where(removed, 0, orig))
  # A zero prediction de-normalises to each patch's own mean; visible patches are the original.
  np.testing.assert_allclose(patchify(out["pasted"], 16),
                             np.where(removed, orig.mean(-1, keepdims=True), orig), atol=1e-5)


def _mae_keys(d, mlp, dd, p):
  keys = {"cls_token": (1, 1, d), "pos_embed": (1, 5, d), "patch_embed.proj.weight": (d, 3, p, p),
          "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,), "mask_token": (1, 1, dd),
          "decoder_pos_embed": (1, 5, dd), "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,),
          "decoder_norm.weight": (dd,), "decoder_norm.bias": (dd,), "decoder_pred.weight": (p * p * 3, dd),
          "decoder_pred.bias": (p * p * 3,)}
  for prefix, w, m in (("blocks", d, mlp), ("decoder_blocks", dd, 4 * dd)):
    for i in range(2):
      b = f"{prefix}.{i}."
      keys |= {b + "norm1.weight": (w,), b + "norm1.bias": (w,), b + "attn.qkv.weight": (3 * w, w),
               b + "attn.qkv.bias": (3 * w,), b + "attn.proj.weight": (w, w), b + "attn.proj.bias": (w,),
               b + "norm2.weight": (w,), b + "norm2.bias": (w,), b + "mlp.fc1.weight": (m, w),
               b + "mlp.fc1.bias": (m,), b + "mlp.fc2.weight": (w, m), b + "mlp.fc2.bias": (w,)}
  return keys


def test_mae_state_dict_keys_and_round_trip(mae_and_vars):
  params = mae_and_vars[1]["params"]
  sd = param_table.to_state_dict(params, "mae", image_size=32)
  assert {k: v.shape for k, v in sd.items()} == _mae_keys(64, 256, 32, 16)
  back = param_table.from_state_dict(sd, params, "mae")
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(back), nn.unbox(params))
  with pytest.raises(ValueError, match="decoder"):
    param_table.to_state_dict(ViT(**MU).init(_rngs(), _images(), train=False)["params"], "mae")
  # The encoder part of an MAE checkpoint is a timm ViT checkpoint (what fine-tuning imports).
  vit_params = ViT(**MU).init(_rngs(), _images(), train=False)["params"]
  vit_keys = set(param_table.to_state_dict(vit_params, "vit", image_size=32))
  assert vit_keys < set(sd)
  loaded = param_table.from_state_dict({k: sd[k] for k in vit_keys}, vit_params, "vit")
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(loaded), nn.unbox(encoder_params_from_mae(params)))
