"""The frozen teacher of a run: where it lives, and loading it checked against the config
(recover, relabel, evaluate and continual all read it; squeeze writes it). Its folder's
format (saving, reading, `teacher.json`) is `teacher_store`'s.

The teacher's digest is what the stages key their results on (`digest`): a teacher trained
again, or another teacher put in the same folder, has another digest, whatever its config.
"""

import hashlib
import os

import ml_collections

from sre2l_jax import files
from sre2l_jax import models
from sre2l_jax import teacher_store
from sre2l_jax.data import batching
from sre2l_jax.data import datasets


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the teacher is read: config.squeeze.teacher_dir, or the squeeze stage's output."""
  return config.squeeze.teacher_dir or os.path.join(workdir, 'squeeze', 'teacher')


def teacher_meta(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec,
                 test_top1: float | None = None) -> dict:
  return {'signature': models.model_signature(config.teacher, spec.num_classes,
                                              spec.image_shape),
          'dataset': spec.name, 'test_top1': test_top1}


def load_one(config: ml_collections.ConfigDict, workdir: str, mesh):
  """(model, variables) of config.teacher alone (not its extra teachers), replicated on
  `mesh`, checked against config."""
  spec = datasets.spec_of(config.dataset)
  model = models.create_model(config.teacher, spec.num_classes)
  abstract = models.abstract_variables(model, spec.image_shape, batching.replicated(mesh))
  hint = (f'python -m sre2l_jax.main --config=<config> --workdir={workdir} --stages=squeeze '
          f'(or import a PyTorch teacher with python -m sre2l_jax.models.torch_import)')
  variables, _ = teacher_store.read(teacher_dir(config, workdir),
                                    teacher_meta(config, spec)['signature'], abstract, hint)
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
    path = os.path.join(teacher_dir(cfg, wd), teacher_store.META)
    found = files.read_json(path).get('digest') if files.exists(path) else None
    if found is None:  # derived here (process 0 also records it; the others may not see it yet)
      found = teacher_store.variables_digest(load_one(cfg, wd, mesh)[1])
    digests.append(found)
  if len(digests) == 1:
    return digests[0]
  return hashlib.sha256(' '.join(digests).encode()).hexdigest()


def load_all(config: ml_collections.ConfigDict, workdir: str, mesh) -> list:
  """[(model, variables)] of config.teacher, then each of teacher.extra_teachers."""
  return [load_one(config, workdir, mesh)] + [
      load_one(extra, extra_workdir, mesh)
      for extra, extra_workdir in extra_configs(config, workdir)]


RECOVER_TEACHERS = ('all', 'main')


def for_recover(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config recover runs and records: `config` itself, or with recover.teachers='main'
  a copy without teacher.extra_teachers (the images matched against config.teacher alone;
  relabel and evaluate read `config` and average every teacher's soft labels). Without
  extra teachers 'main' and 'all' compute the same and are recorded as 'all', so a workdir
  recovered under one is resumed and relabelled under the other."""
  teachers = config.recover.get('teachers', 'all')
  if teachers not in RECOVER_TEACHERS:
    raise ValueError(f"recover.teachers={teachers!r}; valid: 'all' (recover against every "
                     f"teacher, their losses summed) or 'main' (against config.teacher alone; "
                     f"the extra teachers only label).")
  if teachers == 'all':
    return config
  alone = ml_collections.ConfigDict(config.to_dict())
  if config.teacher.extra_teachers:
    alone.teacher.extra_teachers = ()
  else:
    alone.recover.teachers = 'all'
  return alone


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
