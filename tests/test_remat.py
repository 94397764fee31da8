"""Rematerialisation (vit.Encoder's remat): it saves memory on the compiler the figures come
from (XLA:CPU, 8 simulated devices) and changes no number."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssfer_jax.models.vit import REMAT_POLICIES, ViT
from ssfer_jax.runtime import sharding

# Compiled only: 257 tokens of width 32, whose activations dwarf the parameters.
BIG = dict(num_classes=3, width=32, depth=4, num_heads=2, mlp_dim=128, patch_size=4)
BIG_DATA = (16, 64)   # batch (2 a device), image size
# Run: 17 tokens, 3 blocks (a scan of 2, then the last block), drop path on.
SMALL = dict(num_classes=3, width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=4,
             drop_path_rate=0.2)
SMALL_DATA = (4, 16)


def _data(batch: int, size: int):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, 3))
  return x, jnp.arange(batch) % 3


def _params(kwargs: dict, x):
  model = ViT(**kwargs)
  return nn.unbox(model.init({"params": jax.random.key(1)}, x[:1], train=False))["params"]


def _loss_fn(kwargs: dict, remat: bool, policy: str = "nothing"):
  model = ViT(**kwargs, remat=remat, remat_policy=policy)

  def loss(params, x, labels):
    logits = model.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(3)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  return jax.value_and_grad(loss)


def _temp_bytes(remat: bool) -> int:
  mesh = sharding.make_mesh((8, 1))
  x, labels = _data(*BIG_DATA)
  params = jax.eval_shape(lambda x: _params(BIG, x), x)
  step = jax.jit(_loss_fn(BIG, remat), in_shardings=(
      sharding.replicated(mesh), sharding.batch_sharding(mesh), sharding.batch_sharding(mesh)))
  compiled = step.lower(params, jax.ShapeDtypeStruct(x.shape, x.dtype),
                        jax.ShapeDtypeStruct(labels.shape, labels.dtype)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_remat_cuts_the_compiled_temporaries():
  """Unrolled `nn.remat` blocks compiled to the same temporaries as no remat (XLA:CPU drops
  the CSE barriers, then CSE merges the recomputation into the forward pass)."""
  plain, remat = _temp_bytes(False), _temp_bytes(True)
  assert remat < 0.6 * plain, (remat, plain)


@pytest.fixture(scope="module")
def without_remat():
  x, labels = _data(*SMALL_DATA)
  params = _params(SMALL, x)
  return (params, x, labels), jax.jit(_loss_fn(SMALL, False))(params, x, labels)


@pytest.mark.parametrize("policy", sorted(REMAT_POLICIES))
def test_remat_same_loss_and_grad_with_drop_path(policy, without_remat):
  args, (l0, g0) = without_remat
  l1, g1 = jax.jit(_loss_fn(SMALL, True, policy))(*args)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g0, g1)


def test_unknown_remat_policy_is_named():
  x, _ = _data(*SMALL_DATA)
  with pytest.raises(ValueError, match="remat_policy must be one of .*'dots'.*got 'dot'"):
    ViT(**SMALL, remat=True, remat_policy="dot").apply({"params": _params(SMALL, x)}, x,
                                                       train=False)
