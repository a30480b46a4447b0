"""The frozen teacher: where it lives, how it is saved, and loading it checked against the
config (recover, relabel, evaluate and continual all read it; squeeze and the PyTorch import
write it).

A teacher folder holds `weights/` (Orbax, {'params', 'batch_stats'}) and `teacher.json`
(the model signature it was made for, the dataset, its test top-1).
"""

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import models
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

META = 'teacher.json'
WEIGHTS = 'weights'


class TeacherError(ValueError):
  """A teacher checkpoint is missing or does not fit the configured model or dataset."""


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the teacher is read: config.squeeze.teacher_dir, or the squeeze stage's output."""
  return config.squeeze.teacher_dir or os.path.join(workdir, 'squeeze', 'teacher')


def teacher_meta(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                 test_top1: float | None = None) -> dict:
  return {'signature': models.model_signature(config.teacher, spec.num_classes,
                                              spec.image_shape),
          'dataset': spec.name, 'test_top1': test_top1}


def save(directory: str, variables: dict, meta: dict) -> None:
  """Writes a frozen teacher: `weights/` ({'params','batch_stats'}) and `teacher.json`.

  `meta` holds at least the model signature (`models.model_signature`) and the dataset name.
  """
  directory = os.path.abspath(directory)
  weights = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, WEIGHTS), weights, force=True)
  files.write_json(os.path.join(directory, META), meta)


def read(directory: str, expected: dict, abstract_variables: dict,
         producer_hint: str) -> tuple[dict, dict]:
  """Restores a teacher saved by `save` after checking it fits `expected`.

  expected: the model signature the caller will run (name, width, classes, image shape...).
  abstract_variables: `jax.eval_shape` of the model's init ({'params','batch_stats'}), with
  shardings, used as the restore target. producer_hint: the command that writes a teacher.
  Returns (variables, meta).
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, META)
  if not os.path.exists(meta_path):
    raise TeacherError(f'No teacher at {directory} (missing {META}). Produce one '
                       f'with: {producer_hint}')
  meta = files.read_json(meta_path)
  differences = checkpoint.diff(meta.get('signature'), json.loads(json.dumps(expected)))
  if differences:
    raise TeacherError(f'The teacher at {directory} does not fit this configuration: '
                       f'{"; ".join(differences)}. Point the config at a matching teacher or '
                       f'change the model/dataset settings.')
  target = {k: abstract_variables[k] for k in ('params', 'batch_stats')}
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(directory, WEIGHTS), target)
  except Exception as e:  # orbax raises several types for tree/shape mismatches
    raise TeacherError(f'The teacher weights at {directory} do not match the model '
                       f'{expected}: {e}') from e
  return variables, meta


def load(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, variables) of the frozen teacher, replicated on `mesh`, checked against config."""
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  abstract = models.abstract_variables(model, spec.image_shape, batching.replicated(mesh))
  hint = (f'python -m sre2l_jax.main --config=<config> --workdir={workdir} --stages=squeeze '
          f'(or import a PyTorch teacher with python -m sre2l_jax.models.torch_import)')
  variables, _ = read(teacher_dir(config, workdir), teacher_meta(config, spec)['signature'],
                      abstract, hint)
  return model, variables
