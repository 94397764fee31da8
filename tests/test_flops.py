"""Analytic FLOPs against the lowered program and XLA's own count.

Two references: (1) the matmuls of the lowered StableHLO (every dot_general, 2 x MACs)
must equal the analytic count exactly; (2) XLA's cost_analysis counts those plus the
elementwise work (norms, GELU, softmax, adds), so it may exceed the analytic count but
by little when the matmuls dominate (width 128 here: under 10%).
"""
import math
import re

import jax
import jax.numpy as jnp
import pytest

from ssfer_jax.models import flops
from ssfer_jax.models.mae import MAE
from ssfer_jax.models.vit import ViT

_DOT = re.compile(r"stablehlo\.dot_general .*contracting_dims = \[([\d, ]*)\] x .*"
                  r": \(tensor<((?:\d+x)+)\w+>, tensor<[^>]*>\) -> tensor<((?:\d+x)+)\w+>")


def _hlo_matmul_flops(text: str) -> int:
  total, count = 0, 0
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line:
      continue
    m = _DOT.search(line)
    assert m, f"unparsed dot: {line}"
    lhs = [int(d) for d in m.group(2).split("x")[:-1]]
    out = [int(d) for d in m.group(3).split("x")[:-1]]
    total += 2 * math.prod(out) * math.prod(lhs[int(c)] for c in m.group(1).split(","))
    count += 1
  assert count, "no dot_general in the program"
  return total


def _lower(model, images, rngs, **kw):
  """Lowered forward on abstract params: no init is compiled or run."""
  variables = jax.eval_shape(lambda x: model.init(rngs, x, train=False), images)
  return jax.jit(lambda v, x: model.apply(v, x, rngs=rngs, **kw)).lower(variables, images)


@pytest.mark.parametrize("leaf_experts", [0, 4])
def test_vit_forward_and_train_flops(leaf_experts):
  kw = dict(num_classes=10, width=128, depth=2, num_heads=4, mlp_dim=512,
            leaf_experts=leaf_experts)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  analytic = 2 * flops.vit_forward_flops(64, 16, 128, 2, 512, num_classes=10,
                                         leaf_experts=leaf_experts)
  lowered = _lower(ViT(**kw), images, {"params": jax.random.key(0)}, train=False)
  assert _hlo_matmul_flops(lowered.as_text()) == analytic
  xla = lowered.compile().cost_analysis()["flops"]
  assert analytic <= xla <= 1.10 * analytic, (xla, analytic)
  assert flops.vit_train_flops(kw, 64, 2) == 3 * analytic


def test_mae_forward_and_train_flops():
  kw = dict(width=128, depth=2, num_heads=4, mlp_dim=512, decoder_width=128, decoder_depth=2, decoder_heads=4)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  analytic = 2 * flops.mae_forward_flops(64, 16, 128, 2, 512, 128, 2, 512, mask_ratio=0.75)
  lowered = _lower(MAE(**kw), images, {"params": jax.random.key(0), "mask": jax.random.key(1)}, train=True)
  assert _hlo_matmul_flops(lowered.as_text()) == analytic
  xla = lowered.compile().cost_analysis()["flops"]
  assert analytic <= xla <= 1.10 * analytic, (xla, analytic)
  assert flops.mae_train_flops(kw, 64, 2) == 3 * analytic


def test_vit_b16_matches_published_count():
  # DeiT/fvcore report ViT-B/16 at 224 px as 17.6 G multiply-adds.
  assert flops.vit_forward_flops(224, 16, 768, 12, 3072) / 2 == pytest.approx(17.6e9, rel=0.01)
