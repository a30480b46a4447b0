"""The package as a user installs it: a wheel (not editable) in a venv of its own, the
console scripts, configs by name, the Python API's documented example; config names and
paths from a checkout."""

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

from sre2l_jax import config_lib
from sre2l_jax import main
import testlib

# What a wheel is built from (a copy, so the checkout gets no build/ or egg-info).
SOURCES = ('setup.py', 'setup.cfg', 'pyproject.toml', 'README.md', 'LICENSE', 'sre2l_jax',
           'configs')


def _api_example() -> str:
  """The Python block of docs/your_data.md's API section."""
  with open(os.path.join(testlib.REPO, 'docs', 'your_data.md')) as f:
    text = f.read()
  return re.search(r'## The Python API.*?```python\n(.*?)```', text, re.S).group(1)


def test_config_by_name_or_path():
  by_name = config_lib.load_config_file('fashion_mnist_ipc10', 'smoke')
  by_path = config_lib.load_config_file(testlib.config_file('fashion_mnist_ipc10'), 'smoke')
  assert by_name.to_dict() == by_path.to_dict()
  assert 'fashion_mnist_ipc10' in config_lib.shipped_configs()
  argv = main.expand_config_name(['x', '--config=fashion_mnist_ipc10:smoke,ipc=1',
                                  '--config', 'configs/in1k_ipc50.py:smoke'])
  assert argv == ['x', f'--config={testlib.config_file("fashion_mnist_ipc10")}:smoke,ipc=1',
                  '--config', 'configs/in1k_ipc50.py:smoke']
  with pytest.raises(ValueError, match="no config named 'fashion_mnist'; shipped configs: "):
    config_lib.config_path('fashion_mnist')


@pytest.mark.slow  # ~1-2 min: a wheel, a venv, every stage of the smoke config
def test_wheel_in_a_clean_venv_runs_every_stage(tmp_path):
  source = tmp_path / 'source'
  source.mkdir()
  for name in SOURCES:
    copy = shutil.copytree if os.path.isdir(os.path.join(testlib.REPO, name)) else shutil.copy
    copy(os.path.join(testlib.REPO, name), source / name, *(
        [] if copy is shutil.copy else [False, shutil.ignore_patterns('__pycache__')]))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(source)], check=True)
  wheel, = (tmp_path / 'dist').iterdir()
  names = zipfile.ZipFile(wheel).namelist()
  for member in ('sre2l_jax/configs/fashion_mnist_ipc10.py', 'sre2l_jax/py.typed',
                 'sre2l_jax/data/user_data.py'):
    assert member in names, member
  assert any(n.endswith('licenses/LICENSE') or n.endswith('/LICENSE') for n in names)

  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  python = str(venv / 'bin' / 'python')
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-index',
                  str(wheel)], check=True)
  # The dependencies (jax, flax, tfds, ...) from this environment's site-packages, as a
  # plain path: its .pth files, among them a checkout's editable hook, are not run.
  packages = subprocess.run([python, '-c', 'import site; print(site.getsitepackages()[0])'],
                            check=True, capture_output=True, text=True).stdout.strip()
  with open(os.path.join(packages, 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')

  home = tmp_path / 'home'  # ~/tensorflow_datasets of the commands: the test's own
  home.mkdir()
  env = {**os.environ, 'HOME': str(home)}
  env.pop('PYTHONPATH', None)
  where = subprocess.run([python, '-c', 'import sre2l_jax; print(sre2l_jax.__file__)'],
                         cwd=home, env=env, check=True, capture_output=True, text=True)
  assert where.stdout.startswith(str(venv)), where.stdout
  subprocess.run([str(venv / 'bin' / 'sre2l-jax'), '--config=fashion_mnist_ipc10:smoke',
                  '--workdir=runs/fm_smoke'],
                 cwd=home, env=env, check=True, capture_output=True, timeout=600)
  assert (home / 'runs' / 'fm_smoke' / 'evaluate' / 'result.json').exists()
  loaded = subprocess.run(
      [python, '-c', "import sre2l_jax; print(sre2l_jax.load_distilled('runs/fm_smoke'))"],
      cwd=home, env=env, check=True, capture_output=True, text=True)
  assert "'T-shirt/top', 'Trouser'" in loaded.stdout
  # The documented example on the same workdir: every stage has finished, it reads them.
  example = subprocess.run([python, '-c', _api_example()], cwd=home, env=env, check=True,
                           capture_output=True, text=True, timeout=600)
  assert '(100, 28, 28, 1) uint8' in example.stdout and "'random'" in example.stdout
  report = subprocess.run([str(venv / 'bin' / 'sre2l-jax-report'), '--help'], cwd=home,
                          env=env, check=True, capture_output=True, text=True)
  assert '--workdirs' in report.stdout


def test_unknown_config_name_is_one_line(tmp_path):
  completed = subprocess.run(
      [sys.executable, '-m', 'sre2l_jax.main', '--config=fashion_mnist_ipc1:smoke',
       f'--workdir={tmp_path / "w"}'], cwd=testlib.REPO, capture_output=True, text=True,
      timeout=300, check=False)
  assert completed.returncode == 1
  assert completed.stderr.strip().splitlines() == [
      f"sre2l_jax: --config=fashion_mnist_ipc1:smoke: no config named 'fashion_mnist_ipc1'; "
      f"shipped configs: {', '.join(config_lib.shipped_configs())}; or give the path of a "
      f"config file."]
  assert not (tmp_path / 'w').exists()
