"""Export (safetensors in timm naming + model card, orbax) and import (timm / MAE weight files
as stage-1 and stage-2 starting points), on real trained runs. The comparison with timm's own
forward pass lives in test_timm_interop.py (it needs torch). Damaged, diverged and mis-sized
weight files are refused in one line."""

import importlib.util
import os
import shutil
import stat
import subprocess
import sys
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import finetune as finetune_config
from configs import pretrain as pretrain_config
from ssfer_jax import errors, export, pytorch_weights, results
from ssfer_jax.models import mae, param_table, vit
from ssfer_jax.trainers import finetune, loop, pretrain
from tests.conftest import REPO, small_config


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
  umask = os.umask(0)
  os.umask(umask)
  for name in (export.WEIGHTS, export.CARD):   # shareable, as the umask makes normal files
    assert stat.S_IMODE((tmp_path / "x" / name).stat().st_mode) == 0o666 & ~umask, name
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
  # A file of another architecture is refused with what differs.
  pytorch_weights.write_safetensors(str(tmp_path / "bad.safetensors"),
                                    {k: v for k, v in sd.items()
                                     if not k.startswith("blocks.1.")}, {})
  bad = small_config(finetune_config, small_dataset, init_from=str(tmp_path / "bad.safetensors"))
  with pytest.raises(errors.InitError, match="holds a model of depth 1, this one has depth 2: "
                     "12 of the model's 30 tensors differ in the file"):
    started(bad, finetune.make_stage)


def test_a_truncated_init_from_file_ends_in_one_line(small_dataset, tmp_path):
  """Stage 2 from a truncated weight file, on the command line: the loader's one line (the
  file, what is wrong, the fix) and exit status 2, no traceback. The importer's other refusals
  take the same way out (WeightsError -> InitError)."""
  data_path = tmp_path / "w.safetensors"
  pytorch_weights.write_safetensors(str(data_path), vit_state_dict("mu"), {})
  (tmp_path / "cut.safetensors").write_bytes(data_path.read_bytes()[:-1000])
  out = subprocess.run(
      [sys.executable, "-m", "ssfer_jax.main", "--config", "configs/finetune.py:test",
       "--workdir", str(tmp_path / "run"), f"--config.data.dir={small_dataset}",
       f"--config.init_from={tmp_path / 'cut.safetensors'}"], cwd=REPO, capture_output=True,
      text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert out.stderr.strip().splitlines()[-1].endswith(
      f"InitError: init_from: {tmp_path / 'cut.safetensors'}: truncated: "
      f"{data_path.stat().st_size - 1000} of the {data_path.stat().st_size} bytes its header "
      "describes; download, copy or export it again."), out.stderr[-3000:]


def test_export_refuses_what_it_cannot_write(tmp_path):
  with pytest.raises(errors.InitError, match="result.json not found"):
    export.export_run(str(tmp_path), str(tmp_path / "out"))
  with pytest.raises(pytorch_weights.WeightsError, match="LEAF"):
    pytorch_weights.timm_model(vit.vit_kwargs("mu", pool="cls", patch_size=16, leaf_experts=8),
                               7, 32)
  with pytest.raises(pytorch_weights.WeightsError, match="no such file"):
    pytorch_weights.read_state_dict(str(tmp_path / "missing.pth"))
  (tmp_path / "w.pth").write_bytes(b"\x80\x02x")   # a (legacy) pickle's first bytes
  if importlib.util.find_spec("torch") is None:
    with pytest.raises(pytorch_weights.WeightsError, match="needs torch"):
      pytorch_weights.read_state_dict(str(tmp_path / "w.pth"))


# ---- Damaged, diverged or mis-sized weight files (docs/RELIABILITY.md). ----

def vit_state_dict(size: str, image_size: int = 32, seed: int = 0, **overrides) -> dict:
  """A timm-named state dict of one of our ViTs (learned positions), random values."""
  model = vit.ViT(num_classes=5, **vit.vit_kwargs(size, pool="cls", pos_embed="learned",
                                                   **overrides))
  shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)["params"]))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
  return param_table.to_state_dict(params, "vit")


def vit_template(size: str, image_size: int = 32, **overrides) -> dict:
  """A ViT's params as shapes alone, as the importer's template."""
  model = vit.ViT(num_classes=5, **vit.vit_kwargs(size, pool="cls", pos_embed="learned",
                                                   **overrides))
  return jax.eval_shape(lambda: nn.meta.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False)["params"]))


def refused(path, template=None, match=""):
  """The one-line WeightsError reading or importing `path` gives."""
  with pytest.raises(pytorch_weights.WeightsError, match=match) as e:
    if template is None:
      pytorch_weights.read_state_dict(str(path))
    else:
      pytorch_weights.load_encoder(str(path), template)
  message = str(e.value)
  assert isinstance(e.value, errors.UserError) and "\n" not in message
  assert message.startswith(str(path)), message
  return message


