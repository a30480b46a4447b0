"""launch/setup.sh on a machine like a stock Debian/Ubuntu: a project `.venv`, venv added by
apt where it is missing, torch only for the tests; the README's commands use `.venv`.

The set-up itself, for real, runs in CI: launch/test.sh runs it under a PATH of system folders
only before the suite. Here a stub `python3` stands in for the interpreter, so that the
script's decisions are checked in a second.
"""

import json
import os
import re
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = '/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz'

# Records every call; `python3 -m venv` fails until apt has installed python3-venv (as on a
# stock Debian, where ensurepip is missing), then makes a .venv whose python is this stub too.
STUB = '''#!{python}
import json, os, subprocess, sys
root = os.environ['STUB_ROOT']
prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
if prog == 'sudo':
  sys.exit(subprocess.call(argv))
with open(os.path.join(root, 'calls.jsonl'), 'a') as f:
  f.write(json.dumps({{'prog': sys.argv[0].replace(os.getcwd() + '/', ''), 'argv': argv}}) + '\\n')
if prog == 'apt-get' and 'python3-venv' in argv:
  open(os.path.join(root, 'venv-installed'), 'w').close()
if argv[:2] == ['-m', 'venv']:
  os.makedirs(os.path.join(argv[2], 'bin'))  # half made, as venv leaves it when it fails
  if not os.path.exists(os.path.join(root, 'venv-installed')):
    sys.exit('The virtual environment was not created successfully because ensurepip is not '
             'available.')
  os.symlink(sys.argv[0], os.path.join(argv[2], 'bin', 'python'))
if argv[:1] == ['-c'] and 'version_info' in argv[1] and os.environ.get('STUB_PYTHON_310'):
  sys.exit(1)
if argv[:1] == ['-c'] and 'import torch' in argv[1]:
  sys.exit(0 if os.path.exists(os.path.join(root, 'torch-installed')) else 1)
if argv[:3] == ['-m', 'pip', 'install'] and 'torch==2.13.0' in argv:
  open(os.path.join(root, 'torch-installed'), 'w').close()
'''


def _checkout(tmp_path):
  """A folder with launch/setup.sh and a bin/ of stubs for python3, apt-get and sudo."""
  repo = tmp_path / 'repo'
  (repo / 'launch').mkdir(parents=True)
  shutil.copy(os.path.join(REPO, 'launch', 'setup.sh'), repo / 'launch' / 'setup.sh')
  for name in ('setup.cfg', 'setup.py', 'pyproject.toml'):
    shutil.copy(os.path.join(REPO, name), repo / name)
  stubs = tmp_path / 'bin'
  stubs.mkdir()
  for name in ('python3', 'apt-get', 'sudo'):
    (stubs / name).write_text(STUB.format(python=sys.executable))
    (stubs / name).chmod(0o755)
  return repo, stubs


def _run(repo, stubs, *args, **env):
  env = {'PATH': f'{stubs}:/usr/bin:/bin', 'HOME': str(repo), 'STUB_ROOT': str(stubs), **env}
  return subprocess.run(['bash', str(repo / 'launch' / 'setup.sh'), *args], cwd='/', env=env,
                        capture_output=True, text=True, timeout=60, check=False)


def _setup(repo, stubs, *args):
  completed = _run(repo, stubs, *args)
  assert completed.returncode == 0, completed.stderr
  calls = [json.loads(line) for line in (stubs / 'calls.jsonl').read_text().splitlines()]
  (stubs / 'calls.jsonl').unlink()
  return [[c['prog'], *c['argv']] for c in calls if c['prog'] != 'sudo' and '-c' not in
          c['argv'][:1] and c['argv'][:3] != ['-m', 'pip', '--version']]


