"""Torchvision ResNet state dict -> Flax teacher: logits, BN-input statistics, CLI, errors.

The PyTorch ResNet (`benchmarks.torch_reference`, the project's one PyTorch twin of the Flax
models) is written independently of `sre2l_jax.models.resnet`, in torchvision's layout and
state-dict names, so a layout mistake on either side shows up as a numeric mismatch rather
than cancelling out.
"""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn as tnn

from sre2l_jax import teacher_store
from sre2l_jax.models import create_model, iter_in_call_order, model_signature
from sre2l_jax.models import torch_import
from sre2l_jax.models.torch_import import StateDictError

from benchmarks import torch_reference

NUM_CLASSES = 10
BATCH = 2
RTOL = 1e-4
# name -> (arch, stem, image size)
CASES = {'resnet18_imagenet_64': ('resnet18', 'imagenet', 64),
         'resnet50_small_32': ('resnet50', 'small', 32)}


def _torch_resnet(arch, stem, size):
  """A randomised eval-mode torch ResNet; BN running statistics are non-trivial too."""
  torch.manual_seed(0)
  model = torch_reference.build_model(arch, NUM_CLASSES, 3, size, width=64,
                                      stem=stem)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, tnn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, (2.0 / fan_in)**0.5)
      elif isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
      elif isinstance(m, tnn.Linear):
        m.weight.normal_(0.0, m.in_features**-0.5)
        m.bias.normal_(0.0, 0.2)
  return model.eval()


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _stats(x, axes):
  x = np.asarray(x, np.float64)
  return x.mean(axis=axes), x.var(axis=axes)


def _flax_bn_name(path):
  """('layer1_0', 'downsample_bn_input') -> 'layer1.0.downsample.1' (torch module name)."""
  *modules, leaf = path
  name = '.'.join(list(modules) + [leaf[:-len('_input')]]).replace('_', '.')
  return name.replace('downsample.bn', 'downsample.1')


@dataclasses.dataclass
class Case:
  arch: str
  stem: str
  pth: str
  x_nhwc: np.ndarray
  torch_logits: np.ndarray
  torch_bn: list  # (module name, mean, var) in call order
  variables: dict
  flax_logits: np.ndarray
  flax_bn: list


def _run_case(name, tmp_path):
  arch, stem, size = CASES[name]
  model = _torch_resnet(arch, stem, size)
  pth = str(tmp_path / f'{arch}.pth')
  torch.save(model.state_dict(), pth)

  torch_bn = []
  for module_name, m in model.named_modules():
    if isinstance(m, tnn.BatchNorm2d):
      m.register_forward_pre_hook(
          lambda _, inputs, n=module_name: torch_bn.append(
              (n, *_stats(inputs[0].numpy(), (0, 2, 3)))))
  x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    torch_logits = model(x).numpy()

  variables, num_classes = torch_import.torchvision_resnet_to_flax(
      torch_import.load_state_dict(pth), arch, stem=stem)
  assert num_classes == NUM_CLASSES
  flax_model = create_model(torch_import.model_config(arch, stem), num_classes)
  x_nhwc = x.permute(0, 2, 3, 1).numpy()
  logits, state = flax_model.apply(variables, x_nhwc, train=False, mutable=['bn_inputs'])
  flax_bn = [(_flax_bn_name(path), *_stats(value, (0, 1, 2)))
             for path, value in iter_in_call_order(state['bn_inputs'])]
  return Case(arch, stem, pth, x_nhwc, torch_logits, torch_bn, variables, np.asarray(logits),
              flax_bn)


@pytest.fixture(scope='module')
def run_case(tmp_path_factory):
  cache = {}

  def run(name):
    if name not in cache:
      cache[name] = _run_case(name, tmp_path_factory.mktemp(name))
    return cache[name]

  return run


@pytest.mark.equivalence
@pytest.mark.parametrize('name', sorted(CASES))
def test_logits_match_torch(run_case, name):
  case = run_case(name)
  assert case.flax_logits.shape == (BATCH, NUM_CLASSES)
  assert _rel_err(case.flax_logits, case.torch_logits) <= RTOL


@pytest.mark.equivalence
@pytest.mark.parametrize('name', sorted(CASES))
def test_bn_input_statistics_match_torch(run_case, name):
  case = run_case(name)
  assert [n for n, *_ in case.flax_bn] == [n for n, *_ in case.torch_bn]
  for (layer, f_mean, f_var), (_, t_mean, t_var) in zip(case.flax_bn, case.torch_bn):
    assert _rel_err(f_mean, t_mean) <= RTOL, layer
    assert _rel_err(f_var, t_var) <= RTOL, layer


@pytest.mark.slow
def test_cli_round_trip(run_case, tmp_path):
  case = run_case('resnet18_imagenet_64')
  out = torch_import.main(['--pth', case.pth, '--arch', 'resnet18', '--image_size', '64',
                           '--dataset', 'synthetic', '--out', str(tmp_path / 'teacher')])
  config = torch_import.model_config('resnet18', 'imagenet')
  expected = model_signature(config, NUM_CLASSES, (64, 64, 3))
  variables, meta = teacher_store.read(
      out, expected, torch_import.abstract_variables('resnet18', NUM_CLASSES),
      'python -m sre2l_jax.models.torch_import')
  assert meta['dataset'] == 'synthetic' and meta['source'] == case.pth
  assert meta['test_top1'] is None
  logits = create_model(config, NUM_CLASSES).apply(variables, case.x_nhwc, train=False)
  np.testing.assert_array_equal(np.asarray(logits), case.flax_logits)


def test_load_state_dict_wrappers_and_errors(run_case, tmp_path):
  case = run_case('resnet18_imagenet_64')
  state_dict = torch.load(case.pth, weights_only=True)
  wrapped = tmp_path / 'wrapped.pth'
  torch.save({'state_dict': {f'module.{k}': v for k, v in state_dict.items()}, 'epoch': 3},
             wrapped)
  assert sorted(torch_import.load_state_dict(str(wrapped))) == sorted(state_dict)

  with pytest.raises(FileNotFoundError, match='missing.pth'):
    torch_import.load_state_dict(str(tmp_path / 'missing.pth'))
  not_a_state_dict = tmp_path / 'list.pth'
  torch.save([1, 2, 3], not_a_state_dict)
  with pytest.raises(StateDictError, match='not a state dict'):
    torch_import.load_state_dict(str(not_a_state_dict))


def test_unexpected_missing_and_mis_shaped_keys(run_case):
  case = run_case('resnet18_imagenet_64')
  state_dict = torch.load(case.pth, weights_only=True)

  bad = dict(state_dict)
  bad['layer1.0.conv3.weight'] = torch.zeros(64, 64, 1, 1)
  del bad['layer2.0.downsample.1.running_var']
  with pytest.raises(StateDictError) as error:
    torch_import.torchvision_resnet_to_flax(bad, 'resnet18')
  message = str(error.value)
  assert '1 unexpected keys: layer1.0.conv3.weight' in message
  assert '1 missing keys: layer2.0.downsample.1.running_var' in message

  with pytest.raises(StateDictError) as error:
    torch_import.torchvision_resnet_to_flax(state_dict, 'resnet18', num_classes=1000)
  message = str(error.value)
  assert 'fc.weight: got (10, 512), expected (1000, 512)' in message
  assert 'fc.bias: got (10,), expected (1000,)' in message

  # A ResNet-18 state dict is not a ResNet-50 one: long listings are truncated.
  with pytest.raises(StateDictError, match=r'165 missing keys: .*\(145 more\)'):
    torch_import.torchvision_resnet_to_flax(state_dict, 'resnet50')

