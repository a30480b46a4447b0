"""The student zoo: every model builds at the dataset shapes it is meant for and trains to
the same result on 1 and 8 devices (the student step evaluate runs, hard labels)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sre2l_jax import config_lib
from sre2l_jax import models
from sre2l_jax import student
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

ZOO = ('convnet_in', 'mlp', 'lenet', 'alexnet', 'vgg11', 'resnet18_small')


def _model(name, width=4, depth=3):
  return models.create_model(ml_collections.ConfigDict(dict(name=name, width=width,
                                                            depth=depth)), 10)


@pytest.mark.parametrize('name', ZOO)
def test_shapes_and_norm_collections(name):
  for shape in ((28, 28, 1), (32, 32, 3), (64, 64, 3)):
    model = _model(name)
    variables = jax.eval_shape(lambda m=model, s=shape: m.init(
        jax.random.key(0), jnp.zeros((2,) + s), train=False))
    logits = jax.eval_shape(lambda v, m=model, s=shape: m.apply(v, jnp.zeros((2,) + s)),
                            variables)
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32, (name, shape)
    # Only the ResNet has BatchNorm: the others have no running statistics at all.
    assert ('batch_stats' in variables) == (name == 'resnet18_small'), name
  abstract = models.abstract_variables(_model(name), (32, 32, 3))
  assert set(abstract) == {'params', 'batch_stats'}


def test_convnet_in_is_instance_norm_of_each_image():
  """An image's logits do not depend on the rest of the batch (no batch statistics), and
  each conv output is normalised per image and channel over (H, W)."""
  model = _model('convnet_in', depth=2)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  together = model.apply(variables, x, train=True)
  alone = jnp.concatenate([model.apply(variables, x[i:i + 1], train=True) for i in range(4)])
  np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
  _, state = model.apply(variables, x, capture_intermediates=True)
  normed = state['intermediates']['norm0']['__call__'][0]
  np.testing.assert_allclose(normed.mean(axis=(1, 2)), 0.0, atol=1e-4)  # scale 1, bias 0
  np.testing.assert_allclose(normed.var(axis=(1, 2)), 1.0, atol=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize('name', ZOO)
def test_trains_alike_on_1_and_8_devices(name):
  config = config_lib.base_config()
  config.relabel.update(batch_size=8, mix='cutmix')
  # SGD: Adam would blow last-bit differences of near-zero gradients up to a full step.
  config.evaluate.update(optimizer='sgd', momentum=0.9)
  spec = datasets.get_spec('fashion_mnist')  # 28 x 28 x 1: DC's first-layer padding too
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8,) + spec.image_shape, dtype=np.uint8)
  labels = rng.integers(0, 10, (8,), dtype=np.int32)
  model = _model(name)
  results = []
  for devices in (1, 8):
    mesh = batching.create_mesh(devices)
    tx = train_lib.create_optimizer(config.evaluate, train_lib.warmup_cosine(0.05, 3))
    state = train_lib.create_train_state(model, tx, spec.image_shape, jax.random.key(0), mesh)
    step = student.create_student_step(config, spec, None, mesh, 'hard')
    sharded = batching.data_sharding(mesh)
    losses = []
    for s in range(2):
      state, metrics = step(state, jax.device_put(images, sharded),
                            jax.device_put(labels, sharded), None,
                            jax.random.fold_in(jax.random.key(2), s), None)
      losses.append(float(metrics['loss']))
    results.append((losses, jax.device_get(state.params)))
  (losses_1, params_1), (losses_8, params_8) = results
  assert np.all(np.isfinite(losses_1)) and losses_1[0] != losses_1[-1]
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-4, atol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_1, params_8)
