"""Flax ResNet teacher -> torchvision `.pth` (models/torch_export.py): the PyTorch twin
(`benchmarks.torch_reference`, torchvision's layout and names, written independently) loads
it strictly and computes the JAX teacher's logits; `torch_import` reads it back unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from sre2l_jax import teacher_store
from sre2l_jax.models import create_model, model_signature
from sre2l_jax.models import torch_export
from sre2l_jax.models import torch_import

from benchmarks import torch_reference

# Relative error of the logits (norm of the difference / norm): both sides compute float32
# convolutions and sums in their own orders; each of resnet18's ~20 layers rounds at ~1e-7
# relative, so ~1e-6 is expected; 1e-4 is test_torch_import's bound for the same twin.
RTOL = 1e-4


def _teacher(tmp_path, stem='small', size=16):
  config = torch_import.model_config('resnet18', stem)
  model = create_model(config, 10, dtype=jnp.float32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  rng = np.random.default_rng(0)

  def randomise(path, x):  # non-trivial BN statistics, scales and biases
    x = np.asarray(x, np.float32)
    draw = {'mean': lambda: rng.normal(0.0, 0.2, x.shape),
            'var': lambda: rng.uniform(0.5, 2.0, x.shape),
            'scale': lambda: rng.uniform(0.5, 1.5, x.shape),
            'bias': lambda: rng.normal(0.0, 0.2, x.shape)}.get(path[-1].key)
    return x if draw is None else draw().astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(randomise, dict(variables))
  directory = str(tmp_path / 'teacher')
  teacher_store.save(directory, variables,
                     {'signature': model_signature(config, 10, (size, size, 3)),
                      'dataset': 'test'})
  return model, variables, directory


@pytest.mark.equivalence
def test_pth_gives_the_jax_logits_and_imports_back_unchanged(tmp_path):
  model, variables, directory = _teacher(tmp_path)
  path = torch_export.export_teacher(directory, str(tmp_path / 'teacher.pth'))
  state = torch.load(path, weights_only=True)
  twin = torch_reference.build_model('resnet18', 10, 3, 16, width=64, stem='small')
  twin.load_state_dict(state, strict=True)  # every key, num_batches_tracked included
  x = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype(np.float32)
  want = np.asarray(model.apply(variables, x, train=False), np.float64)
  with torch.no_grad():
    got = twin.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().astype(np.float64)
  assert np.linalg.norm(got - want) / np.linalg.norm(want) < RTOL

  back, num_classes = torch_import.torchvision_resnet_to_flax(state, 'resnet18', stem='small')
  assert num_classes == 10
  flat_back = traverse_util.flatten_dict(back)
  flat = traverse_util.flatten_dict({k: variables[k] for k in ('params', 'batch_stats')})
  assert flat_back.keys() == flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(np.asarray(flat_back[key]), value)  # transposes only


def test_a_convnet_teacher_is_refused(tmp_path):
  _, variables, directory = _teacher(tmp_path)
  meta = {'signature': {'model': {'name': 'convnet'}}, 'dataset': 'test'}
  teacher_store.save(directory, variables, meta, overwrite=True)
  with pytest.raises(ValueError, match='is a convnet; only the ResNets'):
    torch_export.export_teacher(directory, str(tmp_path / 'teacher.pth'))
