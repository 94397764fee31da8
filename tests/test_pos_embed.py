"""Learned position embeddings: the ViT parameter, torch's bicubic resample, the timm table."""
import logging
import math

import flax.linen as nn
import jax
import numpy as np
import pytest

from ssfer_jax.models import param_table
from ssfer_jax.models.vit import resample_pos_embed, sincos_pos_embed, ViT, vit_kwargs
from ssfer_jax.trainers import optim

MU = vit_kwargs("mu")  # width 64


def _images(b=2, h=32, w=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, 3))


def _init(model, x):  # eager, rbg keys: see test_vit
  return model.init(jax.random.key(0, impl="rbg"), x, train=False)


def _torch_bicubic(grid, out_h, out_w):
  """torch's upsample_bicubic2d (align_corners=False, no antialias), pixel by pixel, float64."""
  a = -0.75
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  coeffs = lambda t: (cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t))
  in_h, in_w, d = grid.shape
  out = np.zeros((out_h, out_w, d))
  for oy in range(out_h):
    ry = in_h / out_h * (oy + 0.5) - 0.5
    iy = math.floor(ry)
    wy = coeffs(ry - iy)
    for ox in range(out_w):
      rx = in_w / out_w * (ox + 0.5) - 0.5
      ix = math.floor(rx)
      wx = coeffs(rx - ix)
      for i in range(4):
        y = min(max(iy - 1 + i, 0), in_h - 1)
        row = sum(wx[j] * grid[y, min(max(ix - 1 + j, 0), in_w - 1)].astype(np.float64) for j in range(4))
        out[oy, ox] += wy[i] * row
  return out


# --- ViT(pos_embed="learned") ----------------------------------------------------------

