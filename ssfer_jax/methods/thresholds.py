"""Confidence thresholds for pseudo-labels (SSFER stage 3): fixed, DTM, FlexMatch, FreeMatch.

The teacher labels an unlabeled face with its argmax when its top probability clears a
threshold; the policies differ in how that threshold moves. Each is pure functions on an
explicit state, a dict of jnp arrays of static shapes (replicated by the trainer, saved by
orbax in `TrainState.extra`):

  init_state(policy, num_classes, num_unlabeled) -> state
  mask(policy, state, probs, indices) -> (mask float [B], thresholds [C], for logging)
  update(policy, state, probs, indices) -> state          (in the jitted step)
  mask_and_update(policy, state, probs, indices) -> (mask, thresholds, state)
  dtm_epoch_update(state, teacher_probs, labels) -> state (DTM, once per epoch)
  freematch_fairness_loss(state, strong_probs, mask) -> scalar

`probs` is the teacher's softmax over the weak views of the *global* batch [B, C] (every
device must see the same statistics); `indices` the rows' positions in the unlabeled list,
0..num_unlabeled-1 (only FlexMatch reads them; the batch's `index` field holds record
indices: map them with a searchsorted over the sorted split). `mask_and_update` keeps USB's
order, which differs per policy: FlexMatch masks with the state of the previous step and
then updates, FreeMatch updates with the batch first and masks with the result.

FlexMatch and FreeMatch are transcribed from USB (microsoft/Semi-supervised-learning at
1ef4cbe, 2025-09-24; the logic is that of the semilearn 0.3.2 release, a8ec1d7, later
commits only renamed a class): semilearn/algorithms/flexmatch/utils.py
(FlexMatchThresholdingHook), semilearn/algorithms/freematch/utils.py
(FreeMatchThresholingHook) and freematch.py (entropy_loss). Not transcribed: FreeMatch's
`use_quantile` and `clip_thresh` (both off in USB) and FlexMatch's other threshold mappings
(commented out in USB).

DTM (Yu et al., arXiv 2303.08617) keeps one threshold per class, raised once per epoch by
how confident the teacher is where it is right on the labeled set (docs/REFERENCE.md section 3).
A class without a single correct labeled prediction has no evidence for a raised threshold:
it is reset to the base 0.8, as a class whose confidence falls below 0.8 is (an empty mean
counts as 0). Keeping the old value instead would hold a threshold raised by evidence that
no longer exists, and only the base is known to be what the rule starts from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

POLICIES = ("fixed", "dtm", "flexmatch", "freematch")
FREEMATCH_INITS = ("uniform", "ones")

DTM_BASE = 0.8       # DTM's starting threshold and floor
DTM_MOMENTUM = 0.9   # tau_c <- 0.9 tau_c + 0.1 m_c


@dataclasses.dataclass(frozen=True)
class Policy:
  """A threshold policy and its constants (frozen, hence hashable: a static jit argument).

  FreeMatch's `init` sets where tau, p~ and h~ start. "uniform" (1/C, the default) is the
  FreeMatch paper's and USB's since 9a24e00 (2023-04-16; semilearn 0.3.1, 0.3.2, master):
  the threshold starts at 1/C, so at first nearly every prediction passes and tau rises
  towards the mean confidence. "ones" is USB's of early 2023 (7429eee, semilearn 0.3.0,
  and again c9709aa until 9a24e00; docs/REFERENCE.md's note describes it): tau starts at 1 and
  decays towards the mean confidence c as c + (1 - c) 0.999^t, so nothing passes at first
  and a face of confidence x > c passes only after log((x - c)/(1 - c)) / log(0.999)
  steps: ~690 for x = 0.9 when c = 0.8. On a short run this decides whether any unlabeled
  face is used at all.
  """
  kind: str = "fixed"
  tau: float = 0.7             # fixed: the threshold (the published SSFER code's 0.7)
  p_cutoff: float = 0.95       # flexmatch: the threshold of a fully learned class
  thresh_warmup: bool = True   # flexmatch: unused records count in the normaliser (USB)
  momentum: float = 0.999      # freematch: EMA momentum (USB's ema_p)
  init: str = "uniform"        # freematch: "uniform" (1/C) or "ones"; see above

  def __post_init__(self):
    if self.kind not in POLICIES:
      raise ValueError(f"unknown threshold policy {self.kind!r}; use one of {POLICIES}")
    if self.init not in FREEMATCH_INITS:
      raise ValueError(f"unknown FreeMatch init {self.init!r}; use one of {FREEMATCH_INITS}")


def _confidence(probs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Top probability and class per row; no gradient (USB detaches the weak-view probs)."""
  probs = jax.lax.stop_gradient(probs.astype(jnp.float32))
  return jnp.max(probs, axis=-1), jnp.argmax(probs, axis=-1)


