"""`configs/in1k_ipc50.py:smoke`, the check to run before a real pod job, on the device count
of the TPU launcher's default slice: 16 (a v4-32). Every stage runs on mock ImageNet (the
helpers of test_in1k_smoke.py) in a subprocess, because conftest fixes 8 fake CPU devices in
this one (test_in1k_smoke.py runs the same stages there, on 8).

The suite runs 16 only: 32 (4 nodes x 8 GPUs, launch/multi_gpu.sh) takes the same code paths
(every batch of 32 splits evenly, the 8 recover groups are padded up to the device count) and
cost 4.5 minutes of the suite's 2 cores. Before a job on another count, run it on that count:
  SRE2L_SMOKE_DEVICES=32 .venv/bin/python -m pytest tests/test_launch_smoke_devices.py
"""

import json
import os
import re
import subprocess
import sys

import pytest

import testlib

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

# Runs in the subprocess: argv = root folder, expected device count.
SMOKE = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import jax
assert jax.device_count() == int(sys.argv[2]), jax.devices()
import test_in1k_smoke as smoke
from sre2l_jax import context, evaluate, recover, relabel, squeeze
config = smoke.smoke_config(sys.argv[1])
workdir = os.path.join(sys.argv[1], 'work')
with smoke.mock_imagenet():
  ctx = context.resolve(config, workdir)
  results = {{stage.__name__.rsplit('.', 1)[-1]: stage.run(config, workdir, ctx)
             for stage in (squeeze, recover, relabel, evaluate)}}
print('RESULTS', json.dumps(results, default=str))
'''


@pytest.mark.slow
@pytest.mark.parametrize(
    'devices', [int(n) for n in os.environ.get('SRE2L_SMOKE_DEVICES', '16').split(',')])
def test_in1k_smoke_runs_on(devices, tmp_path):
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={devices}'.strip()}
  completed = subprocess.run(
      [sys.executable, '-c', SMOKE.format(tests=TESTS), str(tmp_path), str(devices)],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, check=False)
  assert completed.returncode == 0, completed.stderr[-5000:]
  line = next(l for l in completed.stdout.splitlines() if l.startswith('RESULTS '))
  results = json.loads(line[len('RESULTS '):])

  squeezed = results['squeeze']
  assert (squeezed['devices'], squeezed['steps']) == (devices, 2)  # 2 batches of 32
  recovered = results['recover']
  # 8 groups of 5 classes, padded to one group per device; the padding is not exported.
  assert (recovered['devices'], recovered['groups'], recovered['images']) == (devices, 8, 40)
  distilled = results['evaluate']['variants']['distilled']
  assert (distilled['images'], distilled['steps']) == (40, 2)  # batches of 32 over 40 images
  testlib.assert_share_of(distilled['test_top1_mean'], 16)  # 16 mock test images, no padding
  assert os.path.exists(tmp_path / 'work' / 'report.md')
