"""Stage 3 on real faces: the semi-supervised batch, the EMA teacher, pseudo-label masking and
loss, sharded = single-device, exact resume, the per-epoch DTM/diagnostics hook, bad input."""

import dataclasses
import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import semisup as semisup_config
from ssfer_jax import errors, evaluate, results
from ssfer_jax.input import augment, device, pipeline, records
from ssfer_jax.methods import thresholds
from ssfer_jax.runtime import sharding, writers
from ssfer_jax.trainers import loop, semisup
from tests.conftest import small_config, train_losses


@pytest.fixture(autouse=True)
def partitionable_keys():
  jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture
def stage2_run(finetuned_run):
  return finetuned_run


def ss_config(data_dir, init_from, variant="test", **overrides):
  return small_config(semisup_config, data_dir, variant, init_from=init_from,
                      **{"batch_size": 8, **overrides})


FILL = (150, 117, 103)   # randaugment.fill_colour of the configs' face mean


def semisup_iterator(data_dir, ratio=2, batch=8, strong_views=1, strong_view="device"):
  return pipeline.make_train_iterator(
      data_dir, "default", ("train_labeled",), kind="semisup", global_batch_size=batch,
      image_size=32, seed=3, unlabeled_names=("train_unlabeled",), unlabeled_ratio=ratio,
      strong_views=strong_views, num_threads=1, process_index=0, process_count=1,
      strong_view=strong_view, strong_fill=FILL)


def test_semisup_batches_pair_two_streams_and_resume_exactly(small_dataset):
  labeled = records.load_split(small_dataset, "default", ["train_labeled"])
  unlabeled = records.load_split(small_dataset, "default", ["train_unlabeled"])
  it = semisup_iterator(small_dataset)
  batches = [next(it) for _ in range(2 + len(unlabeled) // 16 + len(labeled) // 8)]
  spec = pipeline.batch_spec("semisup", 8, 32, unlabeled_ratio=2)
  for b in batches[:1]:
    assert jax.tree.map(lambda a: (a.shape, a.dtype), b) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), spec)
  # Each stream has its own epochs: its first pass is a permutation of its own list.
  lab = np.concatenate([b["labeled"]["index"] for b in batches])
  unl = np.concatenate([b["unlabeled"]["index"] for b in batches])
  assert sorted(lab[:len(labeled)]) == sorted(labeled)
  assert sorted(unl[:len(unlabeled)]) == sorted(unlabeled)
  for b in batches:
    u = b["unlabeled"]
    np.testing.assert_array_equal(unlabeled[u["position"]], u["index"])
    # Labels of "unlabeled" records are carried (for diagnostics) as stored.
    np.testing.assert_array_equal(u["label"], records.read_labels(small_dataset, u["index"]))
  # Weak and strong views come from one stored image, with independent windows and flips.
  source = pipeline.grain.sources.ArrayRecordDataSource(
      records.shard_paths(small_dataset, records.load_manifest(small_dataset)))
  u = batches[0]["unlabeled"]
  for row, index in enumerate(u["index"]):
    stored = augment.decode(records.decode(source[int(index)])["image"])
    np.testing.assert_array_equal(u["image"][row], stored)
  assert np.mean(np.any(u["crop"] != u["strong_crop"][:, 0], axis=1)) > 0.9
  assert 0.0 <= u["strong_u"].min() and u["strong_u"].max() < 1.0
  # The iterator's state is one integer; a restored iterator continues identically.
  it = semisup_iterator(small_dataset)
  next(it), next(it)
  state = it.get_state()
  expected = next(it)
  again = semisup_iterator(small_dataset)
  again.set_state(state)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(next(again))):
    np.testing.assert_array_equal(a, b)