def init_state(policy: Policy, num_classes: int, num_unlabeled: int) -> dict[str, jax.Array]:
  """The policy's state before the first step ({} for a fixed threshold)."""
  if policy.kind == "fixed":
    return {}
  if policy.kind == "dtm":
    return {"tau": jnp.full((num_classes,), DTM_BASE, jnp.float32)}
  if policy.kind == "flexmatch":
    # -1: no confident prediction yet. classwise_acc starts at 0: threshold 0, all pass.
    return {"selected_label": jnp.full((num_unlabeled,), -1, jnp.int32),
            "classwise_acc": jnp.zeros((num_classes,), jnp.float32)}
  start = 1.0 / num_classes if policy.init == "uniform" else 1.0
  # Separate buffers: a donated state must not hold one buffer twice.
  return {"time_p": jnp.asarray(start, jnp.float32),
          "p_model": jnp.full((num_classes,), start, jnp.float32),
          "label_hist": jnp.full((num_classes,), start, jnp.float32)}


def class_thresholds(policy: Policy, state: dict[str, jax.Array], num_classes: int) -> jax.Array:
  """The threshold each predicted class must clear now [C]."""
  if policy.kind == "fixed":
    return jnp.full((num_classes,), policy.tau, jnp.float32)
  if policy.kind == "dtm":
    return state["tau"]
  if policy.kind == "flexmatch":
    beta = state["classwise_acc"]
    return policy.p_cutoff * (beta / (2.0 - beta))   # USB's "convex" mapping
  return state["time_p"] * state["p_model"] / jnp.max(state["p_model"])


