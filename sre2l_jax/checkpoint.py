"""Orbax checkpoints shared by all stages: managers, config fingerprints, teacher files."""

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class ConfigMismatchError(ValueError):
  """A workdir holds state written under a different configuration."""


class TeacherError(ValueError):
  """A teacher checkpoint is missing or does not fit the configured model or dataset."""


def create_manager(directory: str, *, save_interval_steps: int = 1,
                   max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for one stage's resumable state (atomic saves, latest step)."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps,
                                         max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def _diff(a: Any, b: Any, prefix: str = '') -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += _diff(a.get(key), b.get(key), f'{prefix}{key}.')
    return out
  return [] if a == b else [f'{prefix[:-1]}: saved {a!r}, now {b!r}']


def check_fingerprint(stage_dir: str, fingerprint: dict) -> None:
  """Refuses to reuse `stage_dir` if it was written under another fingerprint.

  The fingerprint holds what determines the shapes and meaning of the stage's state (model,
  dataset, sizes, seed). The first run writes it to `stage_dir/fingerprint.json`.
  """
  fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples, numpy scalars
  path = os.path.join(stage_dir, 'fingerprint.json')
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    differences = _diff(saved, fingerprint)
    if differences:
      raise ConfigMismatchError(
          f'{stage_dir} holds a run with a different configuration; refusing to resume into '
          f'it. Differences: {"; ".join(differences)}. Use a new --workdir, or restore the '
          f'original configuration.')
    return
  if jax.process_index() == 0:
    os.makedirs(stage_dir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(fingerprint, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_json(path: str, data: dict) -> None:
  """Atomically writes `data` as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(data, f, indent=1, sort_keys=True, default=float)
  os.replace(tmp, path)


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


TEACHER_META = 'teacher.json'
TEACHER_WEIGHTS = 'weights'


def save_teacher(directory: str, variables: dict, meta: dict) -> None:
  """Writes a frozen teacher: `weights/` ({'params','batch_stats'}) and `teacher.json`.

  `meta` holds at least the model signature (`models.model_signature`) and the dataset name.
  """
  directory = os.path.abspath(directory)
  weights = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, TEACHER_WEIGHTS), weights, force=True)
  write_json(os.path.join(directory, TEACHER_META), meta)


def load_teacher(directory: str, expected: dict, abstract_variables: dict,
                 producer_hint: str) -> tuple[dict, dict]:
  """Restores a teacher saved by `save_teacher` after checking it fits `expected`.

  expected: the model signature the caller will run (name, width, classes, image shape...).
  abstract_variables: `jax.eval_shape` of the model's init ({'params','batch_stats'}), with
  shardings, used as the restore target. producer_hint: the command that writes a teacher.
  Returns (variables, meta).
  """
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, TEACHER_META)
  if not os.path.exists(meta_path):
    raise TeacherError(f'No teacher at {directory} (missing {TEACHER_META}). Produce one '
                       f'with: {producer_hint}')
  meta = read_json(meta_path)
  differences = _diff(meta.get('signature'), json.loads(json.dumps(expected)))
  if differences:
    raise TeacherError(f'The teacher at {directory} does not fit this configuration: '
                       f'{"; ".join(differences)}. Point the config at a matching teacher or '
                       f'change the model/dataset settings.')
  target = {k: abstract_variables[k] for k in ('params', 'batch_stats')}
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(directory, TEACHER_WEIGHTS), target)
  except Exception as e:  # orbax raises several types for tree/shape mismatches
    raise TeacherError(f'The teacher weights at {directory} do not match the model '
                       f'{expected}: {e}') from e
  return variables, meta
