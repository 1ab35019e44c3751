"""Model zoo: output shapes, parameter counts against the known figures.

Initialisation uses "unsafe_rbg" keys: XLA:CPU compiles threefry random
numbers slowly (about 0.1 s per initializer), which would dominate these tests.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharpjax import models


def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _count(model, shape):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
  return models.param_count(shapes)


@pytest.mark.parametrize(
    "model, shape, expected",
    [
        # 41*100 + 101*100 + 101*10.
        (models.MLP(features=(100, 100)), (2, 40), 15_210),
        # (1*5+1)*25 + 2*(25*3+1)*25 + (125+1)*10, MNIST-1D's "about 5K".
        (models.CNN1D(), (2, 40), 5_210),
        # The widely quoted CIFAR ResNet-18 figure.
        (models.ResNet18(num_classes=10), (1, 32, 32, 3), 11_173_962),
        (models.ResNet18(num_classes=100), (1, 32, 32, 3), 11_220_132),
        # WRN-28-10, the "36.5M" of the WideResNet paper.
        (models.WideResNet(), (1, 32, 32, 3), 36_479_194),
        (models.WideResNet(depth=16, widen_factor=8), (1, 32, 32, 3),
         10_961_370),
        # ResNet-50 and ViT-S/16 (the recipes' ImageNet models): the figures
        # of torchvision's resnet50 and timm's vit_small_patch16_224.
        (models.ResNet50(num_classes=1000), (1, 224, 224, 3), 25_557_032),
        (models.ViT(num_classes=1000, patch_size=16, hidden_size=384,
                    depth=12, num_heads=6, mlp_dim=1536), (1, 224, 224, 3),
         22_050_664),
    ],
)
def test_parameter_counts(model, shape, expected):
  assert _count(model, shape) == expected


def test_vit_parameter_count_matches_formula():
  d, m, depth, p, c, tokens = 192, 384, 6, 4, 10, (32 // 4) ** 2 + 1
  per_block = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
  expected = (p * p * 3 * d + d) + d + tokens * d + depth * per_block + 2 * d \
      + d * c + c
  assert _count(models.ViT(), (1, 32, 32, 3)) == expected == 1_806_538


@pytest.mark.parametrize(
    "model, shape",
    [
        (models.MLP(features=(8,), num_classes=3, dropout_rate=0.5), (4, 40)),
        (models.CNN1D(num_classes=3, channels=4), (4, 40)),
        (models.CNN1D(num_classes=3, channels=4), (4, 40, 1)),
        (models.ResNet(stage_sizes=(1, 1), width=4, num_classes=3),
         (4, 16, 16, 3)),
        (models.ImageNetResNet(stage_sizes=(1, 1), width=4, num_classes=3),
         (4, 32, 32, 3)),
        (models.WideResNet(depth=10, widen_factor=1, num_classes=3,
                           dropout_rate=0.3), (4, 16, 16, 3)),
        (models.ViT(num_classes=3, patch_size=4, hidden_size=16, depth=1,
                    num_heads=2, mlp_dim=32, dropout_rate=0.1),
         (4, 16, 16, 3)),
    ],
)
def test_output_shapes_train_and_eval(model, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  variables = jax.jit(model.init)(_key(0), x)
  mutable = [k for k in variables if k != "params"]

  @jax.jit
  def both(variables, x):
    logits = model.apply(variables, x, train=False)
    kwargs = {"mutable": mutable} if mutable else {}
    out = model.apply(variables, x, train=True,
                      rngs={"dropout": _key(2)}, **kwargs)
    return logits, out

  logits, out = both(variables, x)
  assert logits.shape == (4, 3)
  assert np.all(np.isfinite(logits))
  train_logits = out[0] if mutable else out
  assert train_logits.shape == (4, 3)
  if mutable:  # BatchNorm statistics moved in train mode
    new_stats = out[1]["batch_stats"]
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         variables["batch_stats"], new_stats)
    assert any(jax.tree.leaves(moved))


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
  model = models.MLP(features=(32,), num_classes=3, dropout_rate=0.5)
  x = jnp.ones((2, 5))
  variables = model.init(jax.random.key(0), x)
  a = model.apply(variables, x, train=False)
  b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(a, b)
  c = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  d = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(c, d)


@pytest.mark.parametrize(
    "model, shape",
    [
        (models.CNN1D(), (2, 40, 1, 1)),
        (models.CNN1D(), (2, 40, 3)),
        (models.ResNet(stage_sizes=(1,), width=4), (2, 16, 16)),
        (models.WideResNet(depth=10, widen_factor=1), (16, 16, 3)),
        (models.ViT(hidden_size=16, depth=1, num_heads=2, mlp_dim=16),
         (2, 16, 16)),
    ],
)
def test_wrong_input_rank_is_a_clear_error(model, shape):
  with pytest.raises(ValueError, match="expected"):
    model.init(jax.random.key(0), jnp.zeros(shape))


def test_bad_configurations_raise():
  with pytest.raises(ValueError, match="6n \\+ 4"):
    models.WideResNet(depth=12).init(jax.random.key(0),
                                     jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="num_heads"):
    models.ViT(hidden_size=10, num_heads=3).init(jax.random.key(0),
                                                 jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="patch_size"):
    models.ViT(patch_size=3).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


def test_resnet_batchnorm_cross_device_axis_under_pmap():
  """With axis_name, BatchNorm statistics are the global batch's under pmap."""
  n = 4
  x = jax.random.normal(jax.random.key(0), (n * 2, 8, 8, 3))
  local = models.ResNet(stage_sizes=(1,), width=4, num_classes=2)
  synced = models.ResNet(stage_sizes=(1,), width=4, num_classes=2,
                         axis_name="i")
  variables = jax.jit(local.init)(_key(1), x)
  _, ref = local.apply(variables, x, train=True, mutable=["batch_stats"])
  fn = lambda v, xs: synced.apply(v, xs, train=True,
                                  mutable=["batch_stats"])[1]
  out = jax.pmap(fn, axis_name="i", in_axes=(None, 0),
                 devices=jax.devices()[:n])(variables, x.reshape(n, 2, 8, 8, 3))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a[0], b, rtol=1e-4,
                                                       atol=1e-5),
               out, ref)
