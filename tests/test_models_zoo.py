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


def _train(name, devices, steps=2):
  """`steps` hard-label student steps of zoo model `name` on `devices` devices (8 random
  Fashion-MNIST-shaped images, SGD): (losses, final params)."""
  config = config_lib.base_config()
  config.student.batch_size = 8
  config.relabel.mix = 'cutmix'
  # SGD: Adam would blow last-bit differences of near-zero gradients up to a full step.
  config.evaluate.update(optimizer='sgd', momentum=0.9)
  spec = datasets.get_spec('fashion_mnist')  # 28 x 28 x 1: DC's first-layer padding too
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8,) + spec.image_shape, dtype=np.uint8)
  labels = rng.integers(0, 10, (8,), dtype=np.int32)
  model = _model(name)
  mesh = batching.create_mesh(devices)
  tx = train_lib.create_optimizer(config.evaluate, train_lib.warmup_cosine(0.05, 3))
  state = student.stack(  # a stack of one student
      [train_lib.create_train_state(model, tx, spec.image_shape, jax.random.key(0), mesh)])
  step = student.create_student_step(config, spec, None, mesh, 'hard')
  sharded = student.stacked_sharding(mesh)
  losses = []
  for s in range(steps):
    state, metrics = step(state, jax.device_put(images[None], sharded),
                          jax.device_put(labels[None], sharded), None,
                          jax.random.fold_in(jax.random.key(2), s), None)
    losses.append(float(metrics['loss'][0]))
  return losses, jax.device_get(student.unstack(state.params, 0))


@pytest.mark.parametrize('name', [n for n in ZOO if n not in ('convnet_in', 'resnet18_small')])
def test_trains_on_one_device(name):
  losses, _ = _train(name, devices=1)
  assert np.all(np.isfinite(losses)) and losses[0] != losses[-1]


# The data-parallel claim once per kind of normalisation: none of the zoo's models couples
# the images of a batch but through BatchNorm (resnet18_small: statistics over all devices)
# or not at all (convnet_in normalises each image alone; MLP, LeNet, AlexNet and VGG-11 have
# no norm and no dropout), so the other four add nothing to it but compile time.
@pytest.mark.equivalence
@pytest.mark.slow
@pytest.mark.parametrize('name', ['convnet_in', 'resnet18_small'])
def test_trains_alike_on_1_and_8_devices(name):
  """Tolerance: the 8-device program sums the batch's gradients in another order (per device,
  then across), float32 rounding (~1e-7 relative) grown by 2 SGD steps; 1e-4 relative leaves
  a margin of 9x or more on either instruction set. Measured, largest parameter difference
  over the tensor's largest: AVX-512 (2-core AMD EPYC) convnet_in 3.1e-6, resnet18_small
  1.1e-5; XLA_FLAGS=--xla_cpu_max_isa=AVX2 3.4e-6, 4.1e-6."""
  (losses_1, params_1), (losses_8, params_8) = _train(name, 1), _train(name, 8)
  worst = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12)), params_1, params_8)))
  print(f'{name}: 1 vs 8 devices, largest parameter difference / the tensor\'s largest {worst:.3g}')
  assert np.all(np.isfinite(losses_1)) and losses_1[0] != losses_1[-1]
  np.testing.assert_allclose(losses_1, losses_8, rtol=1e-4, atol=1e-5)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params_1, params_8)
