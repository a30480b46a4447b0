"""The Fashion-MNIST smoke pipeline as a user runs it: quiet output with a progress line and
ETA per stage, metrics of every stage in files, and no TensorFlow (nor torch) imported."""

import json
import os
import sys

import pytest

from sre2l_jax import metric_writers

import testlib

# Runs `python -m sre2l_jax.main ARGS` and, at exit, writes the top-level packages it had
# imported to the file named by the first argument.
WRAPPER = '''
import atexit, runpy, sys
out = sys.argv.pop(1)
def dump():
  with open(out, 'w') as f:
    f.write('\\n'.join(sorted({m.split('.')[0] for m in sys.modules})))
atexit.register(dump)
runpy.run_module('sre2l_jax.main', run_name='__main__', alter_sys=True)
'''
# The run printed 33 lines on 2026-11-29 (36 where it also prepares Fashion-MNIST; the
# default command's budget is 60).
MAX_LINES = 50


def run_main(tmp_path, workdir, data, *, stages, flags=(), overrides=()):
  command = testlib.main_command('fashion_mnist_ipc10', workdir, stages=stages, flags=flags,
                                 overrides={**data, **dict(overrides)})
  modules = tmp_path / f'modules_{os.path.basename(workdir)}.txt'
  completed = testlib.run_command([sys.executable, '-c', WRAPPER, str(modules), *command[3:]],
                                  timeout_s=600)
  return completed.stdout + completed.stderr, set(modules.read_text().split())


@pytest.fixture(scope='module')
def data_flags(data):
  """--config overrides that read conftest's cut Fashion-MNIST."""
  return {f'dataset.{k}': v for k, v in data.items()}


@pytest.mark.slow
def test_smoke_pipeline_is_quiet_shows_eta_per_stage_and_imports_no_tensorflow(data_flags,
                                                                              tmp_path):
  workdir = tmp_path / 'run'
  output, modules = run_main(tmp_path, workdir, data_flags,
                             stages='squeeze,recover,relabel,evaluate',
                             overrides={'relabel.mode': 'stored'})
  lines = output.splitlines()
  assert len(lines) < MAX_LINES, output
  assert 'tensorflow' not in modules and 'torch' not in modules and 'clu' not in modules
  for stage in ('squeeze: step', 'recover round 1/1: step', 'relabel distilled: step',
                'relabel random: step', 'evaluate '):
    eta = [line for line in lines if stage in line and '| ETA ' in line]
    assert eta, f'no progress line for {stage!r}:\n{output}'
  assert 'squeeze: step 16/16 (100%) loss ' in output
  assert not [line for line in lines if 'orbax' in line.lower() or 'checkpoint_manager' in line]

  # Every stage's metrics and resolved config: one TensorBoard run (folder) per stage.
  for stage in ('squeeze', 'recover', 'relabel'):
    logs = workdir / stage / 'logs'
    assert [n for n in os.listdir(logs) if n.startswith('events.out.tfevents.')], stage
    hparams = json.loads((logs / 'hparams.json').read_text())
    assert hparams['dataset']['data_dir'] == data_flags['dataset.data_dir']
  squeeze = metric_writers.read_metrics(workdir / 'squeeze' / 'logs' / 'metrics.jsonl')
  assert {'train_loss', 'train_accuracy', 'lr', 'images_per_second'} <= set(squeeze[0])
  assert [r['step'] for r in squeeze if 'test_top1' in r] == [8, 16]  # per epoch
  recover = metric_writers.read_metrics(workdir / 'recover' / 'logs' / 'metrics.jsonl')
  assert {'loss', 'bn_loss', 'ce', 'lr', 'bn/bn0', 'bn/bn1', 'bn/bn2'} <= set(recover[0])
  # The per-layer terms are those of the BN loss (first layer weighted by 10 in the smoke
  # config's first_bn_multiplier).
  first = recover[0]
  assert first['bn_loss'] == pytest.approx(10 * first['bn/bn0'] + first['bn/bn1'] +
                                           first['bn/bn2'], rel=1e-4)
  relabel = metric_writers.read_metrics(workdir / 'relabel' / 'logs' / 'metrics.jsonl')
  assert relabel[0]['distilled/shards'] == 2 and relabel[0]['distilled/views_per_second'] > 0


@pytest.mark.slow
def test_verbosity_1_shows_library_logs(data_flags, tmp_path):
  output, _ = run_main(tmp_path, tmp_path / 'loud', data_flags, stages='squeeze',
                       flags=['--verbosity=1'])
  assert 'checkpoint_manager.py' in output  # Orbax's INFO lines, in absl's format
  assert 'squeeze: step 16/16 (100%)' in output