def test_strong_view_keeps_dtype_and_shape(small_dataset):
  u = jax.tree.map(jnp.asarray, next(semisup_iterator(small_dataset))["unlabeled"])
  fill = [round(255 * m) for m in semisup_config.get_config("test").data.mean]
  strong = semisup.strong_view(u, 32, fill)
  weak = device.crop_resize_flip(u["image"], u["crop"], u["flip"], 32)
  assert strong.shape == weak.shape == (16, 32, 32, 3) and strong.dtype == jnp.float32
  assert 0 <= float(strong.min()) and float(strong.max()) <= 255
  assert float(jnp.mean(jnp.abs(strong - weak))) > 1.0


def test_host_strong_views_are_the_devices_made_on_the_host(small_dataset):
  """strong_view="host": the batch carries the strong views as uint8 images, made from the
  same draws as the device's (same ops, magnitudes, windows and flips), pixels within a grey
  level or two of what the step makes from the "device" batch; the rest of the batch is
  identical and the iterator resumes exactly."""
  assert semisup.randaugment.fill_colour(semisup_config.get_config("test").data.mean) == FILL
  assert pipeline.strong_view_place("auto") == "host"   # the tests' CPU backend
  on_device = next(semisup_iterator(small_dataset, strong_views=2))
  it = semisup_iterator(small_dataset, strong_views=2, strong_view="auto")
  on_host = next(it)
  spec = pipeline.batch_spec("semisup", 8, 32, unlabeled_ratio=2, strong_views=2,
                             strong_view="host")
  assert jax.tree.map(lambda a: (a.shape, a.dtype), on_host) == \
      jax.tree.map(lambda s: (s.shape, s.dtype), spec)
  unl, ref = on_host["unlabeled"], on_device["unlabeled"]
  assert set(ref) - set(unl) == {"strong_crop", "strong_flip", "strong_u"}
  for k in unl.keys() - {"strong_image"}:
    np.testing.assert_array_equal(unl[k], ref[k])
  for a, b in zip(jax.tree.leaves(on_host["labeled"]), jax.tree.leaves(on_device["labeled"])):
    np.testing.assert_array_equal(a, b)
  dev_ref = jax.tree.map(jnp.asarray, ref)
  for view in range(2):
    host = np.asarray(semisup.strong_view(jax.tree.map(jnp.asarray, unl), 32, FILL, view))
    np.testing.assert_array_equal(host, unl["strong_image"][:, view])
    device_view = np.asarray(semisup.strong_view(dev_ref, 32, FILL, view))
    diff = np.abs(host - device_view)
    # The device passes an unrounded crop on where no op applies (|x - round(x)| is 0.25 on
    # average); contrast, autocontrast and equalize stretch one-level differences.
    assert diff.mean() < 0.4 and (diff > 2).mean() < 0.02 and (diff > 8).mean() < 0.002
  assert np.mean(np.abs(unl["strong_image"][:, 0].astype(int) - unl["strong_image"][:, 1])) > 5
  state = it.get_state()
  expected = next(it)
  again = semisup_iterator(small_dataset, strong_views=2, strong_view="host")
  again.set_state(state)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(next(again))):
    np.testing.assert_array_equal(a, b)


