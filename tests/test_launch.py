"""Launchers: the Colab notebook runs the Fashion-MNIST smoke pipeline headless (no network:
its install cell is skipped when the package is importable), and the shell launchers parse
and refuse to start without their required settings."""

import glob
import os
import re
import subprocess

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
NOTEBOOK = os.path.join(LAUNCH, 'colab.ipynb')


def test_colab_notebook_runs_the_smoke_pipeline(fashion_mnist_tfds, tmp_path, monkeypatch):
  workdir = tmp_path / 'work'
  # The kernel inherits this environment: one CPU device (less overhead than 8 fake ones on
  # a small machine), a fresh workdir, the session's prepared Fashion-MNIST.
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', '')).strip()
  monkeypatch.setenv('XLA_FLAGS', flags)
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('SRE2L_WORKDIR', str(workdir))
  monkeypatch.setenv('SRE2L_DATA_DIR', fashion_mnist_tfds)
  monkeypatch.setenv('SRE2L_CONFIG_ARG', 'smoke')
  monkeypatch.setenv('SRE2L_REPO_URL', 'http://invalid.invalid/no-network.git')
  monkeypatch.delenv('SRE2L_FASHION_MNIST_DIR', raising=False)

  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': REPO}})
  client.execute()

  assert (workdir / 'recover' / 'grid.png').stat().st_size > 0
  report = (workdir / 'report.md').read_text()
  assert report.startswith('# SRe2L report: fashion_mnist')
  for stage in ('squeeze', 'recover', 'relabel', 'evaluate'):
    assert (workdir / stage / 'result.json').exists()

  outputs = [o for cell in notebook.cells if cell.cell_type == 'code' for o in cell.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  # The package came from this checkout: nothing was cloned or installed.
  assert f'sre2l_jax from {os.path.join(REPO, "sre2l_jax")}' in text
  assert not os.path.exists(os.path.join(REPO, 'sre2l_jax_repo'))
  assert 'student on distilled: top-1' in text
  shown = [o for o in outputs if o.output_type == 'display_data']
  assert any('image/png' in o.data for o in shown)
  assert any(o.data.get('text/markdown', '').startswith('# SRe2L report') for o in shown)
  assert not [o for o in outputs if o.output_type == 'error']


@pytest.mark.parametrize('script', sorted(glob.glob(os.path.join(LAUNCH, '*.sh'))),
                         ids=os.path.basename)
def test_launch_scripts_parse(script):
  completed = subprocess.run(['bash', '-n', script], capture_output=True, text=True,
                             check=False)
  assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize('name', ['tpu_pod.sh', 'gpu.sh', 'multi_gpu.sh'])
def test_launchers_stop_on_errors(name):
  with open(os.path.join(LAUNCH, name)) as f:
    assert 'set -euo pipefail' in f.read()


def _run(script, *args, **env):
  clean = {k: v for k, v in os.environ.items()
           if not k.startswith(('SLURM_', 'PROJECT', 'BUCKET', 'COORDINATOR'))}
  return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], cwd=REPO,
                        capture_output=True, text=True, check=False, timeout=60,
                        env={**clean, **env})


def test_tpu_pod_needs_project_and_bucket():
  completed = _run('tpu_pod.sh')
  assert completed.returncode != 0 and 'set PROJECT' in completed.stderr
  completed = _run('tpu_pod.sh', PROJECT='p')
  assert completed.returncode != 0 and 'set BUCKET' in completed.stderr
  completed = _run('tpu_pod.sh', 'nonsense', PROJECT='p', BUCKET='b')
  assert completed.returncode == 2 and 'usage' in completed.stderr


def test_multi_gpu_needs_slurm_or_a_coordinator(tmp_path):
  completed = _run('multi_gpu.sh', 'configs/in1k_ipc50.py', str(tmp_path))
  assert completed.returncode == 2 and 'COORDINATOR' in completed.stderr
