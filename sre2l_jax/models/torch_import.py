"""Imports a torchvision ResNet state dict (`.pth`) as a frozen Flax teacher.

SRe2L starts from torchvision's pretrained ImageNet ResNets; this maps their state dicts one
to one onto `sre2l_jax.models.resnet`, whose module names mirror torchvision's.

  python -m sre2l_jax.models.torch_import --pth resnet18.pth --arch resnet18 --out DIR
"""

import argparse
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sre2l_jax import teacher_store
from sre2l_jax.models import create_model, model_signature

ARCHS = ('resnet18', 'resnet50', 'resnet101')
# Keys that carry no weights: BatchNorm's update counter.
_IGNORED_SUFFIXES = ('.num_batches_tracked',)
_MAX_LISTED = 20


class StateDictError(ValueError):
  """A state dict does not fit the requested architecture (or is not a state dict)."""


def load_state_dict(path: str) -> dict[str, Any]:
  """Loads `path` (torch.save output) as {torchvision key: tensor} on the CPU.

  Accepts a plain state dict or a checkpoint dict with a 'state_dict' or 'model' entry, and
  drops DataParallel's 'module.' prefix.
  """
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency

  if not os.path.isfile(path):
    raise FileNotFoundError(f'No PyTorch checkpoint at {path!r}.')
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle errors come in several types
    raise StateDictError(
        f'Could not load {path!r} with torch.load(weights_only=True). If it holds a pickled '
        f'model or other Python objects (e.g. the "args" of torchvision\'s training '
        f'scripts) and you trust it, re-save only the weights: torch.save(torch.load(path, '
        f'weights_only=False)["model"], "weights.pth"). torch said: {e}') from e
  for key in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
      break
  if not isinstance(obj, Mapping) or not obj or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
    raise StateDictError(
        f'{path!r} is not a state dict ({{name: tensor}}, possibly under "state_dict" or '
        f'"model"); got {type(obj).__name__}'
        + (f' with keys {sorted(map(str, obj))[:_MAX_LISTED]}' if isinstance(obj, Mapping)
           else '') + '.')
  return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}


def torch_key(path: tuple[str, ...]) -> str:
  """('params', 'layer1_0', 'downsample_bn', 'scale') -> 'layer1.0.downsample.1.weight'."""
  collection, *modules, leaf = path
  names = []
  for module in modules:
    if module.startswith('layer'):
      names.append(module.replace('_', '.'))
    else:
      names.append({'downsample_conv': 'downsample.0',
                    'downsample_bn': 'downsample.1'}.get(module, module))
  leaf = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
          ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
          ('batch_stats', 'var'): 'running_var'}[(collection, leaf)]
  return '.'.join(names + [leaf])


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor (maybe half precision)
    value = value.detach().cpu().float().numpy()
  return np.asarray(value, dtype=np.float32)


def _torch_shape(flax_shape) -> tuple[int, ...]:
  """The torch layout of a Flax shape: HWIO -> OIHW, (in, out) -> (out, in)."""
  s = tuple(int(d) for d in flax_shape)
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  return s[::-1] if len(s) == 2 else s


def _listing(title: str, items: list[str]) -> str:
  shown = ', '.join(items[:_MAX_LISTED])
  more = f', ... ({len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else ''
  return f'{len(items)} {title}: {shown}{more}'


def model_config(arch: str, stem: str = 'imagenet') -> ml_collections.ConfigDict:
  """The model config of an imported torchvision ResNet (torchvision's width, 64)."""
  if arch not in ARCHS:
    raise ValueError(f'Unknown arch {arch!r}; valid: {ARCHS}.')
  if stem not in ('imagenet', 'small'):
    raise ValueError(f"Unknown stem {stem!r}; valid: 'imagenet', 'small'.")
  return ml_collections.ConfigDict(dict(name=arch, width=64, stem=stem))


def abstract_variables(arch: str, num_classes: int, stem: str = 'imagenet') -> dict:
  """{'params', 'batch_stats'} of the Flax model as ShapeDtypeStructs (nothing computed)."""
  model = create_model(model_config(arch, stem), num_classes, dtype=jnp.float32)
  # Parameter shapes do not depend on the image size (global pooling before `fc`).
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                             train=False))
  return {k: shapes[k] for k in ('params', 'batch_stats')}