def mask(policy: Policy, state: dict[str, jax.Array], probs: jax.Array,
         indices: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """mask [B] (1.0 where max p >= the threshold of the argmax class) and the thresholds [C]."""
  del indices  # the thresholds are per class; FlexMatch reads indices only to update
  max_probs, pred = _confidence(probs)
  thresholds = class_thresholds(policy, state, probs.shape[-1])
  return (max_probs >= thresholds[pred]).astype(jnp.float32), thresholds


def _last_writes(indices: jax.Array, write: jax.Array) -> jax.Array:
  """Rows that write and are not followed by a writing row with the same index.

  Makes a scatter deterministic without relying on XLA's order for duplicate indices (which
  is unspecified): the last writer in batch order wins, as USB's sequential assignment on
  CPU. Costs a [B, B] comparison, nothing next to the forward pass.
  """
  rows = jnp.arange(indices.shape[0])
  overwritten = jnp.any((indices[:, None] == indices[None, :]) & (rows[None, :] > rows[:, None])
                        & write[None, :], axis=1)
  return write & ~overwritten


def _flexmatch_update(policy: Policy, state: dict[str, jax.Array], probs: jax.Array,
                      indices: jax.Array) -> dict[str, jax.Array]:
  """USB's FlexMatchThresholdingHook: record confident predictions, then re-normalise counts."""
  max_probs, pred = _confidence(probs)
  old = state["selected_label"]
  num_unlabeled = old.shape[0]
  write = _last_writes(indices, max_probs >= policy.p_cutoff)
  target = jnp.where(write, indices, num_unlabeled)   # out of range: dropped
  selected = old.at[target].set(pred.astype(old.dtype), mode="drop")
  counts = jnp.bincount(selected + 1, length=probs.shape[-1] + 1)   # [unused, class 0, ...]
  per_class = counts[1:]
  # Warm-up: the unused records join the normaliser, so beta rises from 0 while they dominate.
  top = jnp.max(counts) if policy.thresh_warmup else jnp.max(per_class)
  acc = per_class.astype(jnp.float32) / jnp.maximum(top, 1)
  # USB leaves beta unchanged while all records share one status (e.g. all unused).
  acc = jnp.where(jnp.max(counts) < num_unlabeled, acc, state["classwise_acc"])
  return {"selected_label": selected, "classwise_acc": acc}


def _freematch_update(policy: Policy, state: dict[str, jax.Array],
                      probs: jax.Array) -> dict[str, jax.Array]:
  """USB's FreeMatchThresholingHook.update: EMAs of the mean confidence, the mean
  probability per class and the histogram of predicted classes."""
  m = policy.momentum
  max_probs, pred = _confidence(probs)
  mean_probs = jnp.mean(jax.lax.stop_gradient(probs.astype(jnp.float32)), axis=0)
  hist = jnp.bincount(pred, length=probs.shape[-1]).astype(jnp.float32)
  return {"time_p": m * state["time_p"] + (1 - m) * jnp.mean(max_probs),
          "p_model": m * state["p_model"] + (1 - m) * mean_probs,
          "label_hist": m * state["label_hist"] + (1 - m) * hist / jnp.sum(hist)}


def update(policy: Policy, state: dict[str, jax.Array], probs: jax.Array,
           indices: jax.Array | None = None) -> dict[str, jax.Array]:
  """The state after one batch; fixed and DTM do not change within an epoch."""
  if policy.kind == "flexmatch":
    return _flexmatch_update(policy, state, probs, indices)
  if policy.kind == "freematch":
    return _freematch_update(policy, state, probs)
  return state


def mask_and_update(policy: Policy, state: dict[str, jax.Array], probs: jax.Array,
                    indices: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """One step in USB's order: FreeMatch masks with the state that includes this batch,
  the others with the state before it."""
  if policy.kind == "freematch":
    state = update(policy, state, probs, indices)
    return *mask(policy, state, probs, indices), state
  return *mask(policy, state, probs, indices), update(policy, state, probs, indices)


def dtm_epoch_update(state: dict[str, jax.Array], teacher_probs: jax.Array,
                     labels: jax.Array) -> dict[str, jax.Array]:
  """DTM once per epoch from the teacher's softmax over train_labeled [N, C] and its labels [N].

  m_c = mean top probability over the rows of class c the teacher gets right;
  tau_c <- 0.9 tau_c + 0.1 m_c if m_c >= 0.8, else 0.8 (also when class c has no correct
  row: see the module docstring). Rows with a negative label (padding, unlabeled) are ignored.
  """
  max_probs, pred = _confidence(teacher_probs)
  num_classes = teacher_probs.shape[-1]
  right = jax.nn.one_hot(labels, num_classes) * (pred == labels)[:, None]   # [N, C]
  count = jnp.sum(right, axis=0)
  m = jnp.sum(right * max_probs[:, None], axis=0) / jnp.maximum(count, 1)  # 0 where empty
  tau = state["tau"]
  return {"tau": jnp.where(m >= DTM_BASE, DTM_MOMENTUM * tau + (1 - DTM_MOMENTUM) * m,
                           DTM_BASE).astype(tau.dtype)}


def _safe_reciprocal(x: jax.Array) -> jax.Array:
  """1/x, 0 where x == 0 (USB's replace_inf_to_zero), without NaN gradients."""
  nonzero = x != 0
  return jnp.where(nonzero, 1.0 / jnp.where(nonzero, x, 1.0), 0.0)


def freematch_fairness_loss(state: dict[str, jax.Array], strong_probs: jax.Array,
                            mask: jax.Array) -> jax.Array:
  """USB's FreeMatch `entropy_loss` (the caller weighs it, 0.01 in USB), 0 on an empty mask.

  sum_c P_c log(Q_c + 1e-12) with P = SumNorm(p~ / h~) from the state after this batch's
  update and Q = SumNorm(mean / hist) over the masked rows of the student's strong-view
  softmax `strong_probs` [B, C] (hist: their argmax histogram, normalised; a class with no
  masked argmax gets 0). This is minus a cross entropy and USB adds it with a + sign, so
  training raises the cross entropy, spreading the mean prediction (intended: USB issue
  #182). Gradients reach only `strong_probs`.
  """
  strong_probs = strong_probs.astype(jnp.float32)
  num_classes = strong_probs.shape[-1]
  selected = jax.lax.stop_gradient(mask.astype(jnp.float32))
  count = jnp.sum(selected)
  norm = jnp.maximum(count, 1.0)
  pred = jnp.argmax(jax.lax.stop_gradient(strong_probs), axis=-1)
  hist = jnp.sum(jax.nn.one_hot(pred, num_classes) * selected[:, None], axis=0) / norm
  mean_probs = jnp.sum(strong_probs * selected[:, None], axis=0) / norm
  mod_mean = mean_probs * _safe_reciprocal(hist)
  total = jnp.sum(mod_mean)   # 0 only on an empty mask
  mod_mean = mod_mean / jnp.where(total > 0, total, 1.0)
  p_model = jax.lax.stop_gradient(state["p_model"] * _safe_reciprocal(state["label_hist"]))
  p_model = p_model / jnp.sum(p_model)
  loss = jnp.sum(p_model * jnp.log(mod_mean + 1e-12))
  return jnp.where(count > 0, loss, 0.0)
