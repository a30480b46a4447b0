"""Entry point: `python -m sre2l_jax.main --config=configs/<exp>.py[:arg] --workdir=DIR`.

The command line only: flags, output, errors; `runner.run` runs the configured stages in
order (squeeze, recover, relabel, evaluate; continual on request). Each writes only under
`workdir/<stage>/` and resumes by itself when re-run on the same workdir. Every requested
stage's settings are checked before anything is written. One run at a time per workdir:
`workdir/lock.json` (host, pid, start) is taken first and released on exit
(`checkpoint.take_lock`).

Errors reach the user as one line (what is wrong and the fix) and exit code 1; the
traceback is shown with --verbosity=1. Ctrl-C: one line with the command that resumes.

Output: by default this project's own lines only (a few per stage, and each loop's progress
line with its ETA; `metric_writers.Progress`) and every library's warnings, as 'HH:MM:SS
text'; --verbosity=1 adds every library's INFO log (Orbax, TFDS, JAX) in absl's format.
Metrics go to files (`workdir/<stage>/logs/`: TensorBoard events, metrics.jsonl), not here.
"""

import difflib
import logging as std_logging
import os
import sys
import time

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import metric_writers
from sre2l_jax import multihost
from sre2l_jax import runner
from sre2l_jax import train_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and outputs.')
_STAGES = flags.DEFINE_list('stages', None,
                            f'Stages to run, a subset of {",".join(config_lib.STAGES)} '
                            f'(default: config.stages).')
_OVERWRITE = flags.DEFINE_bool(
    'overwrite', False, 'Replace a teacher or stored labels that exist instead of refusing '
    '(sets config.overwrite).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', None, 'Call jax.distributed.initialize() (multi-host). Default: on when '
    'SRE2L_DISTRIBUTED=1, on a Cloud TPU VM (TPU chips among its PCI devices), on GKE TPU '
    'pods and under SLURM with several tasks. '
    'Elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.')
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Print each stage\'s memory plan (its step compiled at the real shapes, '
    'nothing allocated, no data or teacher read) and exit; e.g. with '
    '--config.recover.device_memory_gb=80.')
_METRIC_WRITER = flags.DEFINE_enum(
    'metric_writer', 'tensorboardx', metric_writers.BACKENDS,
    'What writes the TensorBoard event files: tensorboardx (no TensorFlow) or clu (clu\'s '
    'TensorFlow writer: pip install -e ".[tensorflow]"). metrics.jsonl is written either way.')
flags.mark_flags_as_required(['config', 'workdir'])

# Errors whose message says what is wrong and what to do; anything else also names its type.
USER_ERRORS = (ValueError, OSError, app.UsageError, train_lib.DivergedError,
               train_lib.CheckpointError, train_lib.NotConvergedError, MemoryError)


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class QuietFilter(std_logging.Filter):
  """Passes warnings and errors, and INFO lines logged from this package on process 0."""

  # Set once JAX's backend is up (asking here could start it inside a log call: deadlock).
  process_index = 0

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return (record.levelno >= std_logging.INFO and self.process_index == 0 and
            os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep))


class ShortFormatter(std_logging.Formatter):
  """'HH:MM:SS text' ('HH:MM:SS WARNING: text' for warnings and errors)."""

  def format(self, record: std_logging.LogRecord) -> str:
    level = '' if record.levelno < std_logging.WARNING else f'{record.levelname}: '
    text = f'{time.strftime("%H:%M:%S", time.localtime(record.created))} {level}'
    return text + record.getMessage()


def configure_output() -> None:
  """Below --verbosity=1, this project's INFO lines and everyone's warnings, short; from 1
  on, absl's logging as it is (every library's INFO, with absl's prefixes)."""
  if logging.get_verbosity() >= 1:
    return
  handler = logging.get_absl_handler()
  quiet = QuietFilter()
  handler.addFilter(quiet)
  handler.python_handler.setFormatter(ShortFormatter())
  quiet.process_index = jax.process_index()  # starts the backend (its INFO lines filtered)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    tfds.disable_progress_bar()  # dataset preparation: dozens of progress-bar lines
  except ImportError:
    pass


def want_distributed() -> bool:
  if _DISTRIBUTED.value is not None:
    return _DISTRIBUTED.value
  env = os.environ
  return (env.get('SRE2L_DISTRIBUTED') == '1' or 'TPU_WORKER_HOSTNAMES' in env
          or multihost.on_cloud_tpu_vm() or int(env.get('SLURM_NTASKS', '1')) > 1)


def one_line(error: BaseException) -> str:
  """An error as one line for the terminal: its message, whitespace folded."""
  if isinstance(error, USER_ERRORS):
    text = ' '.join(str(error).split())
    return text if len(text) <= 1500 else text[:1500] + '...'
  return (f'{type(error).__name__}: {train_lib.one_line(error)} (the traceback: re-run with '
          f'--verbosity=1)')