def test_host_strong_views_train_as_device_ones(small_dataset, stage2_run):
  """The loss of the same batch with its strong views made on the host or on the device: the
  same labeled loss and teacher mask (the weak views are identical), the strong views' loss
  within the pixels' grey level."""
  config, plan, _, device_np = _stage_and_batch(small_dataset, stage2_run, lambda_u=1.0)
  config.threshold.tau = 0.0   # every row trains on the strong view
  stage = semisup.training_stage(config, plan, semisup.model_kwargs(
      config, results.read_result(stage2_run)), 6)
  host_np = next(semisup_iterator(small_dataset, ratio=1, strong_view="host"))
  _, shardings = loop.state_layout(config, stage, plan.mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(
      jax.random.key(0))
  loss = jax.jit(lambda b: stage.loss_fn(state.params, state.extra, b, jax.random.key(1)))
  (l_dev, on_device), (l_host, on_host) = (loss(pipeline.to_global(b, plan.mesh))
                                           for b in (device_np, host_np))
  np.testing.assert_allclose(on_host["loss_x"], on_device["loss_x"], rtol=1e-5)
  assert float(on_host["mask_rate"]) == float(on_device["mask_rate"]) == 1.0
  np.testing.assert_allclose(on_host["loss_u"], on_device["loss_u"], rtol=0.02)
  np.testing.assert_allclose(l_host, l_dev, rtol=0.02)
  assert float(on_host["loss_u"]) > 0


def test_host_strong_view_needs_its_fill_and_a_known_place(small_dataset):
  kw = dict(kind="semisup", global_batch_size=8, image_size=32, seed=3,
            unlabeled_names=("train_unlabeled",), unlabeled_ratio=1, num_threads=1)
  with pytest.raises(ValueError, match="strong_fill"):
    pipeline.make_train_iterator(small_dataset, "default", ("train_labeled",),
                                 strong_view="host", **kw)
  with pytest.raises(ValueError, match="unknown strong_view 'gpu'"):
    pipeline.make_train_iterator(small_dataset, "default", ("train_labeled",),
                                 strong_view="gpu", strong_fill=FILL, **kw)


def test_masking_and_unlabeled_loss_on_hand_made_logits():
  teacher = jnp.log(jnp.array([[0.9, 0.05, 0.05], [0.5, 0.3, 0.2], [0.1, 0.15, 0.75],
                               [0.2, 0.7, 0.1]]))
  student = jnp.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [0.0, 1.0, 3.0], [1.0, -1.0, 0.0]])
  mask, taus = thresholds.mask(thresholds.Policy("fixed", tau=0.7), {}, jax.nn.softmax(teacher))
  np.testing.assert_array_equal(mask, [1, 0, 1, 1])   # 0.7 itself passes (>=)
  np.testing.assert_allclose(taus, [0.7] * 3)
  logp = student - np.log(np.exp(student).sum(-1, keepdims=True))
  hard = -np.array([logp[0, 0], logp[1, 0], logp[2, 2], logp[3, 1]])
  np.testing.assert_allclose(semisup.unlabeled_loss(student, teacher, mask),
                             np.mean(hard * np.array(mask)), rtol=1e-6)
  t = 0.5
  soft_targets = np.exp(np.asarray(teacher) / t)
  soft_targets /= soft_targets.sum(-1, keepdims=True)
  soft = -(soft_targets * logp).sum(-1)
  np.testing.assert_allclose(semisup.unlabeled_loss(student, teacher, mask, False, t),
                             np.mean(soft * np.array(mask)), rtol=1e-6)
  grad = jax.grad(lambda tl: semisup.unlabeled_loss(student, tl, mask, False, t))(teacher)
  assert not np.any(np.asarray(grad))                  # the teacher gets no gradient


def test_debiasing_pulls_the_teachers_marginal_to_its_target():
  logits = jnp.log(jnp.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.7, 0.1, 0.2]]))
  prior = jnp.full((3,), 1 / 3)
  out, new_prior = semisup.debias_logits(logits, prior, 1.0, 0.0)   # momentum 0: p_bar = batch
  np.testing.assert_allclose(new_prior, [0.7, 0.5 / 3, 0.4 / 3], rtol=1e-6)
  np.testing.assert_allclose(out, logits - jnp.log(new_prior), rtol=1e-6)
  assert np.argmax(out[1]) == 1   # the over-predicted first class loses its marginal rows
  # A target equal to the teacher's marginal changes nothing (distribution alignment at rest).
  same, _ = semisup.debias_logits(logits, prior, 1.0, 0.0, jnp.log(new_prior))
  np.testing.assert_allclose(same, logits, rtol=1e-6, atol=1e-6)
  _, slow = semisup.debias_logits(logits, prior, 1.0, 0.9)
  np.testing.assert_allclose(slow, 0.9 * prior + 0.1 * new_prior, rtol=1e-6)


def _stage_and_batch(data_dir, stage2, variant="test", **overrides):
  config = ss_config(data_dir, stage2, variant, **overrides)
  plan = loop.plan_run(config)
  result = results.read_result(stage2)
  stage = semisup.training_stage(config, plan, semisup.model_kwargs(config, result),
                                 len(result["classes"]))
  return config, plan, stage, next(semisup_iterator(data_dir, ratio=1,
                                                    strong_views=plan.data.strong_views))


