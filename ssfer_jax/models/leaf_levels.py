"""LEAF's semantic and instance levels: mixtures of experts on the ViT's pooled feature.

The paper describes both levels as decoupling a face's representation into
expression-relevant and expression-agnostic components and fusing them with learnable
gating weights. Its public code (zfkarl/LEAF, ResNet-18) builds each level as a mixture of
residual MLP experts (512 -> 256 -> 512, plus the input) with a gate; nothing in it, or here,
forces any expert to be "relevant" or "agnostic": the experts are free, and the split is what
the gates may learn. Here each level is

  y = x + sum_e g_e(x) MLP_e(x),   g(x) = softmax(x W_gate)   (the gates sum to one per row)

with MLP_e: D -> D/2 -> D (ReLU). The semantic level's output, L2-normalised, is the feature
of the contrastive term; the instance level's feeds the classifier head.

Where they attach: the public code puts both levels after global average pooling, between
the 512-d feature and the linear head. The ViT's pooled feature (cls token after
`encoder_norm`, or `fc_norm` of the patch mean) takes that place; the encoder and its tokens
are unchanged, so a stage-2 classifier's weights load as they are.

Departures from the public code, and why:
  - Dense softmax gates, fused by a weighted sum, instead of noisy top-1 routing fused in
    log space. With k = 1 the public gate value is the softmax of a single logit, 1, so no
    gradient reaches its gate or noise weights; both start at zero and stay there: routing
    is random noise in training and always expert 0 in evaluation, and its load-balancing
    loss is computed and discarded. Worse, each public level repeats one module as all its
    experts, so routing changes nothing: each level is in effect one residual MLP. Here the
    experts have their own weights and the gates learn, routing the same way in training
    and evaluation.
  - Experts start at the identity (their last layer is zero), and the classification path is
    not normalised (only the contrastive feature is): stage 3 starts from a stage-2
    classifier whose head expects the pooled feature as it is, where the public model
    normalises before its instance level and trains its head from scratch. The experts
    still differ from the first step (their first layers differ), so the gates get gradients.
  - No dropout 0.5 before the semantic level (the ViT regularises with drop path).
Cost: about 2 E D^2 multiply-adds an image (0.05% of a ViT-B/16 forward at 224 px).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_boxed = nn.with_logical_partitioning


class ExpertMixture(nn.Module):
  """x [B, D] -> (x + sum_e g_e MLP_e(x) [B, D], gates [B, E])."""
  experts: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d, e, h, dt = x.shape[-1], self.experts, x.shape[-1] // 2, self.dtype
    gate = self.param("gate", _boxed(nn.initializers.zeros, ("embed", "experts")), (d, e))
    gates = jax.nn.softmax(x.astype(jnp.float32) @ gate, axis=-1)
    fan = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=1, out_axis=2,
                                           batch_axis=(0,))
    w1 = self.param("fc1_kernel", _boxed(fan, ("experts", "embed", "mlp")), (e, d, h))
    b1 = self.param("fc1_bias", _boxed(nn.initializers.zeros, ("experts", "mlp")), (e, h))
    w2 = self.param("fc2_kernel", _boxed(nn.initializers.zeros, ("experts", "mlp", "embed")),
                    (e, h, d))
    b2 = self.param("fc2_bias", _boxed(nn.initializers.zeros, ("experts", "embed")), (e, d))
    hidden = nn.relu(jnp.einsum("bd,edh->beh", x.astype(dt), w1.astype(dt)) + b1.astype(dt))
    out = jnp.einsum("beh,ehd->bed", hidden, w2.astype(dt)) + b2.astype(dt)
    fused = jnp.einsum("be,bed->bd", gates.astype(dt), out)
    return (x + fused).astype(x.dtype), gates


class Levels(nn.Module):
  """pooled feature [B, D] -> (instance-level feature for the head, L2-normalised
  semantic-level feature for the contrastive term, {"semantic": gates, "instance": gates})."""
  experts: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    semantic, g_sem = ExpertMixture(self.experts, self.dtype, name="semantic")(x)
    feature = semantic.astype(jnp.float32)
    feature = feature / jnp.maximum(jnp.linalg.norm(feature, axis=-1, keepdims=True), 1e-12)
    instance, g_ins = ExpertMixture(self.experts, self.dtype, name="instance")(semantic)
    return instance, feature, {"semantic": g_sem, "instance": g_ins}


def gate_entropy(gates: jax.Array) -> jax.Array:
  """Mean per-row entropy of gates [B, E] in nats: log E when uniform, 0 when one expert."""
  g = gates.astype(jnp.float32)
  return -jnp.mean(jnp.sum(g * jnp.log(jnp.maximum(g, 1e-12)), axis=-1))
