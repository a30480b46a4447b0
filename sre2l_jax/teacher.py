"""The frozen teacher: where it lives, how it is saved, and loading it checked against the
config (recover, relabel, evaluate and continual all read it; squeeze and the PyTorch import
write it).

A teacher folder holds `weights/` (Orbax, {'params', 'batch_stats'}) and `teacher.json`
(the model signature it was made for, the dataset, its test top-1, and `digest`: the SHA-256
of its parameters and batch statistics, `variables_digest`). The digest is what the stages
key their results on (`digest`): a teacher trained again, or another teacher put in the same
folder, has another digest, whatever its config. Teachers saved before digests get theirs
derived from the weights on first load (stated in a log line) and written into teacher.json.
"""

import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from sre2l_jax import checkpoint
from sre2l_jax import files
from sre2l_jax import models
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

META = 'teacher.json'
WEIGHTS = 'weights'
# Beside results made from the teacher's outputs (students' folders): {'teacher_sha256': its
# digest}, checked like a fingerprint (`checkpoint.check_fingerprint(..., name=KEY_FILE)`).
KEY_FILE = 'teacher_key.json'


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


def load_one(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, variables) of config.teacher alone (not its extra teachers), replicated on
  `mesh`, checked against config."""
  spec = datasets.spec_of(config.dataset)
  model = models.create_model(config.teacher, spec.num_classes)
  abstract = models.abstract_variables(model, spec.image_shape, batching.replicated(mesh))
  hint = (f'python -m sre2l_jax.main --config=<config> --workdir={workdir} --stages=squeeze '
          f'(or import a PyTorch teacher with python -m sre2l_jax.models.torch_import)')
  variables, _ = read(teacher_dir(config, workdir), teacher_meta(config, spec)['signature'],
                      abstract, hint)
  return model, variables


# ----------------------------------------------------------------------------- several


def parse_spec(spec: str, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """'convnet:width=32,depth=2' -> a model config: `base` (config.teacher) with that name
  and those keys (ints, floats or strings, like the keys of `base`)."""
  return models.from_spec(spec, base, drop=('extra_teachers',))


def spec_slug(spec: str) -> str:
  """A folder name for a teacher spec: 'convnet:width=32,depth=2' -> 'convnet-width32-depth2'."""
  return spec.replace(':', '-').replace(',', '-').replace('=', '').replace(' ', '')


def extra_configs(config: ml_collections.ConfigDict, workdir: str) -> list:
  """[(config, workdir)] of each of config.teacher.extra_teachers: the config of its own
  squeeze run (config.teacher replaced by the spec) and the workdir it runs in, beside the
  main teacher: `<teacher_dir>/../teachers/<slug>` (`workdir/squeeze/teachers/<slug>` for a
  teacher this workdir squeezes; with squeeze.teacher_dir, the extras trained beside that
  teacher by its own workdir's squeeze), its teacher in `.../squeeze/teacher`."""
  root = os.path.join(os.path.dirname(os.path.normpath(teacher_dir(config, workdir))),
                      'teachers')
  out = []
  for spec in config.teacher.extra_teachers:
    extra = ml_collections.ConfigDict(config.to_dict())
    extra.teacher = parse_spec(spec, config.teacher)
    extra.teacher.extra_teachers = ()
    extra.squeeze.teacher_dir = ''
    out.append((extra, os.path.join(root, spec_slug(spec))))
  return out


def digest(config: ml_collections.ConfigDict, workdir: str, mesh) -> str:
  """The digest of the teacher the stages use (config.teacher's; with teacher.extra_teachers
  one over all of theirs), as teacher.json records it (a teacher saved before digests is
  loaded once to derive it)."""
  digests = []
  for cfg, wd in [(config, workdir)] + extra_configs(config, workdir):
    path = os.path.join(teacher_dir(cfg, wd), META)
    found = files.read_json(path).get('digest') if files.exists(path) else None
    if found is None:  # derived here (process 0 also records it; the others may not see it yet)
      found = variables_digest(load_one(cfg, wd, mesh)[1])
    digests.append(found)
  if len(digests) == 1:
    return digests[0]
  return hashlib.sha256(' '.join(digests).encode()).hexdigest()


def load_all(config: ml_collections.ConfigDict, workdir: str, mesh) -> list:
  """[(model, variables)] of config.teacher, then each of teacher.extra_teachers."""
  return [load_one(config, workdir, mesh)] + [
      load_one(extra, extra_workdir, mesh)
      for extra, extra_workdir in extra_configs(config, workdir)]


def ensemble_temperature(config: ml_collections.ConfigDict) -> float:
  """The T the ensemble's soft labels are averaged at: the students' (evaluate.temperature)."""
  return float(config.evaluate.temperature)


def create_model(config: ml_collections.ConfigDict, num_classes: int, dtype=None):
  """The teacher module: config.teacher's, or with teacher.extra_teachers the `Ensemble` of
  it and them (`models.ensemble`)."""
  model = models.create_model(config.teacher, num_classes, dtype)
  extras = extra_configs(config, '')
  if not extras:
    return model
  return models.Ensemble(
      members=(model,) + tuple(models.create_model(c.teacher, num_classes, dtype)
                               for c, _ in extras),
      temperature=ensemble_temperature(config))


def load(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, variables) of the frozen teacher, replicated on `mesh`, checked against config:
  config.teacher's, or with teacher.extra_teachers their `Ensemble` (its logits give the
  average of the members' soft labels at evaluate.temperature; recover sums the members'
  losses)."""
  loaded = load_all(config, workdir, mesh)
  if len(loaded) == 1:
    return loaded[0]
  spec = datasets.spec_of(config.dataset)
  return (create_model(config, spec.num_classes),
          models.ensemble.combine_variables([v for _, v in loaded]))
