"""LEAF's pieces and negative learning on hand-made numbers: positive/negative sets and their
loss, learnable gates that sum to one, the two-view consistency, the contrastive term against
a NumPy transcription of SupConLoss, negative learning's mask and loss; and the batch's
second strong view. Stage-level checks (sharded = single device, exact resume) are in
test_semisup.py."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssfer_jax.input import pipeline
from ssfer_jax.methods import leaf, negative_learning
from ssfer_jax.models import leaf_levels


def test_positive_sets_at_their_boundaries():
  probs = np.array([
      [0.92, 0.05, 0.02, 0.01, 0.00],   # the top-1 alone reaches 0.9
      [0.90, 0.10, 0.00, 0.00, 0.00],   # exactly the bound: reached
      [0.50, 0.45, 0.03, 0.02, 0.00],   # two classes (the public code's test would keep one)
      [0.40, 0.30, 0.25, 0.05, 0.00],   # three
      [0.30, 0.25, 0.20, 0.15, 0.10],   # no k <= 3 reaches: the top 3
  ], np.float32)
  want = np.array([[1, 0, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                   [1, 1, 1, 0, 0]], bool)
  np.testing.assert_array_equal(leaf.positive_sets(jnp.asarray(probs)), want)
  # Classes in any order: the sets follow the probabilities, not the column positions.
  perm = np.array([3, 0, 4, 1, 2])
  np.testing.assert_array_equal(leaf.positive_sets(jnp.asarray(probs[:, perm])), want[:, perm])
  np.testing.assert_array_equal(leaf.positive_sets(jnp.asarray(probs), max_k=1),
                                np.eye(5, dtype=bool)[[0] * 5])


def test_ambiguous_loss_matches_its_formula_and_ranks_the_sets():
  z = np.array([[2.0, 1.0, -1.0, 0.0, -2.0], [0.0, 3.0, 0.0, 0.0, 0.0]], np.float32)
  positive = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
  lse = lambda a: np.log(np.sum(np.exp(a)))
  want = [np.log1p(np.exp(lse(-z[r][positive[r]]) + lse(z[r][~positive[r]]))) for r in range(2)]
  got = leaf.ambiguous_loss(jnp.asarray(z), jnp.asarray(positive))
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Row 1's positive class sits below a negative one: a larger loss than row 0's.
  assert float(got[1]) > float(got[0])
  # Its gradient raises positive logits and lowers negative ones.
  g = np.asarray(jax.grad(lambda a: jnp.sum(leaf.ambiguous_loss(a, jnp.asarray(positive))))(
      jnp.asarray(z)))
  assert np.all(g[positive] < 0) and np.all(g[~positive] > 0)


def test_gates_sum_to_one_and_learn_and_levels_start_at_the_identity():
  x = 3.0 * jax.random.normal(jax.random.key(0), (6, 16))
  mixture = leaf_levels.ExpertMixture(experts=4)
  params = nn.meta.unbox(mixture.init(jax.random.key(1), x)["params"])
  y, gates = mixture.apply({"params": params}, x)
  np.testing.assert_array_equal(y, x)   # experts start at the identity: last layer zero
  np.testing.assert_allclose(gates, 0.25)
  # Moved, as after training: the gates still sum to one, and get a gradient (the public
  # code's top-1 routing gives its gates none).
  params = {**params, "gate": jax.random.normal(jax.random.key(2), params["gate"].shape),
            "fc2_kernel": 0.1 * jax.random.normal(jax.random.key(3),
                                                  params["fc2_kernel"].shape)}
  y, gates = mixture.apply({"params": params}, x)
  assert gates.shape == (6, 4) and y.shape == x.shape
  np.testing.assert_allclose(jnp.sum(gates, axis=-1), 1.0, rtol=1e-6)
  assert float(jnp.min(gates)) > 0 and float(jnp.max(jnp.abs(y - x))) > 0
  grad = jax.grad(lambda p: jnp.sum(mixture.apply({"params": p}, x)[0] ** 2))(params)
  assert float(jnp.max(jnp.abs(grad["gate"]))) > 0
  assert abs(float(leaf_levels.gate_entropy(gates)) - float(
      -jnp.mean(jnp.sum(gates * jnp.log(gates), -1)))) < 1e-6
  assert abs(float(leaf_levels.gate_entropy(jnp.full((3, 4), 0.25))) - np.log(4)) < 1e-6
  # Both levels: the head sees the pooled feature unchanged at the start, unnormalised; the
  # contrastive feature is its unit-length direction.
  levels = leaf_levels.Levels(experts=4)
  out, feature, g = levels.apply(levels.init(jax.random.key(4), x), x)
  np.testing.assert_array_equal(out, x)
  np.testing.assert_allclose(feature, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-6)
  assert set(g) == {"semantic", "instance"}


def test_consistency_is_zero_for_identical_views_and_symmetric():
  a = jax.random.normal(jax.random.key(0), (5, 7))
  b = jax.random.normal(jax.random.key(1), (5, 7))
  np.testing.assert_array_equal(leaf.consistency_loss(a, a), np.zeros(5))
  np.testing.assert_allclose(leaf.consistency_loss(a, b), leaf.consistency_loss(b, a))
  pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
  np.testing.assert_allclose(leaf.consistency_loss(a, b), np.sum((pa - pb) ** 2, -1),
                             rtol=1e-6)
  assert float(jnp.min(leaf.consistency_loss(a, b))) > 0


def numpy_supcon(features, temperature=0.07, base_temperature=0.07):
  """SupConLoss.forward (HobbitLong/SupContrast, as LEAF imports it) with labels=None,
  mask=None, contrast_mode='all', line by line in NumPy float64."""
  batch_size, contrast_count = features.shape[:2]
  mask = np.eye(batch_size)
  contrast_feature = np.concatenate([features[:, i] for i in range(contrast_count)], axis=0)
  anchor_feature, anchor_count = contrast_feature, contrast_count
  anchor_dot_contrast = anchor_feature @ contrast_feature.T / temperature
  logits = anchor_dot_contrast - anchor_dot_contrast.max(axis=1, keepdims=True)
  mask = np.tile(mask, (anchor_count, contrast_count))
  logits_mask = np.ones_like(mask)
  logits_mask[np.arange(batch_size * anchor_count), np.arange(batch_size * anchor_count)] = 0
  mask = mask * logits_mask
  exp_logits = np.exp(logits) * logits_mask
  log_prob = logits - np.log(exp_logits.sum(1, keepdims=True))
  mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
  loss = -(temperature / base_temperature) * mean_log_prob_pos
  return loss.reshape(anchor_count, batch_size).mean()


def test_contrastive_loss_matches_supcon_transcription():
  rng = np.random.default_rng(0)
  for n, v, d in ((6, 2, 8), (5, 3, 4)):
    f = rng.normal(size=(n, v, d))
    f /= np.linalg.norm(f, axis=-1, keepdims=True)
    views = [jnp.asarray(f[:, i], jnp.float32) for i in range(v)]
    got = leaf.contrastive_loss(views, jnp.ones(n, bool), 0.5)
    np.testing.assert_allclose(got, numpy_supcon(f, 0.5, 0.07), rtol=1e-5)
    # Only valid rows take part: the same as the transcription on those rows alone.
    valid = np.array([1, 0, 1, 1, 0, 1][:n], bool)
    got = leaf.contrastive_loss(views, jnp.asarray(valid))
    np.testing.assert_allclose(got, numpy_supcon(f[valid]), rtol=1e-4)
  assert float(leaf.contrastive_loss(views, jnp.zeros(n, bool))) == 0.0
  grad = jax.grad(lambda a: leaf.contrastive_loss(a, jnp.zeros(n, bool)))(views)
  assert all(np.all(np.isfinite(g)) and not np.any(g) for g in grad)


def test_negative_learning_mask_and_loss():
  probs = jnp.array([[0.60, 0.30, 0.08, 0.02],    # rejected: class 3 is below 0.05
                     [0.90, 0.04, 0.03, 0.03],    # passed the threshold: not taking part
                     [0.50, 0.30, 0.15, 0.05],    # rejected, but 0.05 is not below 0.05
                     [0.40, 0.30, 0.28, 0.02]])   # rejected: class 3
  mask = jnp.array([0.0, 1.0, 0.0, 0.0])
  negative = negative_learning.negative_classes(probs, mask, 0.05)
  want = np.zeros((4, 4), bool)
  want[0, 3] = want[3, 3] = True
  np.testing.assert_array_equal(negative, want)
  z = np.array([[1.0, 0.0, -1.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 30.0]], np.float32)   # row 3: p_3 ~ 1, -log(1 - p) ~ 28.9
  p = np.exp(z.astype(np.float64))
  p /= p.sum(-1, keepdims=True)
  loss = negative_learning.negative_loss(jnp.asarray(z), negative)
  # A difference of two float32 log-sum-exps of size ~3: absolute error ~1e-6.
  np.testing.assert_allclose(loss[:3], [-np.log1p(-p[0, 3]), 0.0, 0.0], atol=2e-6)
  np.testing.assert_allclose(loss[3], np.log(3 + np.exp(30.0)) - np.log(3.0), rtol=1e-6)
  two = np.zeros((1, 4), bool)
  two[0, [1, 2]] = True   # several negative classes: their mean
  np.testing.assert_allclose(
      negative_learning.negative_loss(jnp.asarray(z[:1]), jnp.asarray(two)),
      [np.mean(-np.log1p(-p[0, [1, 2]]))], atol=2e-6)
  g = np.asarray(jax.grad(lambda a: jnp.sum(negative_learning.negative_loss(a, negative)))(
      jnp.asarray(z)))
  assert g[0, 3] > 0 and np.all(np.isfinite(g)) and not np.any(g[1:3])


def _views_iterator(data_dir, strong_views):
  return pipeline.make_train_iterator(
      data_dir, "default", ("train_labeled",), kind="semisup", global_batch_size=8,
      image_size=32, seed=3, unlabeled_names=("train_unlabeled",), unlabeled_ratio=1,
      strong_views=strong_views, num_threads=1, process_index=0, process_count=1)


def test_second_strong_view_is_independent_and_resumes_exactly(small_dataset):
  one, two = next(_views_iterator(small_dataset, 1)), next(_views_iterator(small_dataset, 2))
  spec = pipeline.batch_spec("semisup", 8, 32, unlabeled_ratio=1, strong_views=2)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), two) == \
      jax.tree.map(lambda s: (s.shape, s.dtype), spec)
  u1, u2 = one["unlabeled"], two["unlabeled"]
  # The first strong view is the one a single-view batch has; the rest is unchanged too.
  for name in ("strong_crop", "strong_flip", "strong_u"):
    np.testing.assert_array_equal(u2[name][:, :1], u1[name])
  for name in ("image", "crop", "flip", "index", "position"):
    np.testing.assert_array_equal(u2[name], u1[name])
  assert np.mean(np.any(u2["strong_crop"][:, 0] != u2["strong_crop"][:, 1], axis=1)) > 0.9
  assert np.mean(u2["strong_u"][:, 0] != u2["strong_u"][:, 1]) > 0.99
  it = _views_iterator(small_dataset, 2)
  next(it)
  state = it.get_state()
  expected = next(it)
  again = _views_iterator(small_dataset, 2)
  again.set_state(state)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(next(again))):
    np.testing.assert_array_equal(a, b)


def test_epoch_diagnostics_report_positive_sets_and_negative_errors():
  from ssfer_jax.trainers import semisup
  counts = {k: np.zeros(3, np.int64) for k in semisup.COUNTS + semisup.LEAF_COUNTS
            + semisup.NEGATIVE_COUNTS}
  counts["seen"][:] = [10, 6, 4]
  counts["passed"][:] = [4, 0, 0]
  counts["known"][:] = [4, 0, 0]
  counts["correct"][:] = [3, 0, 0]
  counts["known_all"][:] = [8, 6, 2]
  counts["correct_all"][:] = [5, 2, 1]
  counts["positive_size"][:] = [20, 12, 8]      # 20 rows hold 40 positive classes
  counts["positive_hit"][:] = [7, 4, 1]         # 12 of the 16 known labels are in theirs
  counts["negative_rows"][:] = [5, 6, 4]        # 15 of the 20 rows take part
  counts["negative_pairs"][:] = [10, 12, 8]
  counts["negative_known"][:] = [10, 12, 0]
  counts["negative_wrong"][:] = [1, 0, 0]       # class 0 was negated once while true
  out = semisup.diagnostics(counts, np.array([0.7, 0.7, 0.7]), ["a", "b", "c"])
  assert out["positive_set_size"] == 2.0 and out["positive_set_accuracy"] == 0.75
  assert out["teacher_accuracy_unlabeled"] == 0.5
  assert out["pseudo_label_accuracy"] == 0.75 and out["negative_rows"] == 0.75
  assert out["negative_classes_per_row"] == 2.0
  assert out["negative_label_error"] == 1 / 22
  assert out["negative_label_error/a"] == 0.1 and "negative_label_error/c" not in out
