"""Export (safetensors in timm naming + model card, orbax) and import (timm / MAE weight files
as stage-1 and stage-2 starting points), on real trained runs. The comparison with timm's own
forward pass lives in test_timm_interop.py (it needs torch)."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from ssfer_jax import errors, export, pytorch_weights, results
from ssfer_jax.models import param_table, vit
from ssfer_jax.trainers import finetune, loop, pretrain
from tests.conftest import small_config


@pytest.fixture(autouse=True)
def partitionable_keys():
  jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="module")
def runs(pretrained_run, small_dataset, tmp_path_factory):
  """A finished stage-1 run and a stage-2 run warm-started from it (6 steps each)."""
  jax.config.update("jax_threefry_partitionable", True)
  ft_dir = str(tmp_path_factory.mktemp("runs") / "ft")
  loop.train(small_config(finetune_config, small_dataset, init_from=pretrained_run), ft_dir,
             finetune.make_stage)
  return pretrained_run, ft_dir


def started(config, make_stage):
  """A stage's state right after its warm start (what step 1 would train from)."""
  plan = loop.plan_run(config)
  stage = make_stage(config, plan, None)
  _, shardings = loop.state_layout(config, stage, plan.mesh)
  init = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)
  return stage.warm_start(init(jax.random.key(0)))


def flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nn.meta.unbox(tree)).items()}


def test_classifier_export_round_trips_exactly(runs, tmp_path):
  _, ft_dir = runs
  card = export.export_run(ft_dir, str(tmp_path / "x"))
  clf = results.load_classifier(ft_dir)
  assert card["classes"] == clf.classes and card["weights"] == clf.weights
  assert card["timm"]["kwargs"]["num_classes"] == len(clf.classes)
  assert card["timm"]["kwargs"]["img_size"] == 32
  assert card["preprocessing"]["crop"] == "none" and card["preprocessing"]["face_framing"] > 0.9
  assert f"file='{tmp_path / 'x' / 'model.safetensors'}'" in card["timm"]["call"]
  # safetensors -> our tree: every tensor back bit for bit.
  sd = pytorch_weights.read_state_dict(str(tmp_path / "x" / "model.safetensors"))
  assert "head.weight" in sd and "norm.weight" in sd and "pos_embed" in sd
  back = param_table.from_state_dict(sd, jax.device_get(clf.params), "vit")
  ours, theirs = flat(clf.params), flat(back)
  assert ours.keys() == theirs.keys()
  for k in ours:
    np.testing.assert_array_equal(theirs[k], ours[k], err_msg=str(k))
  # orbax -> the same params and the same logits.
  model, params, loaded_card = export.load(str(tmp_path / "x"))
  assert loaded_card["files"]["sha256"] == card["files"]["sha256"]
  for k, v in flat(params).items():
    np.testing.assert_array_equal(v, ours[k], err_msg=str(k))
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
  np.testing.assert_array_equal(model.apply({"params": params}, x, train=False),
                                clf.apply(clf.params, x))


def test_stage1_exports_encoder_and_mae(runs, tmp_path):
  mae_dir, _ = runs
  enc = export.export_run(mae_dir, str(tmp_path / "enc"))
  assert enc["kind"] == "encoder" and enc["num_classes"] == 0
  assert enc["timm"]["kwargs"]["global_pool"] == "token"
  sd = pytorch_weights.read_state_dict(str(tmp_path / "enc" / "model.safetensors"))
  assert not any(k.startswith(("head", "decoder", "mask_token")) for k in sd)
  full = export.export_run(mae_dir, str(tmp_path / "mae"), fmt="mae")
  sd = pytorch_weights.read_state_dict(str(tmp_path / "mae" / "model.safetensors"))
  assert full["kind"] == "mae" and "mask_token" in sd and "decoder_pred.weight" in sd
  assert "decoder_pos_embed" in sd   # the fixed tables, as the official checkpoints hold them


