"""Entry point: `python -m sre2l_jax.main --config=configs/<exp>.py[:arg] --workdir=DIR`.

Runs the configured stages in order (squeeze, recover, relabel, evaluate; continual on
request); each writes only under `workdir/<stage>/` and resumes by itself when re-run on the
same workdir. The resolved config is written to `workdir/config.json` at start.
"""

import importlib
import os

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sre2l_jax import config_lib
from sre2l_jax import files
from sre2l_jax import multihost

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')
_STAGES = flags.DEFINE_list('stages', None,
                            f'Stages to run, a subset of {",".join(config_lib.STAGES)} '
                            f'(default: config.stages).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (multi-host). Default: on when '
    'SRE2L_DISTRIBUTED=1 or a Cloud TPU / SLURM multi-host environment is detected. '
    'Elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.')
flags.mark_flags_as_required(['config', 'workdir'])



def parse_stages(requested) -> list[str]:
  stages = [s.strip() for s in requested if s.strip()]
  unknown = [s for s in stages if s not in config_lib.STAGES]
  if unknown or not stages:
    raise app.UsageError(f'Unknown stage(s) {unknown}; valid stages: '
                         f'{list(config_lib.STAGES)}.')
  return sorted(stages, key=config_lib.STAGES.index)


def want_distributed() -> bool:
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  env = os.environ
  return (env.get('SRE2L_DISTRIBUTED') == '1' or 'TPU_WORKER_HOSTNAMES' in env
          or int(env.get('SLURM_NTASKS', '1')) > 1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if want_distributed():
    multihost.initialize()  # jax.distributed.initialize(), layout from the environment
  config = _CONFIG.value
  stages = parse_stages(_STAGES.value or config.stages)
  logging.info('sre2l_jax: stages %s on %d devices (%d processes)', stages,
               jax.device_count(), jax.process_count())
  if jax.process_count() > 1:
    multihost.check_same_config(config)
  files.write_json(os.path.join(_WORKDIR.value, 'config.json'), config.to_dict())
  for stage in stages:
    module = importlib.import_module(f'sre2l_jax.{stage}')
    module.run(config, _WORKDIR.value)
    multihost.sync(f'{stage} done')  # the next stage reads what process 0 wrote


if __name__ == '__main__':
  app.run(main)