def _traceback_wanted(argv) -> bool:
  for arg in argv:
    if arg.startswith(('--verbosity=', '-v=')):
      try:
        return int(arg.split('=', 1)[1]) >= 1
      except ValueError:
        return False
  return logging.get_verbosity() >= 1


def explain_flag_error(argv, error: Exception) -> str:
  """One line for an error while parsing the flags: a config file that fails to load, an
  override of a key that does not exist (with the closest keys), a value of the wrong type."""
  config_arg = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  if config_arg:
    path, _, arg = config_arg.partition(':')
    try:
      config = config_lib.load_config_file(path, arg or None)
    except Exception as e:  # pylint: disable=broad-except
      return f'--config={config_arg}: {" ".join(str(e).split()) or type(e).__name__}'
    for flag in argv:
      if not flag.startswith('--config.'):
        continue
      key = flag[len('--config.'):].split('=', 1)[0]
      if key in config_lib.MOVED:
        return f'--config.{key}: {key} is now {config_lib.MOVED[key]}; use --config.' \
               f'{config_lib.MOVED[key]}.'
      node, walked = config, []
      for part in key.split('.'):
        children = list(node.keys()) if hasattr(node, 'keys') else []
        if part not in children:
          close = difflib.get_close_matches(part, children, n=3)
          prefix = '.'.join(walked)
          hint = (f' Did you mean {", ".join((prefix + "." if prefix else "") + c for c in close)}?'
                  if close else '')
          return (f'--config.{key}: the config has no key {".".join(walked + [part])}.'
                  f'{hint}')
        node, walked = node[part], walked + [part]
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  # A config file's own exception comes embedded after a traceback: its last line says it.
  text = lines[-1] if any(line.startswith('Traceback') for line in lines) else ' '.join(lines)
  return text or type(error).__name__


def expand_config_name(argv: list[str]) -> list[str]:
  """`--config=NAME[:arg]` (a shipped config, `config_lib.config_path`) as its file's path,
  which is what absl's config flag reads; paths are left as they are."""
  out = list(argv)
  for i, item in enumerate(out):
    if item.startswith('--config='):
      path, colon, arg = item[len('--config='):].partition(':')
      out[i] = f'--config={config_lib.config_path(path)}{colon}{arg}'
    elif item == '--config' and i + 1 < len(out):
      path, colon, arg = out[i + 1].partition(':')
      out[i + 1] = f'{config_lib.config_path(path)}{colon}{arg}'
  return out


def parse_flags(argv):
  """absl's flag parsing, with errors as one line and exit code 1."""
  try:
    argv = expand_config_name(argv)
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if _traceback_wanted(argv):
      raise
    print(f'sre2l_jax: {explain_flag_error(argv, e)}', file=sys.stderr)
    sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  try:
    multihost.set_cpu_devices(config.get('cpu_devices', 0))  # before JAX's backends start
  except ValueError as e:
    print(f'sre2l_jax: {e}', file=sys.stderr)
    sys.exit(1)
  if want_distributed():
    multihost.initialize()  # jax.distributed.initialize(), layout from the environment
  configure_output()
  metric_writers.set_default_backend(_METRIC_WRITER.value)
  if logging.get_verbosity() < 1:
    # Background-thread leftovers of a failed read (e.g. TensorStore's "Event loop is
    # closed") would print a traceback before the one-line error; --verbosity=1 shows them.
    sys.unraisablehook = lambda unraisable: logging.debug(
        'ignored in %s: %r', unraisable.object, unraisable.exc_value)
    # Likewise asyncio's report, when it is collected (at exit, after the one-line error),
    # of such a read's task whose exception the failed read already raised.
    std_logging.getLogger('asyncio').addFilter(
        lambda record: 'exception was never retrieved' not in record.getMessage())
  if _OVERWRITE.value:
    config.overwrite = True
  try:
    runner.run(config, _WORKDIR.value, _STAGES.value or config.stages, dry_run=_DRY_RUN.value)
  except checkpoint.PreemptedError as e:  # saved: a launcher resumes it (exit 143, as TERM)
    print(f'sre2l_jax: {e}', file=sys.stderr)
    logging.flush()
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    if logging.get_verbosity() >= 1:
      raise
    print(f'sre2l_jax: interrupted (Ctrl-C); finished work and the last checkpoints are kept. '
          f'Resume with: {runner.resume_command()}', file=sys.stderr)
    logging.flush()
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except
    if logging.get_verbosity() >= 1:
      raise
    print(f'sre2l_jax: {one_line(e)}', file=sys.stderr)
    logging.flush()
    sys.exit(1)


def cli():
  """The `sre2l-jax` console script: `python -m sre2l_jax.main`'s command line."""
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