def torchvision_resnet_to_flax(state_dict: Mapping[str, Any], arch: str,
                               num_classes: int | None = None,
                               stem: str = 'imagenet') -> tuple[dict, int]:
  """Maps a torchvision ResNet state dict onto the Flax ResNet's variables.

  Conv weights OIHW -> kernels HWIO; BN weight/bias/running_mean/running_var -> params
  scale/bias, batch_stats mean/var; fc.weight (C, F) -> kernel (F, C). `num_classes` defaults
  to fc.weight's row count. Returns ({'params', 'batch_stats'}, num_classes); raises
  StateDictError listing unexpected, missing and mis-shaped keys.
  """
  if num_classes is None:
    if 'fc.weight' not in state_dict:
      raise StateDictError('No fc.weight in the state dict to infer num_classes from; pass '
                           'num_classes.')
    num_classes = int(state_dict['fc.weight'].shape[0])
  expected = traverse_util.flatten_dict(abstract_variables(arch, num_classes, stem))
  keys = {path: torch_key(path) for path in expected}
  wanted = set(keys.values())
  given = {k for k in state_dict if not k.endswith(_IGNORED_SUFFIXES)}
  unexpected, missing = sorted(given - wanted), sorted(wanted - given)

  flat, mismatched = {}, []
  for path, struct in expected.items():
    key = keys[path]
    if key not in state_dict:
      continue
    value = _to_numpy(state_dict[key])
    if value.ndim != len(struct.shape) or value.ndim not in (1, 2, 4):
      mismatched.append(f'{key}: got {value.shape}, expected {_torch_shape(struct.shape)}')
      continue
    if value.ndim == 4:  # conv: OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:  # fc: (out, in) -> (in, out)
      value = value.T
    if value.shape != tuple(struct.shape):
      mismatched.append(f'{key}: got {_torch_shape(value.shape)}, expected '
                        f'{_torch_shape(struct.shape)}')
      continue
    flat[path] = jnp.asarray(value, dtype=struct.dtype)

  if unexpected or missing or mismatched:
    parts = [_listing(title, items) for title, items in
             (('unexpected keys', unexpected), ('missing keys', missing),
              ('shape mismatches', sorted(mismatched))) if items]
    raise StateDictError(f'The state dict does not fit {arch} (stem={stem!r}, '
                         f'num_classes={num_classes}): ' + '; '.join(parts) + '.')
  return traverse_util.unflatten_dict(flat), num_classes


def main(argv: list[str] | None = None) -> str:
  """CLI entry point; returns the teacher directory it wrote."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pth', required=True, help='torch.save file of the state dict')
  parser.add_argument('--arch', required=True, choices=ARCHS)
  parser.add_argument('--stem', default='imagenet', choices=('imagenet', 'small'))
  parser.add_argument('--num_classes', type=int, default=None,
                      help='default: rows of fc.weight')
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--dataset', default='imagenet2012')
  parser.add_argument('--out', required=True, help='teacher directory to write')
  parser.add_argument('--overwrite', action='store_true',
                      help='replace a teacher that --out already holds')
  args = parser.parse_args(argv)

  pth = os.path.abspath(args.pth)
  if teacher_store.exists(args.out) and not args.overwrite:  # before the (slow) conversion
    raise teacher_store.TeacherError(f'{os.path.abspath(args.out)} already holds a teacher; '
                                     f'refusing to replace it. Pass --overwrite to replace it, '
                                     f'or choose another --out.')
  variables, num_classes = torchvision_resnet_to_flax(
      load_state_dict(pth), args.arch, args.num_classes, args.stem)
  meta = {'signature': model_signature(model_config(args.arch, args.stem), num_classes,
                                       (args.image_size, args.image_size, 3)),
          'dataset': args.dataset, 'source': pth, 'test_top1': None}
  teacher_store.save(args.out, variables, meta, overwrite=args.overwrite)
  print(f'Wrote {args.arch} teacher ({num_classes} classes) from {pth} to '
        f'{os.path.abspath(args.out)}')
  return os.path.abspath(args.out)


if __name__ == '__main__':
  try:
    main()
  except (ValueError, FileNotFoundError) as e:  # StateDictError, TeacherError: one line
    sys.exit(f'torch_import: {e}')
