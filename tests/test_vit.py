"""ViT: MAE's position table, shapes, dtypes, drop path, remat, logical axes, the timm table."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from ssfer_jax.models import param_table
from ssfer_jax.models.vit import PatchEmbed, sincos_pos_embed, ViT, vit_kwargs

MU = vit_kwargs("mu")  # width 64, depth 2, 4 heads, mlp 256
AXIS_NAMES = {"embed", "mlp", "heads", "head_dim", "qkv", "patch", "classes", None}


def _mae_get_2d_sincos_pos_embed(embed_dim, grid_size, cls_token=False):
  """facebookresearch/mae util/pos_embed.py, transcribed."""
  def from_grid_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.
    omega = 1. / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
  emb = np.concatenate([from_grid_1d(embed_dim // 2, grid[0]), from_grid_1d(embed_dim // 2, grid[1])], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
  return emb


def _images(b=2, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


# Eager on purpose: the per-primitive compile cache makes repeated tiny models ~50x
# cheaper than a fresh jit compile per test. rbg keys: threefry dominates init compiles.
def _init(model, x):
  return model.init(jax.random.key(0, impl="rbg"), x, train=False)


@pytest.mark.parametrize("dim,grid", [(64, 2), (128, 7), (768, 14)])
def test_sincos_table_equals_mae(dim, grid):
  want = _mae_get_2d_sincos_pos_embed(dim, grid, cls_token=True).astype(np.float32)
  np.testing.assert_array_equal(sincos_pos_embed(dim, grid, grid, cls_token=True), want)
  np.testing.assert_array_equal(sincos_pos_embed(dim, grid, grid), want[1:])


@pytest.mark.parametrize("pool,num_classes,size,patch,want", [
    ("cls", 7, 32, 16, (2, 7)),
    ("gap", 7, 32, 16, (2, 7)),
    ("cls", 0, 32, 16, (2, 64)),
    ("gap", 0, 32, 16, (2, 64)),
    ("cls", 5, 112, 14, (2, 5)),
    ("flatten", 7, 32, 8, (2, 7)),
    ("flatten", 0, 32, 8, (2, 16 * 64)),
])
def test_output_shapes(pool, num_classes, size, patch, want):
  model = ViT(num_classes=num_classes, pool=pool, **(MU | {"patch_size": patch}))
  x = _images(size=size)
  variables = _init(model, x)
  out = model.apply(variables, x, train=False)
  assert out.shape == want and out.dtype == jnp.float32
  tokens = jax.eval_shape(lambda: model.apply(variables, x, train=False, method=ViT.encode))
  assert tokens.shape == (2, 1 + (size // patch)**2, 64)


def test_pool_specific_norms():
  x = _images()
  cls = nn.unbox(_init(ViT(num_classes=3, **MU), x))["params"]
  gap = nn.unbox(_init(ViT(num_classes=3, pool="gap", **MU), x))["params"]
  assert "encoder_norm" in cls and "fc_norm" not in cls
  assert "fc_norm" in gap and "encoder_norm" not in gap
  with pytest.raises(ValueError, match="pool"):
    _init(ViT(pool="max", **MU), x)


def test_flatten_head_reads_each_token_in_grid_order():
  """pool="flatten": the head's logits are a sum over tokens of each normed patch token times
  its own block of the kernel, so a feature's place in the face reaches the head directly."""
  model = ViT(num_classes=3, pool="flatten", **(MU | {"patch_size": 8}))
  x = _images(size=32)
  variables = _init(model, x)
  tokens = model.apply(variables, x, train=False, method=ViT.encode)[:, 1:]   # [B, 16, 64]
  head = nn.unbox(variables)["params"]["head"]
  kernel = head["kernel"].reshape(16, 64, 3)
  want = jnp.einsum("bld,ldc->bc", tokens, kernel) + head["bias"]
  np.testing.assert_allclose(model.apply(variables, x, train=False), want, rtol=1e-5, atol=1e-6)


def test_conv_stem_keeps_patches_apart_and_needs_a_power_of_two():
  """stem="conv" embeds each patch on its own: changing one patch's pixels moves only its
  token (what keeps MAE's masking exact)."""
  model = ViT(num_classes=0, pool="gap", stem="conv", **(MU | {"patch_size": 8}))
  x = _images(size=32)
  variables = _init(model, x)
  embed = lambda images: model.apply(variables, images, method=lambda m, i: m.embedding(i))
  y = x.at[:, :8, 8:16].add(1.0)   # the second patch of the first row
  moved = np.abs(np.asarray(embed(y) - embed(x))).max(axis=(0, 2))
  assert moved[1] > 1e-3 and np.all(moved[np.arange(16) != 1] == 0)
  with pytest.raises(ValueError, match="power-of-two"):
    _init(ViT(stem="conv", **(MU | {"patch_size": 12})), _images(size=24))