def test_setup_makes_a_venv_adding_python3_venv_by_apt_and_reuses_it(tmp_path):
  repo, stubs = _checkout(tmp_path)
  python3 = str(stubs / 'python3')
  apt = str(stubs / 'apt-get')
  # Where the Debian package with Fashion-MNIST is missing, apt installs it first.
  data = [] if os.path.exists(FASHION_MNIST) else [[apt, 'update', '-qq'], [
      apt, 'install', '-y', '-qq', 'dataset-fashion-mnist']]
  assert _setup(repo, stubs) == data + [
      [python3, '-m', 'venv', '.venv'],
      *([[apt, 'update', '-qq']] if not data else []),  # apt's index is read once
      [apt, 'install', '-y', '-qq', 'python3-venv'],
      [python3, '-m', 'venv', '.venv'],
      ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.']]  # no torch
  assert _setup(repo, stubs) == []  # done: nothing to install
  # The tests' set-up: torch 2.13.0's CPU build (PyPI's is a CUDA build), the test extras,
  # in the same environment.
  assert _setup(repo, stubs, '--test') == [
      ['.venv/bin/python', '-m', 'pip', 'install', '-q', 'torch==2.13.0',
       '--extra-index-url', 'https://download.pytorch.org/whl/cpu', '--retries', '0'],
      ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.[test]']]
  assert _setup(repo, stubs, '--test') == _setup(repo, stubs) == []
  # New requirements are installed; torch, there already, is not installed again.
  with open(repo / 'setup.cfg', 'a') as f:
    f.write('\n# changed\n')
  assert _setup(repo, stubs, '--test') == [
      ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.[test]']]


def test_setup_without_sudo_skips_the_data_and_still_makes_the_venv(tmp_path):
  # A cluster login node: not root, sudo asks for a password it will not get, no Fashion-MNIST.
  repo, stubs = _checkout(tmp_path)
  (stubs / 'id').write_text('#!/bin/sh\necho 1000\n')
  (stubs / 'sudo').write_text('#!/bin/sh\necho "sudo: a password is required" >&2\nexit 1\n')
  for name in ('id', 'sudo'):
    (stubs / name).chmod(0o755)
  (stubs / 'venv-installed').touch()  # this python3's venv works
  no_data = str(tmp_path / 'no-fashion-mnist')
  completed = _run(repo, stubs, FASHION_MNIST_DIR=no_data)
  assert completed.returncode == 0, completed.stderr
  assert 'not installing the Fashion-MNIST package (dataset-fashion-mnist): no root and no ' \
         'sudo here' in completed.stderr
  assert '--config.dataset.source_dir=<that folder>' in completed.stderr
  calls = [json.loads(line) for line in (stubs / 'calls.jsonl').read_text().splitlines()]
  made = [[c['prog'], *c['argv']] for c in calls if c['argv'][:1] != ['-c']
          and c['argv'][:3] != ['-m', 'pip', '--version']]
  assert made == [[str(stubs / 'python3'), '-m', 'venv', '.venv'],
                  ['.venv/bin/python', '-m', 'pip', 'install', '-q', '-e', '.']]
  # --no-data: not even the line.
  (stubs / 'calls.jsonl').unlink()
  shutil.rmtree(repo / '.venv')
  completed = _run(repo, stubs, '--no-data', FASHION_MNIST_DIR=no_data)
  assert completed.returncode == 0 and 'Fashion-MNIST' not in completed.stderr

  # python3-venv missing as well: the venv cannot be made; one line says what to do.
  os.unlink(stubs / 'venv-installed')
  shutil.rmtree(repo / '.venv')
  completed = _run(repo, stubs, '--no-data')
  assert completed.returncode == 1
  assert 'ask an admin for python3-venv, or name a Python that has venv with PYTHON=' in (
      completed.stderr)
  calls = [json.loads(line) for line in (stubs / 'calls.jsonl').read_text().splitlines()]
  assert not [c for c in calls if c['prog'].endswith('apt-get')]


def test_setup_refuses_a_python_older_than_3_11(tmp_path):
  repo, stubs = _checkout(tmp_path)
  completed = _run(repo, stubs, STUB_PYTHON_310='1')
  assert completed.returncode == 1
  assert 'older than Python 3.11' in completed.stderr
  assert not (repo / '.venv').exists()


def test_venv_is_ignored_by_git():
  completed = subprocess.run(['git', 'check-ignore', '-q', '.venv/bin/python'], cwd=REPO,
                             check=False)
  assert completed.returncode == 0


def test_readme_commands_run_in_the_project_environment():
  with open(os.path.join(REPO, 'README.md')) as f:
    section = f.read().split('## The two commands', 1)[1].split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  commands = [line for line in block.splitlines() if line and not line.startswith('#')]
  assert commands == [
      'bash launch/setup.sh && .venv/bin/python -m sre2l_jax.main '
      '--config=configs/fashion_mnist_ipc10.py --workdir=runs/fm',
      'bash launch/test.sh']
  with open(os.path.join(REPO, '.ci', 'run')) as f:
    assert f.read().rstrip().splitlines()[-1] == 'bash launch/test.sh'
  with open(os.path.join(REPO, 'launch', 'test.sh')) as f:
    test_sh = f.read()
  assert 'bash launch/setup.sh --test' in test_sh
  assert '\n.venv/bin/python -m pytest ' in test_sh