def test_mae_file_starts_stage1(runs, small_dataset, tmp_path):
  """The official MAE naming (full and encoder-only files) as a stage-1 starting point."""
  mae_dir, _ = runs
  export.export_run(mae_dir, str(tmp_path / "mae"), fmt="mae")
  path = str(tmp_path / "mae" / "model.safetensors")
  config = small_config(pretrain_config, small_dataset, init_from=path)
  state = started(config, pretrain.make_stage)
  source = flat(export.load_mae_run(mae_dir)[0])
  for k, v in flat(state.params).items():
    np.testing.assert_array_equal(v, source[k], err_msg=str(k))
  # Encoder only (mae_pretrain_vit_*.pth's content): the decoder starts fresh.
  sd = pytorch_weights.read_state_dict(path)
  encoder_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
  pytorch_weights.write_safetensors(str(tmp_path / "enc.safetensors"), encoder_only, {})
  template = jax.device_get(state.params)
  fresh = jax.tree.map(np.zeros_like, template)
  params, report = pytorch_weights.load_mae(str(tmp_path / "enc.safetensors"), fresh)
  assert "decoder" in report["fresh"] and "mask_token" in report["fresh"]
  got = flat(params)
  for k, v in got.items():
    if k[0] in vit.ENCODER_KEYS:
      np.testing.assert_array_equal(v, source[k], err_msg=str(k))
    else:
      assert not v.any(), k


def test_timm_file_with_learned_positions_starts_stage2(small_dataset, tmp_path):
  """A timm ViT's safetensors (learned position table at 64 px) as a stage-2 starting point at
  32 px: encoder loaded, table resampled to the grid, head fresh."""
  kwargs = vit.vit_kwargs("mu", pool="cls", pos_embed="learned")
  src = vit.ViT(num_classes=5, **kwargs)
  src_params = src.init(jax.random.key(1), jnp.zeros((1, 64, 64, 3)), train=False)["params"]
  src_params = jax.tree.map(lambda p: p + 0.01, nn.meta.unbox(src_params))  # not at init
  sd = param_table.to_state_dict(src_params, "vit")
  pytorch_weights.write_safetensors(str(tmp_path / "timm.safetensors"), sd, {})
  config = small_config(finetune_config, small_dataset,
                        init_from=str(tmp_path / "timm.safetensors"))
  state = started(config, finetune.make_stage)
  ours, theirs = flat(state.params), flat(src_params)
  for k in ours:
    if k[0] in ("embedding", "cls", "encoder", "encoder_norm"):
      np.testing.assert_array_equal(ours[k], theirs[k], err_msg=str(k))
  np.testing.assert_allclose(ours[("pos_embed",)],
                             vit.resample_pos_embed(theirs[("pos_embed",)], (2, 2)), atol=1e-6)
  assert ours[("head", "kernel")].shape[0] == 64 and not np.array_equal(
      ours[("head", "kernel")][:, :5], theirs[("head", "kernel")])
  # A file of another architecture is refused with what is missing.
  pytorch_weights.write_safetensors(str(tmp_path / "bad.safetensors"),
                                    {k: v for k, v in sd.items() if not k.startswith("blocks.1.")}, {})
  bad = small_config(finetune_config, small_dataset, init_from=str(tmp_path / "bad.safetensors"))
  with pytest.raises(errors.InitError, match="lacks the encoder's"):
    started(bad, finetune.make_stage)


def test_export_refuses_what_it_cannot_write(tmp_path):
  with pytest.raises(errors.InitError, match="result.json not found"):
    export.export_run(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(pytorch_weights.WeightsError, match="LEAF"):
    pytorch_weights.timm_model(vit.vit_kwargs("mu", pool="cls", patch_size=16, leaf_experts=8), 7, 32)
  with pytest.raises(pytorch_weights.WeightsError, match="no such file"):
    pytorch_weights.read_state_dict(str(tmp_path / "missing.pth"))
  (tmp_path / "w.pth").write_bytes(b"x")
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    with pytest.raises(pytorch_weights.WeightsError, match="needs torch"):
      pytorch_weights.read_state_dict(str(tmp_path / "w.pth"))