@pytest.mark.parametrize("h,w", [(32, 32), (32, 48)])
def test_learned_starts_as_sincos(h, w):
  x = _images(h=h, w=w)
  learned = ViT(pos_embed="learned", **MU)
  variables = _init(learned, x)
  pos = variables["params"]["pos_embed"]
  assert isinstance(pos, nn.LogicallyPartitioned) and pos.names == (None, None, "embed")
  np.testing.assert_array_equal(pos.value, sincos_pos_embed(64, h // 16, w // 16, cls_token=True)[None])
  params = nn.unbox(variables["params"])
  assert not optim.decay_mask(params)["pos_embed"]
  rest = {k: v for k, v in params.items() if k != "pos_embed"}
  want = ViT(**MU).apply({"params": rest}, x, train=False)  # pooled features, O(1)
  np.testing.assert_allclose(learned.apply({"params": params}, x, train=False), want, rtol=1e-5, atol=1e-5)
  # The table is the one used: changing it (or only the cls row) changes the output.
  noise = 0.5 * jax.random.normal(jax.random.key(1), params["pos_embed"].shape)
  for moved in (params["pos_embed"] + noise, params["pos_embed"].at[0, 0].add(noise[0, 0])):
    out = learned.apply({"params": params | {"pos_embed": moved}}, x, train=False)
    assert np.max(np.abs(out - want)) > 1e-2


def test_unknown_pos_embed():
  with pytest.raises(ValueError, match="'sincos' or 'learned'"):
    _init(ViT(pos_embed="rope", **MU), _images())


# --- resample_pos_embed ----------------------------------------------------------------

@pytest.mark.parametrize("old,new", [((14, 14), (16, 16)), ((7, 7), (5, 5)), ((4, 6), (5, 3))])
def test_resample_matches_torch_bicubic(old, new):
  rng = np.random.default_rng(0)
  table = rng.standard_normal((1, 1 + old[0] * old[1], 8)).astype(np.float32)
  out = resample_pos_embed(table, new, old_grid=old if old[0] != old[1] else None)
  assert out.shape == (1, 1 + new[0] * new[1], 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], table[:, 0])
  want = _torch_bicubic(table[0, 1:].reshape(*old, 8), *new)
  np.testing.assert_allclose(out[0, 1:].reshape(*new, 8), want, rtol=1e-5, atol=1e-6)


def test_resample_identity_rank_and_errors():
  table = np.random.default_rng(1).standard_normal((1 + 36, 4)).astype(np.float32)
  np.testing.assert_array_equal(resample_pos_embed(table, (6, 6)), table)
  np.testing.assert_array_equal(resample_pos_embed(table[None], (4, 9), old_grid=(4, 9)), table[None])
  assert resample_pos_embed(table, (3, 3)).shape == (10, 4)  # keeps the input's rank
  with pytest.raises(ValueError, match="old_grid"):
    resample_pos_embed(table[:-1], (3, 3))
  with pytest.raises(ValueError, match="old_grid"):
    resample_pos_embed(table, (3, 3), old_grid=(5, 7))


def test_resample_keeps_constants_and_mirrors():
  rng = np.random.default_rng(2)
  const = np.concatenate([rng.standard_normal((1, 4)), np.full((25, 4), 3.0)]).astype(np.float32)
  np.testing.assert_allclose(resample_pos_embed(const, (8, 8))[1:], 3.0, rtol=1e-6)  # weights sum to 1
  grid = rng.standard_normal((5, 5, 4)).astype(np.float32)
  flat = lambda g: np.concatenate([np.zeros((1, 4), np.float32), g.reshape(-1, 4)])
  up = resample_pos_embed(flat(grid), (7, 7))[1:].reshape(7, 7, 4)
  flipped = resample_pos_embed(flat(grid[::-1, :, :]), (7, 7))[1:].reshape(7, 7, 4)
  np.testing.assert_allclose(flipped, up[::-1], rtol=1e-5, atol=1e-6)


# --- the timm table --------------------------------------------------------------------

def _learned_params(size=32, seed=0):
  """A learned ViT's boxed params whose table is no sin-cos table."""
  params = _init(ViT(num_classes=7, pool="gap", pos_embed="learned", **MU), _images(h=size, w=size))["params"]
  noise = np.random.default_rng(seed).standard_normal(params["pos_embed"].value.shape).astype(np.float32)
  return params | {"pos_embed": params["pos_embed"].replace_boxed(noise)}


def test_learned_round_trip():
  params = _learned_params()
  sd = param_table.to_state_dict(params, "vit", image_size=224)  # image_size only sizes fixed tables
  sincos_params = _init(ViT(num_classes=7, pool="gap", **MU), _images())["params"]
  sincos_sd = param_table.to_state_dict(sincos_params, "vit", image_size=32)
  assert {k: v.shape for k, v in sd.items()} == {k: v.shape for k, v in sincos_sd.items()}
  np.testing.assert_array_equal(sd["pos_embed"], params["pos_embed"].value)
  back = param_table.from_state_dict(sd, params, "vit")
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(back), nn.unbox(params))
  is_box = lambda v: isinstance(v, nn.LogicallyPartitioned)
  assert jax.tree.structure(back, is_leaf=is_box) == jax.tree.structure(params, is_leaf=is_box)


def test_learned_table_loads_and_resamples(caplog):
  template = jax.eval_shape(lambda: _learned_params())  # a 2x2 grid
  sd = param_table.to_state_dict(_learned_params(seed=1), "vit")
  loaded = param_table.from_state_dict(sd, template, "vit")
  np.testing.assert_array_equal(loaded["pos_embed"].value, sd["pos_embed"])
  big = param_table.to_state_dict(_learned_params(size=48, seed=2), "vit")  # a 3x3 grid
  with caplog.at_level(logging.INFO):
    loaded = param_table.from_state_dict(big, template, "vit")
  assert "resampling" in caplog.text
  np.testing.assert_array_equal(loaded["pos_embed"].value, resample_pos_embed(big["pos_embed"], (2, 2)))
  with pytest.raises(ValueError, match=r"pos_embed: \(1, 10, 32\)"):  # another width is no grid change
    param_table.from_state_dict(big | {"pos_embed": big["pos_embed"][..., :32]}, template, "vit")


def test_sincos_model_still_refuses_a_learned_table():
  template = jax.eval_shape(lambda: _init(ViT(num_classes=7, pool="gap", **MU), _images())["params"])
  sd = param_table.to_state_dict(_learned_params(), "vit")
  with pytest.raises(ValueError, match="it was learned, and this model cannot hold it"):
    param_table.from_state_dict(sd, template, "vit")
