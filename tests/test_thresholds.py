"""Pseudo-label thresholds: each policy against a NumPy transcription of its rule (USB's hooks
for FlexMatch and FreeMatch) over several steps of random confidences, FlexMatch's repeated
records, DTM's class without a correct prediction, FreeMatch's two starts, the fairness loss,
and that everything runs under jit (and sharded, for FlexMatch's scatter)."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ssfer_jax.methods import thresholds

C = 7
STEP = jax.jit(thresholds.mask_and_update, static_argnums=0)


def dirichlet(rng, n, alpha, c=C):
  return rng.dirichlet(np.full(c, alpha), n).astype(np.float32)


def np_flexmatch(selected, acc, probs, idx, p_cutoff, warmup):
  """USB FlexMatchThresholdingHook.masking + update, line by line (Python's sequential
  assignment: the last confident occurrence of a record wins)."""
  max_probs, max_idx = probs.max(-1), probs.argmax(-1)
  mask = (max_probs >= p_cutoff * (acc[max_idx] / (2.0 - acc[max_idx]))).astype(np.float32)
  selected, acc = selected.copy(), acc.copy()
  for i in np.flatnonzero(max_probs >= p_cutoff):
    selected[idx[i]] = max_idx[i]
  counter = Counter(selected.tolist())
  if max(counter.values()) < len(selected):
    if warmup:
      for i in range(len(acc)):
        acc[i] = counter[i] / max(counter.values())
    else:
      wo_negative_one = {k: v for k, v in counter.items() if k != -1}
      for i in range(len(acc)):
        acc[i] = counter[i] / max(wo_negative_one.values())
  return mask, selected, acc


def np_freematch(time_p, p_model, label_hist, probs, m):
  """USB FreeMatchThresholingHook.masking: update with the batch, then mask."""
  max_probs, max_idx = probs.max(-1), probs.argmax(-1)
  time_p = time_p * m + (1 - m) * max_probs.mean()
  p_model = p_model * m + (1 - m) * probs.mean(0)
  hist = np.bincount(max_idx, minlength=probs.shape[1]).astype(np.float64)
  label_hist = label_hist * m + (1 - m) * hist / hist.sum()
  mod = p_model / p_model.max()
  mask = (max_probs >= time_p * mod[max_idx]).astype(np.float32)
  return mask, time_p, p_model, label_hist


def np_dtm(tau, probs, labels):
  """DTM per class; a class without a correct labeled prediction is reset to 0.8."""
  pred, conf = probs.argmax(-1), probs.max(-1)
  new = tau.copy()
  for c in range(len(tau)):
    right = (labels == c) & (pred == c)
    if not right.any():
      new[c] = 0.8
      continue
    m = conf[right].mean()
    new[c] = 0.9 * tau[c] + 0.1 * m if m >= 0.8 else 0.8
  return new


def np_entropy_loss(mask, probs_s, p_model, label_hist):
  """USB freematch.entropy_loss on probabilities (it takes logits and softmaxes them)."""
  probs_s = probs_s[mask.astype(bool)].astype(np.float64)
  hist_s = np.bincount(probs_s.argmax(-1), minlength=probs_s.shape[1]).astype(np.float64)
  hist_s = hist_s / hist_s.sum()
  with np.errstate(divide="ignore"):
    scaler = 1 / label_hist
    mean_scaler = 1 / hist_s
  scaler[np.isinf(scaler)] = 0.0
  mean_scaler[np.isinf(mean_scaler)] = 0.0
  mod_prob_model = p_model * scaler
  mod_prob_model = mod_prob_model / mod_prob_model.sum()
  mod_mean_prob_s = probs_s.mean(0) * mean_scaler
  mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum()
  return float((mod_prob_model * np.log(mod_mean_prob_s + 1e-12)).sum())


def test_policy_and_state_layout():
  with pytest.raises(ValueError, match="unknown threshold policy"):
    thresholds.Policy("softmatch")
  with pytest.raises(ValueError, match="unknown FreeMatch init"):
    thresholds.Policy("freematch", init="zeros")
  expected = {
      "fixed": {},
      "dtm": {"tau": ((C,), jnp.float32)},
      "flexmatch": {"selected_label": ((50,), jnp.int32), "classwise_acc": ((C,), jnp.float32)},
      "freematch": {"time_p": ((), jnp.float32), "p_model": ((C,), jnp.float32),
                    "label_hist": ((C,), jnp.float32)},
  }
  for kind, layout in expected.items():
    state = thresholds.init_state(thresholds.Policy(kind), C, 50)
    assert {k: (v.shape, v.dtype) for k, v in state.items()} == layout
  np.testing.assert_array_equal(thresholds.init_state(thresholds.Policy("dtm"), C, 50)["tau"],
                                np.full(C, 0.8, np.float32))


def test_fixed_threshold():
  policy = thresholds.Policy("fixed", tau=0.7)
  rng = np.random.default_rng(0)
  state = thresholds.init_state(policy, C, 10)
  for _ in range(5):
    probs = dirichlet(rng, 16, 0.3)
    mask, thr, state = STEP(policy, state, jnp.asarray(probs), jnp.zeros(16, jnp.int32))
    np.testing.assert_array_equal(mask, (probs.max(-1) >= np.float32(0.7)).astype(np.float32))
    np.testing.assert_array_equal(thr, np.full(C, 0.7, np.float32))
  assert state == {}


@pytest.mark.parametrize("warmup", [True, False])
def test_flexmatch_matches_usb_over_a_stream(warmup):
  policy = thresholds.Policy("flexmatch", p_cutoff=0.95, thresh_warmup=warmup)
  n, b = 12, 16
  rng = np.random.default_rng(1)
  state = thresholds.init_state(policy, C, n)
  selected, acc = np.full(n, -1, np.int64), np.zeros(C, np.float32)
  conflicts = 0
  for _ in range(8):
    probs = dirichlet(rng, b, 0.15)
    idx = rng.integers(0, n, b)   # 16 draws from 12 records: repeats in every batch
    confident = probs.max(-1) >= 0.95
    conflicts += sum(len(set(probs[(idx == r) & confident].argmax(-1).tolist())) > 1
                     for r in range(n))
    used = 0.95 * (acc / (2 - acc))   # the mask uses beta from before this batch
    want_mask, selected, acc = np_flexmatch(selected, acc, probs, idx, 0.95, warmup)
    mask, thr, state = STEP(policy, state, jnp.asarray(probs), jnp.asarray(idx, jnp.int32))
    np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_allclose(thr, used, rtol=1e-6)
    np.testing.assert_array_equal(state["selected_label"], selected)
    np.testing.assert_allclose(state["classwise_acc"], acc, rtol=1e-6)
  assert conflicts > 0, "the stream never wrote one record twice with different classes"
  assert 0 < (selected >= 0).sum() < n and 0 < acc.max()


def test_flexmatch_masks_before_it_updates():
  policy = thresholds.Policy("flexmatch")
  state = thresholds.init_state(policy, C, 20)
  probs = jnp.asarray(dirichlet(np.random.default_rng(2), 8, 0.3))
  mask, thr, new = STEP(policy, state, probs, jnp.arange(8, dtype=jnp.int32))
  # beta starts at 0 (threshold 0): everything passes at the first step, as in USB.
  np.testing.assert_array_equal(mask, np.ones(8, np.float32))
  np.testing.assert_array_equal(thr, np.zeros(C, np.float32))
  np.testing.assert_array_equal(thresholds.mask(policy, state, probs)[0], mask)


def test_flexmatch_repeated_records_last_confident_row_wins():
  policy = thresholds.Policy("flexmatch", p_cutoff=0.95)
  n, b = 10, 16
  probs = np.full((b, C), 0.01 / (C - 1), np.float32)
  confident = {0: 0, 1: 2, 2: 4, 5: 6, 9: 1, 12: 3, 15: 5}   # row -> class (p 0.99)
  for row, c in confident.items():
    probs[row, c] = 0.99
  for row in set(range(b)) - set(confident):
    probs[row] = np.full(C, 1.0 / C, np.float32)            # not confident: writes nothing
  idx = np.array([3, 1, 3, 3, 7, 7, 0, 0, 0, 8, 2, 2, 8, 4, 4, 8], np.int32)
  # record 3: rows 0, 2 confident (2 last) and row 3 not -> class 4; record 7: row 5 -> 6;
  # record 1: row 1 -> 2; record 8: rows 9, 12 confident, row 15 confident last -> 5.
  want = np.full(n, -1)
  want[[3, 7, 1, 8]] = [4, 6, 2, 5]
  # XLA leaves the order of duplicate scatter indices unspecified (CPU happens to go in
  # order): the scatter gets one writer per record, the last confident row.
  writers = thresholds._last_writes(jnp.asarray(idx), jnp.asarray(probs.max(-1) >= 0.95))
  np.testing.assert_array_equal(np.flatnonzero(writers), [1, 2, 5, 15])
  state = thresholds.init_state(policy, C, n)
  eager = thresholds.update(policy, state, jnp.asarray(probs), jnp.asarray(idx))
  np.testing.assert_array_equal(eager["selected_label"], want)
  np.testing.assert_array_equal(np_flexmatch(np.full(n, -1), np.zeros(C, np.float32), probs,
                                             idx, 0.95, True)[1], want)
  # Sharded over the 8 simulated devices: the same result, however the batch is split.
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  rows = NamedSharding(mesh, P("data"))
  sharded = jax.jit(thresholds.update, static_argnums=0)(
      policy, state, jax.device_put(jnp.asarray(probs), rows),
      jax.device_put(jnp.asarray(idx), rows))
  np.testing.assert_array_equal(sharded["selected_label"], want)
  np.testing.assert_array_equal(sharded["classwise_acc"], eager["classwise_acc"])


def test_flexmatch_keeps_beta_while_all_records_share_one_status():
  policy = thresholds.Policy("flexmatch", p_cutoff=0.95)
  state = {"selected_label": jnp.array([-1, -1], jnp.int32),
           "classwise_acc": jnp.full((C,), 0.5, jnp.float32)}
  probs = np.full((2, C), 0.01 / (C - 1), np.float32)
  probs[:, 3] = 0.99
  new = thresholds.update(policy, state, jnp.asarray(probs), jnp.array([0, 1], jnp.int32))
  np.testing.assert_array_equal(new["selected_label"], [3, 3])
  np.testing.assert_array_equal(new["classwise_acc"], state["classwise_acc"])   # USB: no update


# USB's momentum moves the state by 0.1% a step; 0.7 makes each step's order and terms show.
@pytest.mark.parametrize("init,momentum", [("uniform", 0.999), ("ones", 0.999), ("uniform", 0.7),
                                           ("ones", 0.7)])
def test_freematch_matches_usb_over_a_stream(init, momentum):
  policy = thresholds.Policy("freematch", init=init, momentum=momentum)
  rng = np.random.default_rng(3)
  state = thresholds.init_state(policy, C, 0)
  start = 1.0 / C if init == "uniform" else 1.0
  time_p, p_model, label_hist = start, np.full(C, start), np.full(C, start)
  passed = 0
  for _ in range(10):
    probs = dirichlet(rng, 32, 0.3)
    want, time_p, p_model, label_hist = np_freematch(time_p, p_model, label_hist, probs,
                                                     momentum)
    mask, thr, state = STEP(policy, state, jnp.asarray(probs), jnp.zeros(32, jnp.int32))
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_allclose(state["time_p"], time_p, rtol=1e-5)
    np.testing.assert_allclose(state["p_model"], p_model, rtol=1e-5)
    np.testing.assert_allclose(state["label_hist"], label_hist, rtol=1e-5)
    np.testing.assert_allclose(thr, time_p * p_model / p_model.max(), rtol=1e-5)
    passed += want.sum()
  if momentum < 0.9:
    assert 0 < passed < 10 * 32


def test_freematch_first_step_depends_on_the_start():
  probs = jnp.asarray(dirichlet(np.random.default_rng(4), 64, 1.0))
  uniform = thresholds.Policy("freematch", init="uniform")
  ones = thresholds.Policy("freematch", init="ones")
  mask_u, thr_u, _ = STEP(uniform, thresholds.init_state(uniform, C, 0), probs, None)
  mask_o, thr_o, _ = STEP(ones, thresholds.init_state(ones, C, 0), probs, None)
  assert float(mask_u.min()) == 1.0 and float(thr_u.max()) < 1.0 / C + 1e-3   # all pass
  assert float(mask_o.max()) == 0.0 and float(thr_o.min()) > 0.998            # none pass


def test_freematch_fairness_loss_matches_usb():
  policy = thresholds.Policy("freematch")
  rng = np.random.default_rng(5)
  state = thresholds.init_state(policy, C, 0)
  for _ in range(5):
    state = thresholds.update(policy, state, jnp.asarray(dirichlet(rng, 32, 0.3)))
  crafted = {"time_p": jnp.float32(0.5), "p_model": jnp.asarray(dirichlet(rng, 1, 1.0)[0]),
             "label_hist": jnp.array([0.3, 0.0, 0.2, 0.1, 0.0, 0.25, 0.15], jnp.float32)}
  loss_fn = jax.jit(thresholds.freematch_fairness_loss)
  for st in (state, crafted):
    for _ in range(3):
      strong = dirichlet(rng, 32, 0.5)
      mask = (rng.random(32) < 0.3).astype(np.float32)   # some classes without a masked argmax
      want = np_entropy_loss(mask, strong, np.asarray(st["p_model"], np.float64),
                             np.asarray(st["label_hist"], np.float64))
      np.testing.assert_allclose(loss_fn(st, jnp.asarray(strong), jnp.asarray(mask)), want,
                                 rtol=1e-4)


def test_freematch_fairness_loss_is_zero_on_an_empty_mask():
  policy = thresholds.Policy("freematch")
  state = thresholds.init_state(policy, C, 0)
  strong = jnp.asarray(dirichlet(np.random.default_rng(6), 16, 0.5))
  empty = jnp.zeros(16)
  loss, grad = jax.jit(jax.value_and_grad(thresholds.freematch_fairness_loss, argnums=1))(
      state, strong, empty)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((16, C), np.float32))   # finite, no NaN
  # Two masked rows predicting different classes (one row alone makes Q one-hot: constant).
  rows = np.array([0, 1])
  assert strong[0].argmax() != strong[1].argmax()
  grad = jax.grad(thresholds.freematch_fairness_loss, argnums=1)(state, strong,
                                                                 empty.at[rows].set(1))
  assert np.isfinite(grad).all() and np.abs(grad[rows]).sum() > 0
  assert np.abs(np.delete(np.asarray(grad), rows, axis=0)).sum() == 0


def test_dtm_matches_the_rule_over_epochs():
  policy = thresholds.Policy("dtm")
  rng = np.random.default_rng(7)
  state = thresholds.init_state(policy, C, 0)
  tau = np.full(C, 0.8)
  epoch_update = jax.jit(thresholds.dtm_epoch_update)
  raised = False
  for epoch in range(6):
    labels = rng.integers(0, C - 1, 60)          # class C-1 never labelled: stays at 0.8
    probs = dirichlet(rng, 60, 0.5)
    sharp = rng.random(60) < 0.2 + 0.15 * epoch  # the teacher grows confident on its labels
    probs[sharp] = 0.005 / (C - 1)
    probs[sharp, labels[sharp]] = 0.995 - 0.1 * rng.random(sharp.sum())
    probs /= probs.sum(-1, keepdims=True)
    tau = np_dtm(tau, probs, labels)
    state = epoch_update(state, jnp.asarray(probs), jnp.asarray(labels, jnp.int32))
    np.testing.assert_allclose(state["tau"], tau, rtol=1e-6)
    raised |= bool((tau > 0.8).any())
    unlabeled = dirichlet(rng, 32, 0.2)
    mask, thr, _ = STEP(policy, state, jnp.asarray(unlabeled), None)
    np.testing.assert_allclose(thr, tau, rtol=1e-6)
    want = unlabeled.max(-1) >= np.asarray(state["tau"])[unlabeled.argmax(-1)]
    np.testing.assert_array_equal(mask, want.astype(np.float32))
  assert raised and tau[C - 1] == 0.8


def test_dtm_class_without_a_correct_prediction_resets_to_base():
  state = {"tau": jnp.array([0.9, 0.95, 0.85], jnp.float32)}
  sure = lambda c, p: np.eye(3, dtype=np.float32)[c] * (p - (1 - p) / 2) + (1 - p) / 2
  probs = np.stack([sure(0, 0.9), sure(0, 0.96),   # class 0: right, m = 0.93
                    sure(0, 0.99),                  # class 1: wrong (predicted 0)
                    sure(1, 0.99)])                 # pad row (label -1): ignored
  labels = np.array([0, 0, 1, -1])                  # class 2: no row at all
  new = thresholds.dtm_epoch_update(state, jnp.asarray(probs), jnp.asarray(labels))
  np.testing.assert_allclose(new["tau"], [0.9 * 0.9 + 0.1 * 0.93, 0.8, 0.8], rtol=1e-6)
  np.testing.assert_allclose(new["tau"], np_dtm(np.array([0.9, 0.95, 0.85]), probs[:3], labels[:3]),
                             rtol=1e-6)
  # m_c below 0.8 also resets, a raised threshold included.
  low = thresholds.dtm_epoch_update(state, jnp.asarray(np.stack([sure(0, 0.7)])), jnp.array([0]))
  np.testing.assert_allclose(low["tau"], [0.8, 0.8, 0.8])


@pytest.mark.parametrize("kind", thresholds.POLICIES)
def test_jit_equals_eager(kind):
  policy = thresholds.Policy(kind)
  rng = np.random.default_rng(8)
  state = thresholds.init_state(policy, C, 24)
  probs = jnp.asarray(dirichlet(rng, 16, 0.15))
  idx = jnp.asarray(rng.integers(0, 24, 16), jnp.int32)
  for fn in (thresholds.mask, thresholds.update, thresholds.mask_and_update):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(fn, static_argnums=0)(policy, state, probs, idx),
                 fn(policy, state, probs, idx))
  if kind == "dtm":
    labels = jnp.asarray(rng.integers(0, C, 16), jnp.int32)
    jax.tree.map(np.testing.assert_array_equal,
                 jax.jit(thresholds.dtm_epoch_update)(state, probs, labels),
                 thresholds.dtm_epoch_update(state, probs, labels))