def _spread_head(state):
  """A head that gives confident, varied predictions (a fresh one gives ~uniform ones), so
  thresholds pass some rows and reject others."""
  def spread(params):
    head = dict(params["head"])
    k = head["kernel"]
    head["kernel"] = jax.device_put(0.3 * jax.random.normal(jax.random.key(5), k.shape),
                                    k.sharding)
    return {**params, "head": head}
  extra = {**state.extra, "ema": spread(state.extra["ema"])} if "ema" in state.extra else \
      state.extra
  return state.replace(params=spread(state.params), extra=extra)


@pytest.mark.parametrize("variant", ["test", "test,leaf,negative"])
def test_teacher_is_an_ema_of_the_student_and_takes_no_gradient(small_dataset, stage2_run,
                                                                variant):
  config, plan, stage, batch_np = _stage_and_batch(small_dataset, stage2_run, variant,
                                                   ema_decay=0.9, lambda_u=1.0)
  leaf = config.leaf.enabled
  # Every pseudo-label passes (the teacher matters to the loss); with LEAF a confident,
  # varied teacher and tau 0.4 leave rows for the contrastive term and negative learning too.
  config.threshold.tau, config.negative.bound = (0.4, 0.02) if leaf else (0.0, 0.05)
  stage = semisup.training_stage(config, plan, semisup.model_kwargs(
      config, results.read_result(stage2_run)), 6)
  mesh = plan.mesh
  _, shardings = loop.state_layout(config, stage, mesh)
  state = jax.jit(lambda r: nn.meta.unbox(stage.init(r)), out_shardings=shardings)(
      jax.random.key(0))
  # A teacher that differs from the student, as after some training.
  state = state.replace(extra={**state.extra, "ema": jax.tree.map(lambda p: 0.5 * p,
                                                                  state.extra["ema"])})
  if leaf:
    state = _spread_head(state)
  batch = pipeline.to_global(batch_np, mesh)
  rng = jax.random.key(1)
  grad_teacher = jax.grad(lambda t: stage.loss_fn(
      state.params, {**state.extra, "ema": t}, batch, rng)[0])(state.extra["ema"])
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad_teacher))
  # Labels of unlabeled records never reach the loss or its gradient.
  relabeled = dict(batch_np, unlabeled=dict(batch_np["unlabeled"]))
  relabeled["unlabeled"]["label"] = (batch_np["unlabeled"]["label"] + 1) % 6
  loss_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b: stage.loss_fn(p, state.extra, b, rng)[0]))
  l1, g1 = loss_and_grad(state.params, batch)
  l2, g2 = loss_and_grad(state.params, pipeline.to_global(relabeled, mesh))
  assert float(l1) == float(l2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(a, b)
  # After a step: teacher = 0.9 teacher + 0.1 student's new params.
  old_teacher = jax.device_get(state.extra["ema"])
  step = jax.jit(loop.make_train_step(stage.loss_fn, stage.tx, stage.schedule, 0,
                                      stage.update_extra))
  new, out, finite = step(state, batch)
  assert bool(finite) and float(out["loss_u"]) > 0
  for t0, p1, t1 in zip(jax.tree.leaves(old_teacher), jax.tree.leaves(new.params),
                        jax.tree.leaves(new.extra["ema"])):
    np.testing.assert_allclose(t1, 0.9 * t0 + 0.1 * np.asarray(p1), rtol=1e-6, atol=1e-7)
  counts = jax.device_get(new.extra["counts"])
  if leaf:
    assert 0 < float(out["mask_rate"]) < 1 and float(out["negative_rows"]) > 0
    assert float(out["loss_supcon"]) > 0 and counts["negative_pairs"].sum() > 0
  else:
    assert float(out["mask_rate"]) == 1.0
    assert counts["seen"].sum() == counts["passed"].sum() == 8   # mu x B rows, all masked


@pytest.mark.parametrize("teacher,policy,variant", [
    ("ema", "freematch", "test"), ("student", "flexmatch", "test"),
    ("ema", "fixed", "test,leaf,negative")])
def test_sharded_and_single_device_semisup_steps_agree(small_dataset, stage2_run, teacher,
                                                       policy, variant):
  config, plan, _, batch_np = _stage_and_batch(small_dataset, stage2_run, variant,
                                               teacher=teacher)
  config.threshold.policy, config.threshold.p_cutoff = policy, 0.0
  config.negative.bound = 0.02
  # With FreeMatch, the teacher's class marginal is also pulled to a target: its running
  # mean over the unlabeled rows must be the global batch's, however the rows are sharded.
  target = None
  if policy == "freematch":
    config.debias.strength, config.debias.momentum = 1.0, 0.5
    target = np.arange(1.0, 7.0) / 21.0
  result = results.read_result(stage2_run)

  def run(mesh):
    p = dataclasses.replace(plan, mesh=mesh, total_steps=10,
                            data=dataclasses.replace(plan.data, steps_per_epoch=5))
    stage = semisup.training_stage(config, p, semisup.model_kwargs(config, result), 6, target)
    sgd, adamw_init = optax.sgd(0.5), stage.init
    stage = dataclasses.replace(stage, tx=sgd, init=lambda r: (
        lambda s: s.replace(opt_state=sgd.init(s.params)))(adamw_init(r)))
    _, shardings = loop.state_layout(config, stage, mesh)
    state = _spread_head(jax.jit(lambda r: nn.meta.unbox(stage.init(r)),
                                 out_shardings=shardings)(jax.random.key(0)))
    batch = pipeline.to_global(batch_np, mesh)
    step = jax.jit(loop.make_train_step(stage.loss_fn, stage.tx, stage.schedule, 0,
                                        stage.update_extra), donate_argnums=0)
    outs = []
    for _ in range(2):
      state, out, finite = step(state, batch)
      assert bool(finite)
      outs.append({k: np.asarray(v) for k, v in out.items()})
    return outs, jax.device_get(state)

  o1, s1 = run(sharding.make_mesh((1, 1), devices=jax.devices()[:1]))
  o8, s8 = run(sharding.make_mesh((4, 2)))
  if config.leaf.enabled:   # every LEAF and negative-learning term had rows to act on
    assert 0 < o1[0]["mask_rate"] < 1 and o1[0]["negative_rows"] > 0, o1[0]
    assert o1[0]["loss_supcon"] > 0 and o1[0]["loss_consistency"] > 0
  if target is not None:   # p_bar moved off its start, to a distribution
    assert not np.allclose(s1.extra["prior"], target) and np.isclose(s1.extra["prior"].sum(), 1)
  for a, b in zip(o1, o8):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)
  scale = max(float(o1[0]["grad_norm"]), 1.0)
  for a, b in zip(jax.tree.leaves((s1.params, s1.extra)), jax.tree.leaves((s8.params, s8.extra))):
    if np.issubdtype(np.asarray(a).dtype, np.integer):
      np.testing.assert_array_equal(a, b)   # FlexMatch statuses, pseudo-label counts
    else:
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