def test_bf16_compute_keeps_float32_params():
  model = ViT(num_classes=7, dtype=jnp.bfloat16, **MU)
  x = _images()
  variables = _init(model, x)
  assert {p.dtype for p in jax.tree.leaves(nn.unbox(variables))} == {jnp.dtype(jnp.float32)}
  out = model.apply(variables, x.astype(jnp.bfloat16), train=False)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  ref = ViT(num_classes=7, **MU).apply(variables, x, train=False)
  np.testing.assert_allclose(out, ref, atol=0.05)


def test_init_follows_mae():
  model = ViT(num_classes=7, **MU)
  p = nn.unbox(_init(model, _images()))["params"]
  d = MU["width"]
  qkv = p["encoder"]["block_00"]["attn"]["qkv_kernel"]
  limit = np.sqrt(6 / (d + 3 * d))  # xavier of MAE's fused Linear(D, 3D)
  assert float(jnp.max(jnp.abs(qkv))) <= limit and float(jnp.max(jnp.abs(qkv))) > 0.9 * limit
  patch = p["embedding"]["kernel"]
  assert float(jnp.max(jnp.abs(patch))) <= np.sqrt(6 / (patch.shape[0] + d))
  assert float(jnp.std(p["cls"])) == pytest.approx(0.02, rel=0.5)
  assert float(jnp.max(jnp.abs(p["head"]["kernel"]))) < 1e-3
  assert not jnp.any(p["encoder"]["block_00"]["attn"]["qkv_bias"])
  assert bool(jnp.all(p["encoder_norm"]["scale"] == 1))
  zero = nn.unbox(_init(ViT(num_classes=7, head_init="zeros", **MU), _images()))["params"]
  assert not jnp.any(zero["head"]["kernel"])


def test_drop_path_identity_at_eval_and_stochastic_in_train():
  x = _images(b=8)
  model = ViT(num_classes=3, drop_path_rate=0.5, **MU)
  variables = _init(model, x)
  plain = ViT(num_classes=3, **MU).apply(variables, x, train=False)
  np.testing.assert_array_equal(model.apply(variables, x, train=False), plain)
  train = lambda k: model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(k)})
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), plain)
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(lambda: model.apply(variables, x, train=True))


def test_remat_same_loss_and_grad():
  x = _images(b=4)
  labels = jnp.arange(4) % 3

  def loss_and_grad(remat):
    model = ViT(num_classes=3, drop_path_rate=0.2, remat=remat, **MU)
    params = nn.unbox(_init(ViT(num_classes=3, **MU), x))["params"]

    def loss(params):
      logits = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    return jax.jit(jax.value_and_grad(loss))(params)

  (l0, g0), (l1, g1) = loss_and_grad(False), loss_and_grad(True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


@pytest.mark.parametrize("pool,stem", [("cls", "patch"), ("gap", "patch"), ("flatten", "conv")])
def test_every_param_has_logical_names(pool, stem):
  variables = _init(ViT(num_classes=7, pool=pool, stem=stem, **MU), _images())
  leaves = jax.tree.leaves(variables, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf.names


def test_shards_over_a_mesh_with_logical_rules():
  """The trainer's path: names -> mesh shardings -> jitted init and apply, no set_mesh."""
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
  rules = [("embed", "fsdp"), ("mlp", None), ("heads", None), ("head_dim", None), ("qkv", None),
           ("patch", None), ("classes", None)]
  model = ViT(num_classes=8, **MU)
  x = _images(b=8)
  abstract = jax.eval_shape(lambda: _init(model, x))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  variables = jax.jit(lambda: _init(model, x), out_shardings=shardings)()
  qkv = variables["params"]["encoder"]["block_00"]["attn"]["qkv_kernel"]
  assert qkv.value.sharding.spec == jax.P("fsdp", None, None, None)
  xs = jax.device_put(x, jax.NamedSharding(mesh, jax.P("data")))
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, xs)
  np.testing.assert_allclose(out, model.apply(jax.device_get(variables), x, train=False), atol=1e-5)


# --- timm state-dict table -------------------------------------------------------------

def _timm_keys(depth, d, mlp, p, classes, norm="norm"):
  keys = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + 4, d),
          "patch_embed.proj.weight": (d, 3, p, p), "patch_embed.proj.bias": (d,),
          f"{norm}.weight": (d,), f"{norm}.bias": (d,), "head.weight": (classes, d), "head.bias": (classes,)}
  for i in range(depth):
    b = f"blocks.{i}."
    keys |= {b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
             b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
             b + "norm2.weight": (d,), b + "norm2.bias": (d,), b + "mlp.fc1.weight": (mlp, d),
             b + "mlp.fc1.bias": (mlp,), b + "mlp.fc2.weight": (d, mlp), b + "mlp.fc2.bias": (d,)}
  return keys


