"""Exports a Flax ResNet teacher as a torchvision state dict (`.pth`): `torch_import`'s inverse.

  python -m sre2l_jax.models.torch_export --teacher runs/x/squeeze/teacher --out teacher.pth

The file loads with `torchvision.models.resnet18(num_classes=K).load_state_dict(
torch.load('teacher.pth'))` (strict; a 'small' stem teacher has a 3x3 conv1 and no max pool,
so build that model likewise). Conv kernels HWIO -> OIHW, dense (in, out) -> (out, in), BN
scale / bias / mean / var -> weight / bias / running_mean / running_var, and each BN's
`num_batches_tracked` (0: unused in eval mode), under `torch_import`'s key mapping.
"""

import argparse
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from sre2l_jax import files
from sre2l_jax import teacher_store
from sre2l_jax.models import torch_import


def flax_to_torchvision_resnet(variables: dict) -> dict[str, np.ndarray]:
  """{'params', 'batch_stats'} of a Flax ResNet -> {torchvision key: numpy array}."""
  out = {}
  for path, value in traverse_util.flatten_dict(
      {k: variables[k] for k in ('params', 'batch_stats')}).items():
    array = np.asarray(value, np.float32)
    if array.ndim == 4:  # conv: HWIO -> OIHW
      array = array.transpose(3, 2, 0, 1)
    elif array.ndim == 2:  # fc: (in, out) -> (out, in)
      array = array.T
    out[torch_import.torch_key(path)] = np.ascontiguousarray(array)
  for key in [k for k in out if k.endswith('.running_mean')]:
    out[key[:-len('running_mean')] + 'num_batches_tracked'] = np.asarray(0, np.int64)
  return out


def read_teacher(directory: str) -> tuple[dict, dict]:
  """(variables as numpy, teacher.json) of a teacher folder written by `teacher_store.save`."""
  meta_path = os.path.join(directory, teacher_store.META)
  if not files.exists(meta_path):
    raise teacher_store.TeacherError(
        f'No teacher at {directory} (missing {teacher_store.META}).')
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(files.as_path(os.path.join(files.absolute(directory),
                                                         teacher_store.WEIGHTS)))
  return variables, files.read_json(meta_path)


def export_teacher(directory: str, out: str) -> str:
  """Writes the ResNet teacher in `directory` to `out` as a torchvision state dict."""
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency

  variables, meta = read_teacher(directory)
  name = meta.get('signature', {}).get('model', {}).get('name')
  if name not in torch_import.ARCHS:
    raise ValueError(f'The teacher at {directory} is a {name}; only the ResNets '
                     f'({", ".join(torch_import.ARCHS)}) have torchvision\'s layout.')
  state = {k: torch.from_numpy(v) for k, v in flax_to_torchvision_resnet(variables).items()}
  tmp = out + '.tmp'
  torch.save(state, tmp)
  os.replace(tmp, out)
  return out


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--teacher', required=True, help='teacher folder (squeeze/teacher)')
  parser.add_argument('--out', required=True, help='.pth file to write')
  args = parser.parse_args(argv)
  path = export_teacher(args.teacher, args.out)
  print(f'Wrote {path}')
  return path


if __name__ == '__main__':
  try:
    main()
  except (ValueError, OSError) as e:
    sys.exit(f'torch_export: {e}')