# FlexMatch's per-record state (and distribution alignment's p_bar) with the plain model; LEAF's
# levels and negative learning's terms together in the slow suite (LEAF adds parameters, no
# stage state of its own, so the default suite's variant covers what a resume restores).
@pytest.mark.parametrize("variant,policy", [
    ("test", "flexmatch"),
    pytest.param("test,leaf,negative", "fixed", marks=pytest.mark.slow)])   # LEAF: params only
def test_resume_restores_teacher_thresholds_and_both_streams(small_dataset, stage2_run,
                                                             tmp_path, variant, policy):
  config = ss_config(small_dataset, stage2_run, variant, keep_checkpoints=1, checkpoint_every=1)
  # FlexMatch at p_cutoff 0 passes every row (its per-record state moves; with LEAF the
  # ambiguous labels act on all rows). The stage-2 test model is near uniform (1/6): with
  # negative learning, tau 1 rejects every row, so the contrastive term and negative
  # learning (every class below 0.5) act on all of them.
  config.threshold.policy, config.threshold.p_cutoff = policy, 0.0
  config.threshold.tau, config.negative.bound = 1.0, 0.5
  if policy == "flexmatch":   # and distribution alignment's running marginal p_bar
    config.debias.strength, config.debias.target = 1.0, "labeled"
  straight = loop.train(config, str(tmp_path / "straight"), semisup.make_stage)
  loop.train(config, str(tmp_path / "resumed"), semisup.make_stage, stop_at=3)
  resumed = loop.train(config, str(tmp_path / "resumed"), semisup.make_stage)
  s, r = train_losses(tmp_path / "straight"), train_losses(tmp_path / "resumed")
  assert sorted(s) == sorted(r) == list(range(1, 7))
  np.testing.assert_allclose([r[k] for k in s], [s[k] for k in s], rtol=1e-6)
  train = [r for r in writers.read_metrics(str(tmp_path / "resumed")) if r["split"] == "train"]
  if config.negative.enabled:
    assert all(r["negative_rows"] == 1 and r["loss_supcon"] > 0 for r in train)
  else:
    assert all(r["mask_rate"] == 1 and r["loss_u"] > 0 for r in train)
    selected = straight.extra["thresholds"]["selected_label"]
    assert int(jnp.sum(selected >= 0)) > 0      # records were selected: the state moved
    np.testing.assert_array_equal(selected, resumed.extra["thresholds"]["selected_label"])
  for a, b in zip(jax.tree.leaves(straight.extra), jax.tree.leaves(resumed.extra)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  result = results.read_result(str(tmp_path / "straight"))
  assert result["stage"] == "semisup" and result["weights"] in ("raw", "ema")
  assert result["model"] == {**results.read_result(stage2_run)["model"], **(
      {"leaf_experts": config.leaf.experts} if config.leaf.enabled else {})}
  clf = results.load_classifier(str(tmp_path / "straight"))
  report = evaluate.Evaluator.for_classifier(clf, data_dir=small_dataset, split="default",
                                             lists=["val"], mesh=sharding.make_mesh((-1, 1)),
                                             batch_size=16)(clf.params)
  assert report["accuracy"] == pytest.approx(result["val"]["accuracy"])


def test_dtm_hook_updates_thresholds_and_logs_the_epoch(small_dataset, stage2_run, tmp_path):
  config = ss_config(small_dataset, stage2_run)
  config.threshold.policy = "dtm"
  plan = loop.plan_run(config)
  config.total_steps = 2 * plan.steps_per_epoch
  workdir = str(tmp_path / "dtm")
  state = loop.train(config, workdir, semisup.make_stage)
  epochs = [r for r in writers.read_metrics(workdir) if r["split"] == "epoch"]
  assert [r["step"] for r in epochs] == [plan.steps_per_epoch, 2 * plan.steps_per_epoch]
  classes = records.load_manifest(small_dataset)["classes"]
  for r in epochs:
    assert all(f"threshold/{c}" in r for c in classes)
    assert {"mask_rate", "pseudo_labels", "teacher_accuracy_unlabeled"} <= r.keys()
    assert any(k.startswith("mask_rate/") for k in r)
  assert os.path.exists(os.path.join(workdir, semisup.FIGURE))
  assert all(int(v.sum()) == 0 for v in jax.device_get(state.extra["counts"]).values())
  train = [r for r in writers.read_metrics(workdir) if r["split"] == "train"]
  assert {"loss_x", "loss_u", "mask_rate", "confidence", "threshold_mean"} <= train[-1].keys()
  val = [r for r in writers.read_metrics(workdir) if r["split"] == "val"]
  assert "raw_accuracy" in val[-1] and "ema_accuracy" in val[-1]
  # The hook's update is DTM's rule on the teacher's pass over train_labeled.
  stage = semisup.make_stage(config, plan, None)
  hook = stage.hooks[0].fn
  raised = state.replace(extra={**state.extra, "thresholds": {"tau": jnp.full((6,), 0.9)}})
  update = hook(raised, 0)
  probs, target = hook._labeled.probabilities(state.extra["ema"])
  assert len(target) == len(records.load_split(small_dataset, "default", ["train_labeled"]))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  expected = thresholds.dtm_epoch_update({"tau": jnp.full((6,), 0.9)}, probs,
                                         np.where(target >= 0, target, -1))
  np.testing.assert_allclose(update.state.extra["thresholds"]["tau"], expected["tau"], rtol=1e-6)
  assert update.metrics["threshold/" + classes[0]] == pytest.approx(float(expected["tau"][0]))


def _copy_build(src, dst, **manifest_changes):
  shutil.copytree(src, dst)
  path = os.path.join(dst, records.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  manifest.update(manifest_changes)
  with open(path, "w") as f:
    json.dump(manifest, f)
  return str(dst)


def test_bad_input_fails_before_compiling(small_dataset, stage2_run, tmp_path):
  train = lambda c: loop.train(c, str(tmp_path / "run"), semisup.make_stage)
  with pytest.raises(errors.InitError, match="init_from is empty"):
    train(ss_config(small_dataset, ""))
  with pytest.raises(errors.InitError, match="result.json not found"):
    train(ss_config(small_dataset, str(tmp_path)))
  fake = tmp_path / "not_stage2"
  fake.mkdir()
  with open(fake / results.RESULT_FILE, "w") as f:
    json.dump({"stage": "pretrain_mae"}, f)
  with pytest.raises(errors.InitError, match="stage 3 starts from a stage-2"):
    train(ss_config(small_dataset, str(fake)))
  # An empty unlabeled list.
  split = json.load(open(os.path.join(small_dataset, "splits", "default.json")))
  split["lists"]["train_unlabeled"] = []
  with open(os.path.join(small_dataset, "splits", "empty_unlabeled.json"), "w") as f:
    json.dump(split, f)
  with pytest.raises(errors.ConfigError, match="hold 0 records, fewer than one unlabeled"):
    loop.plan_run(_with(ss_config(small_dataset, stage2_run), split="empty_unlabeled"))
  # mu x B must be a whole number of rows per batch shard: mu a whole number >= 1 (the
  # config's type keeps it an int) and B a multiple of the shards.
  c = ss_config(small_dataset, stage2_run)
  c.data.unlabeled_ratio = 0
  with pytest.raises(errors.ConfigError, match="unlabeled_ratio"):
    train(c)
  with pytest.raises(errors.ConfigError, match="not divisible"):
    train(ss_config(small_dataset, stage2_run, batch_size=12))
  c = ss_config(small_dataset, stage2_run)
  c.debias.strength, c.debias.target = 1.0, "even"
  with pytest.raises(errors.ConfigError, match="debias: .*target='even'"):
    train(c)
  # Another image size or normalisation than the stage-2 model's.
  c = ss_config(small_dataset, stage2_run)
  c.data.image_size = 48
  with pytest.raises(errors.ConfigError, match="data.image_size=48.*expects 32"):
    train(c)
  c = ss_config(small_dataset, stage2_run)
  c.data.mean = (0.5, 0.5, 0.5)
  with pytest.raises(errors.ConfigError, match="data.mean"):
    train(c)
  other = _copy_build(small_dataset, tmp_path / "stored48", image_size=48)
  with pytest.raises(errors.DatasetError, match="stores 48 px"):
    train(ss_config(other, stage2_run))
  classes = records.load_manifest(small_dataset)["classes"]
  renamed = _copy_build(small_dataset, tmp_path / "renamed", classes=classes[::-1])
  with pytest.raises(errors.DatasetError, match="names and order must match"):
    train(ss_config(renamed, stage2_run))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _with(config, **data):
  for k, v in data.items():
    config.data[k] = v
  return config