def test_truncated_or_foreign_weight_files_are_refused_in_one_line(tmp_path):
  good = tmp_path / "good.safetensors"
  pytorch_weights.write_safetensors(str(good), vit_state_dict("mu"), {"format": "pt"})
  data = good.read_bytes()
  # An interrupted download: the data cut short, or the cut inside the header itself.
  (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
  message = refused(tmp_path / "cut.safetensors", vit_template("mu"),
                    f"truncated: {len(data) // 2} of the {len(data)} bytes its header describes")
  assert message.endswith("download, copy or export it again.")
  (tmp_path / "head.safetensors").write_bytes(data[:40])
  header = 8 + int.from_bytes(data[:8], "little")
  refused(tmp_path / "head.safetensors",
          match=f"truncated inside its header: 40 bytes, the header alone {header}; download")
  # A server's error page saved under the weights' name.
  page = b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n" * 8
  (tmp_path / "page.safetensors").write_bytes(page)
  refused(tmp_path / "page.safetensors", match="not a readable safetensors file "
          r"\(SafetensorError: .*\); download")
  (tmp_path / "page.pth").write_bytes(page)
  refused(tmp_path / "page.pth", vit_template("mu"), "not a PyTorch checkpoint .*starts with "
          r"b'<!'\); pass the file torch.save wrote")
  # torch.save's container (a zip archive) cut short: named without torch.
  with zipfile.ZipFile(tmp_path / "whole.pth", "w") as z:
    z.writestr("archive/data.pkl", b"\x80\x02}q\x00." + bytes(4000))
    z.writestr("archive/data/0", bytes(range(256)) * 64)
  whole = (tmp_path / "whole.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(whole[:len(whole) - 100])
  refused(tmp_path / "cut.pth", match=r"a damaged zip archive, truncated or corrupt \(BadZipFile")


def test_weights_with_nan_or_inf_are_refused_naming_the_tensor(tmp_path):
  sd = vit_state_dict("mu")
  sd["blocks.1.attn.qkv.weight"][3, :2] = np.nan
  sd["norm.bias"][0] = -np.inf
  pytorch_weights.write_safetensors(str(tmp_path / "diverged.safetensors"), sd, {})
  n = len(sd)
  refused(tmp_path / "diverged.safetensors", vit_template("mu"),
          rf"tensor blocks.1.attn.qkv.weight holds 2 NaN and 0 Inf of its 12288 values \(2 of "
          rf"{n} tensors hold NaN or Inf\): the weights of a diverged run")
  # The MAE importer (stage 1's init_from) reads through the same check.
  with pytest.raises(pytorch_weights.WeightsError, match="blocks.1.attn.qkv.weight holds 2 NaN"):
    pytorch_weights.load_mae(str(tmp_path / "diverged.safetensors"), {})


def test_a_file_of_another_model_size_says_which_size_fits(tmp_path):
  """Ti's file into the mu model (and back): one line with the dimensions, a count, three
  examples and the setting, not a line per tensor."""
  pytorch_weights.write_safetensors(str(tmp_path / "ti.safetensors"),
                                    vit_state_dict("Ti", patch_size=16), {})
  message = refused(tmp_path / "ti.safetensors", vit_template("mu", patch_size=16),
                    r"holds a model of width 192, mlp_dim 768, depth 12, this one has width 64, "
                    r"mlp_dim 256, depth 2: 29 of the model's 30 tensors differ in the file and "
                    r"120 of the file's are not in the model \(patch_embed.proj.weight "
                    r"\(192, 3, 16, 16\) in the file, \(64, 3, 16, 16\) here; .*; \.\.\.\); "
                    r"set --config.model.size=Ti to load it\.$")
  assert message.count(" in the file, ") == 3
  pytorch_weights.write_safetensors(str(tmp_path / "mu.safetensors"), vit_state_dict("mu"), {})
  refused(tmp_path / "mu.safetensors", vit_template("Ti", patch_size=4),
          r"width 64, patch_size 16, mlp_dim 256, depth 2, this one has width 192, patch_size 4, "
          r"mlp_dim 768, depth 12: 149 of the model's 150 .*; "
          r"set --config.model.size=mu --config.model.patch_size=16 to load it\.$")
  # The patch size alone, and dimensions no named size has.
  refused(tmp_path / "mu.safetensors", vit_template("mu", patch_size=8),
          r"holds a model of patch_size 16, this one has patch_size 8: 1 of .*"
          r"set --config.model.patch_size=16 to load it\.$")
  pytorch_weights.write_safetensors(str(tmp_path / "deep.safetensors"),
                                    vit_state_dict("mu", depth=3), {})
  refused(tmp_path / "deep.safetensors", vit_template("mu"),
          r"holds a model of depth 3, this one has depth 2: 0 of the model's 30 tensors differ in "
          r"the file and 12 of the file's are not in the model "
          r"\(blocks.2.attn.proj.bias not in the model; .*; ...\); no model size has "
          r"those dimensions \(vit.VIT_SIZES: mu, xs, Ti, S, B, L\)")


def test_an_mae_file_of_another_decoder_says_which_setting_fits(tmp_path):
  """Stage 1's init_from (a whole MAE): the decoder's dimensions get their settings too."""
  def mae_params(**kw):
    model = mae.MAE(**vit.vit_kwargs("mu", patch_size=16, decoder_heads=4, **kw))
    return jax.eval_shape(lambda: nn.meta.unbox(model.init(
        {"params": jax.random.key(0), "mask": jax.random.key(1)}, jnp.zeros((1, 32, 32, 3)),
        train=False)["params"]))
  theirs = jax.tree.map(lambda s: np.zeros(s.shape, np.float32),
                        mae_params(decoder_width=128, decoder_depth=2))
  pytorch_weights.write_safetensors(str(tmp_path / "mae.safetensors"),
                                    param_table.to_state_dict(theirs, "mae", image_size=32), {})
  with pytest.raises(pytorch_weights.WeightsError,
                     match=r"holds a model of decoder_width 128, decoder_depth 2, this one has "
                     r"decoder_width 64, decoder_depth 1: .*; set --config.model.decoder_width=128 "
                     r"--config.model.decoder_depth=2 to load it\.$"):
    pytorch_weights.load_mae(str(tmp_path / "mae.safetensors"),
                             mae_params(decoder_width=64, decoder_depth=1))


def test_timm_resampling_of_the_position_table(tmp_path, caplog):
  """resample="timm": timm's loader's antialiased bicubic (jax.image.resize's "cubic" with
  antialias, PIL's kernel), where MAE's default differs; the log names the one used. The
  comparison with timm's own loader is in tests/helpers/timm_check.py."""
  rng = np.random.default_rng(0)
  for old, new in ((14, 2), (14, 5), (4, 2), (3, 7), (2, 6)):
    table = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
    got = param_table.resample_pos_embed_timm(table, (new, new))
    want = jax.image.resize(table[0, 1:].reshape(old, old, 8), (new, new, 8), "cubic",
                            antialias=True)
    assert got.shape == (1, 1 + new * new, 8) and np.array_equal(got[0, 0], table[0, 0])
    np.testing.assert_allclose(got[0, 1:].reshape(new, new, 8), want, atol=1e-5)
    mae_way = vit.resample_pos_embed(table, (new, new))
    assert np.abs(mae_way - got).max() > 1e-2, (old, new)   # the choice matters
  sd = vit_state_dict("mu", image_size=64)               # a 4x4 grid into a 2x2 one
  pytorch_weights.write_safetensors(str(tmp_path / "w.safetensors"), sd, {})
  for method, resample in (("timm", param_table.resample_pos_embed_timm),
                           ("mae", vit.resample_pos_embed)):
    caplog.clear()
    with caplog.at_level("INFO"):
      params, _ = pytorch_weights.load_encoder(str(tmp_path / "w.safetensors"), vit_template("mu"),
                                               resample=method)
    np.testing.assert_allclose(params["pos_embed"], resample(sd["pos_embed"], (2, 2)), atol=1e-6)
    assert f"resampled to a 2x2 grid with {param_table.POS_RESAMPLING[method]}" in caplog.text
  with pytest.raises(pytorch_weights.WeightsError, match="resample='bilinear'"):
    pytorch_weights.load_encoder(str(tmp_path / "w.safetensors"), {}, resample="bilinear")


def test_written_weights_honour_the_umask(tmp_path):
  """safetensors' own writer creates 0600 files whatever the umask; ours is a normal file."""
  for mask in (0o022, 0o027):
    old = os.umask(mask)
    try:
      path = tmp_path / f"m{mask:o}.safetensors"
      pytorch_weights.write_safetensors(str(path), {"a": np.ones(2, np.float32)}, {})
    finally:
      os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask


def test_exports_are_git_ignored():
  """The README's export, run and prediction folders stay out of commits."""
  if shutil.which("git") is None or not (REPO / ".git").exists():
    pytest.skip("not a git checkout")
  for path in ("exports/ss/model.safetensors", "runs/ss/result.json", "preds/predictions.csv"):
    out = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert out.returncode == 0, f"{path} is not ignored"