@pytest.mark.parametrize("pool,norm", [("cls", "norm"), ("gap", "fc_norm")])
def test_timm_keys_shapes_and_round_trip(pool, norm):
  variables = _init(ViT(num_classes=7, pool=pool, **MU), _images())  # 32 px: a 2x2 grid
  sd = param_table.to_state_dict(variables["params"], "vit", image_size=32)
  assert {k: v.shape for k, v in sd.items()} == _timm_keys(2, 64, 256, 16, 7, norm)
  back = param_table.from_state_dict(sd, variables["params"], "vit")
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(back), nn.unbox(variables["params"]))
  assert jax.tree.structure(back, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned)) == \
      jax.tree.structure(variables["params"], is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))


def test_from_state_dict_errors():
  params = _init(ViT(num_classes=7, **MU), _images())["params"]
  template = jax.eval_shape(lambda: params)
  sd = param_table.to_state_dict(params, "vit", image_size=32)
  param_table.from_state_dict(sd, template, "vit")  # abstract templates work
  with pytest.raises(KeyError, match="missing.*head.bias.*unexpected.*dist_token"):
    damaged = {k: v for k, v in sd.items() if k != "head.bias"} | {"dist_token": 0}
    param_table.from_state_dict(damaged, template)
  with pytest.raises(ValueError, match=r"blocks.1.mlp.fc1.weight: \(128, 64\)"):
    param_table.from_state_dict(sd | {"blocks.1.mlp.fc1.weight": np.zeros((128, 64))}, template)
  with pytest.raises(ValueError, match="learned"):
    param_table.from_state_dict(sd | {"pos_embed": sd["pos_embed"] + 0.1}, template)
  param_table.from_state_dict(sd | {"pos_embed": sd["pos_embed"] + 0.1}, template, check_pos_embed=False)


def test_table_transposes_compute_the_same_maps():
  rng = np.random.default_rng(0)
  params = nn.unbox(_init(ViT(num_classes=7, **MU), _images()))["params"]
  params = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape, np.float32), params)
  sd = param_table.to_state_dict(params, "vit", image_size=32)
  x = rng.standard_normal((2, 5, 64)).astype(np.float32)
  attn = params["encoder"]["block_00"]["attn"]
  q, k, v = np.einsum("btd,dshk->sbthk", x, attn["qkv_kernel"]) + np.asarray(attn["qkv_bias"])[:, None, None]
  theirs = x @ sd["blocks.0.attn.qkv.weight"].T + sd["blocks.0.attn.qkv.bias"]
  theirs = theirs.reshape(2, 5, 3, 4, 16)  # torch: reshape(B, N, 3, H, Dh)
  for i, ours in enumerate((q, k, v)):
    np.testing.assert_allclose(ours, theirs[:, :, i], rtol=1e-5, atol=1e-5)
  o = rng.standard_normal((2, 5, 4, 16)).astype(np.float32)
  np.testing.assert_allclose(
      np.einsum("bthk,hkd->btd", o, attn["proj_kernel"]),
      o.reshape(2, 5, 64) @ sd["blocks.0.attn.proj.weight"].T, rtol=1e-5, atol=1e-5)
  # Patch embedding against a numpy stride-p OIHW convolution on NCHW RGB images.
  imgs = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  w, b = sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"]
  nchw = imgs.transpose(0, 3, 1, 2).reshape(2, 3, 2, 16, 2, 16)
  conv = np.einsum("bchuwv,ocuv->bhwo", nchw, w) + b
  ours = PatchEmbed(16, 64).apply({"params": params["embedding"]}, imgs)
  np.testing.assert_allclose(ours, conv.reshape(2, 4, 64), rtol=1e-4, atol=1e-4)
