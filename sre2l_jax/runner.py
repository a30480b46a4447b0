"""Runs a config's stages on a workdir: the checks of every requested stage first, then the
workdir's lock, then each stage in order (`main.py` is its command line, `api.distill` its
Python entry).

Each stage module has `validate(config, ctx)`, `finished(workdir, config)` and
`run(config, workdir, ctx)`; the `context.Context` they take is resolved once here. The
resolved config is written to `workdir/config.json` after each stage that passed its own
checks (against what the workdir holds) and finished: a refused run leaves the record of the
run whose results the workdir holds.
"""

import importlib
import os
import shlex
import sys

import jax
from absl import app
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import files
from sre2l_jax import multihost
from sre2l_jax.data import user_data


def stage_module(stage: str):
  """The module of stage `stage` (imported here by name: no library imports a stage)."""
  return importlib.import_module(f'sre2l_jax.{stage}')


def parse_stages(requested) -> list[str]:
  stages = [s.strip() for s in requested if s.strip()]
  unknown = [s for s in stages if s not in config_lib.STAGES]
  if unknown or not stages:
    raise app.UsageError(f'Unknown stage(s) {unknown}; valid stages: '
                         f'{list(config_lib.STAGES)}.')
  return sorted(stages, key=config_lib.STAGES.index)


def validate(config, stages: list[str], ctx: context.Context) -> None:
  """Every check the requested stages make before their work, all before the first stage
  runs (a typo in evaluate's settings is not found after an hour of squeeze)."""
  config_lib.check_keys(config)
  for stage in stages:
    stage_module(stage).validate(config, ctx)
  if 'squeeze' in stages and config.squeeze.teacher_dir:
    raise ValueError(
        f'squeeze.teacher_dir={config.squeeze.teacher_dir!r} names the teacher the stages '
        f'read; squeeze would train another one into <workdir>/squeeze/teacher that no stage '
        f'reads. Drop squeeze from --stages to use that teacher, or clear '
        f'squeeze.teacher_dir (--config.squeeze.teacher_dir=) to train one here.')


def run(config, workdir: str, stages, *, dry_run: bool = False) -> dict:
  """Runs `stages` (names) of `config` on `workdir`: {stage: its result} ({} for a dry run).
  A stage that finished already on this workdir under this config returns its result
  without working again. A user's dataset is looked at once for all the stages
  (`user_data.one_look_per_run`)."""
  with user_data.one_look_per_run():
    return _run(config, workdir, stages, dry_run)


def _run(config, workdir: str, stages, dry_run: bool) -> dict:
  if not workdir or not workdir.strip():
    raise app.UsageError('--workdir is empty; name the folder for this run\'s checkpoints and '
                         'outputs, e.g. --workdir=runs/fm.')
  files.check_reachable(workdir)  # gs:// works like a local folder, given gcsfs
  stages = parse_stages(stages)
  config_lib.check_keys(config)  # before the context, which reads the config too
  ctx = context.resolve(config, workdir)
  validate(config, stages, ctx)
  if dry_run:
    fits = True
    for stage in stages:
      module = stage_module(stage)
      if hasattr(module, 'plan'):
        fits &= module.plan(config, workdir, ctx)['fits']
      else:
        print(f'{stage}: no memory plan (the dry run covers recover)')
    if not fits:
      raise MemoryError('The plan above does not fit: see the knob and the value that fits '
                        'on the line that says so.')
    return {}
  logging.info('sre2l_jax: stages %s on %d devices (%d processes)', stages,
               jax.device_count(), jax.process_count())
  if jax.process_count() > 1:
    multihost.check_same_config(config)
  lock = take_lock(workdir)
  stop_keeping = checkpoint.keep_lock(workdir, lock)
  results = {}
  try:
    for stage in stages:
      results[stage] = stage_module(stage).run(config, workdir, ctx)
      files.write_json(os.path.join(workdir, 'config.json'), config.to_dict())
      multihost.sync(f'{stage} done')  # the next stage reads what process 0 wrote
  finally:
    stop_keeping()
    checkpoint.release_lock(workdir, lock)
  return results


def resume_command() -> str:
  """The command line of this run, to be run again."""
  return ' '.join([shlex.quote(sys.executable), '-m', 'sre2l_jax.main'] +
                  [shlex.quote(a) for a in sys.argv[1:]])


def take_lock(workdir: str) -> dict | None:
  """Process 0 takes the workdir's lock (None on the others); every process of the job
  refuses together when it is held."""
  lock, refused = None, ''
  if jax.process_index() == 0:
    try:
      lock = checkpoint.take_lock(workdir, resume_command())
    except checkpoint.WorkdirBusyError as e:
      refused = str(e)
  if jax.process_count() > 1:
    refused = multihost.broadcast_text(refused)
  if refused:
    raise checkpoint.WorkdirBusyError(refused)
  return lock
