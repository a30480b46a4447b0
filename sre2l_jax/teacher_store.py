"""A teacher folder on disk: `weights/` (Orbax, {'params', 'batch_stats'}) and
`teacher.json` (the model signature it was made for, the dataset, its test top-1, and
`digest`: the SHA-256 of its parameters and batch statistics, `variables_digest`).

Below `teacher` (which knows the config: where a run's teacher is, which model it must be)
so that what writes a teacher without a config, `models.torch_import`, needs nothing above
it. Teachers saved before digests get theirs derived from the weights on first read (stated
in a log line) and written into teacher.json.
"""

import hashlib
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import train_lib

META = 'teacher.json'
WEIGHTS = 'weights'
# Beside results made from the teacher's outputs (students' folders): {'teacher_sha256': its
# digest}, checked like a fingerprint (`checkpoint.check_fingerprint(..., name=KEY_FILE)`).
KEY_FILE = 'teacher_key.json'


class TeacherError(ValueError):
  """A teacher checkpoint is missing or does not fit the configured model or dataset."""


def variables_digest(variables: dict) -> str:
  """SHA-256 of a teacher's {'params', 'batch_stats'}: every array's path, dtype, shape and
  bytes, in path order (numpy arrays, or jax arrays replicated on every device: each process
  reads its own copy)."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict(
      {k: variables[k] for k in ('params', 'batch_stats')}, sep='/')
  for path in sorted(flat):
    leaf = flat[path]
    array = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    digest.update(f'{path}:{array.dtype}:{array.shape};'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def exists(directory: str) -> bool:
  """Whether `directory` holds (part of) a teacher."""
  return any(files.exists(os.path.join(directory, name)) for name in (META, WEIGHTS))


def save(directory: str, variables: dict, meta: dict, *, overwrite: bool = False) -> None:
  """Writes a frozen teacher: `weights/` ({'params','batch_stats'}) and `teacher.json`.

  `meta` holds at least the model signature (`models.model_signature`) and the dataset name.
  The teacher is written beside `directory` and moved into place when whole, so a kill never
  leaves half a teacher. Refuses (TeacherError) non-finite weights, and an existing teacher
  unless `overwrite`.
  """
  directory = files.absolute(directory)  # local or gs://
  if exists(directory) and not overwrite:
    raise TeacherError(f'{directory} already holds a teacher; refusing to replace it. Pass '
                       f'--overwrite to replace it, or write the new one elsewhere.')
  weights = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
  if not train_lib.all_finite(weights):
    raise TeacherError(f'Refusing to save a teacher with non-finite weights to {directory} '
                       f'(its training diverged).')
  tmp = directory + '.tmp'
  if jax.process_index() == 0:
    files.rmtree(tmp)
  with ocp.StandardCheckpointer() as ckptr:  # every process takes part in the save
    ckptr.save(files.as_path(os.path.join(tmp, WEIGHTS)), weights, force=True)
  files.write_json(os.path.join(tmp, META), dict(meta, digest=variables_digest(weights)))
  if jax.process_index() == 0:
    files.replace_dir(tmp, directory)


def read(directory: str, expected: dict, abstract_variables: dict,
         producer_hint: str) -> tuple[dict, dict]:
  """Restores a teacher saved by `save` after checking it fits `expected`.

  expected: the model signature the caller will run (name, width, classes, image shape...).
  abstract_variables: `jax.eval_shape` of the model's init ({'params','batch_stats'}), with
  shardings, used as the restore target. producer_hint: the command that writes a teacher.
  Returns (variables, meta).
  """
  directory = files.absolute(directory)  # local or gs://
  meta_path = os.path.join(directory, META)
  if not files.exists(meta_path):
    raise TeacherError(f'No teacher at {directory} (missing {META}). Produce one '
                       f'with: {producer_hint}')
  meta = files.read_json(meta_path, remake=f'delete {directory} and produce the teacher '
                         f'again: {producer_hint}')
  differences = checkpoint.diff(meta.get('signature'), json.loads(json.dumps(expected)))
  if differences:
    raise TeacherError(f'The teacher at {directory} does not fit this configuration: '
                       f'{"; ".join(differences)}. Point the config at a matching teacher or '
                       f'change the model/dataset settings.')
  target = {k: abstract_variables[k] for k in ('params', 'batch_stats')}
  weights = files.as_path(os.path.join(directory, WEIGHTS))
  damaged = (f'The teacher weights at {weights} are damaged or truncated ({{}}). Delete '
             f'{directory} and produce the teacher again: {producer_hint}')
  # The saved shapes first: a teacher of another model and a damaged file are told apart.
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.metadata(weights).item_metadata.tree
    saved = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(saved, sep='/').items()}
  except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types
    raise TeacherError(damaged.format(train_lib.one_line(e))) from e
  wanted = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(target, sep='/').items()}
  if saved != wanted:
    differences = [f'{k}: saved {saved.get(k)}, model {wanted.get(k)}'
                   for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    raise TeacherError(f'The teacher weights at {directory} do not match the model '
                       f'{expected}: {len(differences)} arrays differ, e.g. '
                       f'{"; ".join(differences[:3])}.')
  try:
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(weights, target)
  except Exception as e:  # pylint: disable=broad-except
    raise TeacherError(damaged.format(train_lib.one_line(e))) from e
  if not train_lib.all_finite(variables):
    raise TeacherError(damaged.format('non-finite values'))
  found = variables_digest(variables)
  if meta.get('digest') is None:  # saved before digests: derived once, recorded
    logging.info('teacher: %s was saved before teachers carried a digest; derived it from '
                 'its weights (%s) and recorded it in %s', directory, found[:12], META)
    meta = dict(meta, digest=found)
    files.write_json(meta_path, meta)
  elif meta['digest'] != found:
    raise TeacherError(damaged.format(f'its weights have SHA-256 {found[:12]}, {META} '
                                      f'records {meta["digest"][:12]}: replaced or changed'))
  return variables, meta
