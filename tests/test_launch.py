"""Launchers: the exact commands they issue, recorded by stub `gcloud`, `sbatch`, `srun`,
`scontrol`, `nvidia-smi` (and, for the TPU worker script, `gcsfuse`, `mountpoint`, `sudo`)
executables put first on PATH; and the Colab notebook, which runs the Fashion-MNIST smoke
pipeline headless (no network: its install cell is skipped when the package is importable)."""

import ast
import configparser
import glob
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import nbclient
import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
NOTEBOOK = os.path.join(LAUNCH, 'colab.ipynb')

# Every stub is this program: it appends {"prog", "argv"} to $STUB_LOG, then follows the first
# rule of $STUB_RULES whose `prog` matches and whose `contains` occurs in its joined argv:
# print `stdout`, create the file `touch`, wait until the file `until` exists (at most 20 s),
# exit with `exit` (default 0); a rule with `unless` applies only while that file does not
# exist. `sudo` runs its arguments.
STUB = r'''#!{python}
import json, os, subprocess, sys, time
prog, argv = os.path.basename(sys.argv[0]), sys.argv[1:]
if prog == 'sudo':
  sys.exit(subprocess.call(argv))
with open(os.environ['STUB_LOG'], 'a') as f:
  f.write(json.dumps({{'prog': prog, 'argv': argv}}) + '\n')
joined = ' '.join(argv)
with open(os.environ['STUB_RULES']) as f:
  rules = json.load(f)
for rule in rules:
  if 'unless' in rule and os.path.exists(rule['unless']):
    continue
  if rule['prog'] == prog and rule.get('contains', '') in joined:
    if 'touch' in rule:
      open(rule['touch'], 'w').close()
    deadline = time.time() + 20
    while 'until' in rule and not os.path.exists(rule['until']) and time.time() < deadline:
      time.sleep(0.05)
    sys.stdout.write(rule.get('stdout', ''))
    sys.exit(rule.get('exit', 0))
'''
PROGRAMS = ('gcloud', 'sbatch', 'srun', 'scontrol', 'nvidia-smi', 'gcsfuse', 'mountpoint',
            'sudo', 'lsb_release', 'ssh-add')
# gcloud's SSH key, and an ssh-agent (the ssh-add stub) that holds it unless a test says not.
KEY = 'ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCtest user@laptop\n'


class Stubs:
  """A bin/ folder of stubs, their rules and the calls they recorded."""

  def __init__(self, root):
    self.root = root
    self.bin = root / 'bin'
    self.bin.mkdir()
    for name in PROGRAMS:
      path = self.bin / name
      path.write_text(STUB.format(python=sys.executable))
      path.chmod(0o755)
    self.log = root / 'calls.jsonl'
    self.rules_file = root / 'rules.json'
    self.key = root / 'google_compute_engine'
    self.key.with_suffix('.pub').write_text(KEY)
    self.rules([])

  def rules(self, rules):
    agent = {'prog': 'ssh-add', 'contains': '-L', 'stdout': KEY}
    # Replaced, never rewritten in place: a stub of a detached job may read the rules while a
    # test sets them again (`finished_state` polls through `worker`), and a half-written file
    # made its `gcloud storage ls` fail once (CI, stop 33).
    staged = self.rules_file.with_suffix('.staged')
    staged.write_text(json.dumps([*rules, agent]))
    os.replace(staged, self.rules_file)

  def calls(self, prog=None):
    if not self.log.exists():
      return []
    calls = [json.loads(line) for line in self.log.read_text().splitlines()]
    return [c['argv'] for c in calls if prog is None or c['prog'] == prog]

  def env(self, **env):
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(('SLURM_', 'PROJECT', 'BUCKET', 'COORDINATOR', 'ZONE', 'SPOT',
                                  'QUEUED', 'KEEP', 'DRY_RUN', 'ACCELERATOR', 'TPU_NAME'))}
    return {**clean, 'PATH': f'{self.bin}:{os.environ["PATH"]}', 'STUB_LOG': str(self.log),
            'STUB_RULES': str(self.rules_file), 'SSH_KEY': str(self.key), **env}

  def run(self, script, *args, **env):
    return subprocess.run(['bash', os.path.join(LAUNCH, script), *args], cwd=REPO,
                          capture_output=True, text=True, check=False, timeout=120,
                          env=self.env(**env))


@pytest.fixture
def stubs(tmp_path):
  return Stubs(tmp_path)


# ------------------------------------------------------------------------------ TPU pods

TPU = dict(PROJECT='proj', BUCKET='bkt', ZONE='zone-a', POLL_SECONDS='0')
SUFFIX = ['--project=proj', '--zone=zone-a']
WORKER_ENV = ('cd sre2l_jax && BUCKET=bkt MOUNT=/mnt/bkt DATA_DIR=/mnt/bkt/tensorflow_datasets '
              'MANUAL_DIR=/mnt/bkt/tensorflow_datasets/downloads/manual PYTHON_VERSION=3.12 '
              'FILE_CACHE_GB=0 bash launch/tpu_worker.sh')


def absent(stubs):
  """Rules: no slice (`describe --format=value(name)` is how tpu_pod.sh asks) until one was
  created."""
  created = str(stubs.root / 'created')
  return [{'prog': 'gcloud', 'contains': ' create ', 'touch': created},
          {'prog': 'gcloud', 'contains': 'value(name)', 'exit': 1, 'unless': created}]
EXISTS = ['compute', 'tpus', 'tpu-vm', 'describe', 'sre2l-pod', '--format=value(name)', *SUFFIX]


def ssh(workers, command):
  return ['compute', 'tpus', 'tpu-vm', 'ssh', 'sre2l-pod', f'--worker={workers}',
          f'--command={command}', *SUFFIX]


def worker_ssh(workers, action):
  return ssh(workers, f'{WORKER_ENV} {action}')


def states(name, *states_):
  return ''.join(f'sre2l-job name={name} worker={i} state={s} exit={0 if s == "done" else 1}\n'
                 for i, s in enumerate(states_))


@pytest.mark.parametrize('accelerator,runtime', [
    ('v4-32', 'tpu-ubuntu2204-base'), ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v5p-32', 'v2-alpha-tpuv5'), ('v6e-16', 'v2-alpha-tpuv6e')])
def test_tpu_create_uses_the_runtime_of_the_accelerator(stubs, accelerator, runtime):
  stubs.rules(absent(stubs))
  completed = stubs.run('tpu_pod.sh', 'create', ACCELERATOR=accelerator, **TPU)
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('gcloud') == [
      EXISTS,
      ['compute', 'tpus', 'tpu-vm', 'create', 'sre2l-pod', f'--accelerator-type={accelerator}',
       f'--version={runtime}', *SUFFIX]]


def test_tpu_spot_and_queued_resources(stubs):
  stubs.rules(absent(stubs))
  completed = stubs.run('tpu_pod.sh', 'create', SPOT='1', **TPU)
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('gcloud')[-1] == [
      'compute', 'tpus', 'tpu-vm', 'create', 'sre2l-pod', '--accelerator-type=v4-32',
      '--version=tpu-ubuntu2204-base', '--spot', *SUFFIX]

  # Queued: created, then described until ACTIVE, then deleted with its slice.
  stubs.log.unlink()
  (stubs.root / 'created').unlink()
  stubs.rules([*absent(stubs), {'prog': 'gcloud', 'contains': 'describe', 'stdout': 'ACTIVE\n'}])
  completed = stubs.run('tpu_pod.sh', 'create', 'delete', SPOT='1', QUEUED='1',
                        ACCELERATOR='v5litepod-16', VALID_FOR='6h', **TPU)
  assert completed.returncode == 0, completed.stderr
  describe = ['compute', 'tpus', 'queued-resources', 'describe', 'sre2l-pod-qr',
              '--format=value(state.state)', *SUFFIX]
  assert stubs.calls('gcloud') == [
      EXISTS,
      ['compute', 'tpus', 'queued-resources', 'describe', 'sre2l-pod-qr', '--format=value(name)',
       *SUFFIX],
      ['compute', 'tpus', 'queued-resources', 'create', 'sre2l-pod-qr', '--node-id=sre2l-pod',
       '--accelerator-type=v5litepod-16', '--runtime-version=v2-alpha-tpuv5-lite', '--spot',
       '--valid-until-duration=6h', *SUFFIX],
      describe,
      EXISTS,
      ['compute', 'tpus', 'queued-resources', 'delete', 'sre2l-pod-qr', '--force', '--quiet',
       *SUFFIX]]


def test_tpu_queued_request_that_fails_is_deleted(stubs):
  stubs.rules([*absent(stubs), {'prog': 'gcloud', 'contains': 'describe', 'stdout': 'FAILED\n'}])
  completed = stubs.run('tpu_pod.sh', 'create', QUEUED='1', **TPU)
  assert completed.returncode != 0
  assert stubs.calls('gcloud')[-1] == ['compute', 'tpus', 'queued-resources', 'delete',
                                       'sre2l-pod-qr', '--force', '--quiet', *SUFFIX]


def test_tpu_create_refuses_to_replace_an_existing_slice(stubs):
  completed = stubs.run('tpu_pod.sh', 'create', **TPU)  # the stub says it exists
  assert completed.returncode != 0 and 'exists already' in completed.stderr
  assert stubs.calls('gcloud') == [EXISTS]  # neither created nor deleted


PREFLIGHT = [
    ['compute', 'tpus', 'accelerator-types', 'describe', 'v4-32', *SUFFIX],
    ['storage', 'cp', '-', 'gs://bkt/sre2l/in1k_ipc50/launch/.write_check'],
    ['storage', 'rm', 'gs://bkt/sre2l/in1k_ipc50/launch/.write_check'],
    ['storage', 'ls', 'gs://bkt/tensorflow_datasets/imagenet2012/*/dataset_info.json']]
JOB_ENV = ('RESULTS=gs://bkt/sre2l/in1k_ipc50/launch NUM_WORKERS=4 MAX_HOURS= DELETE_SLICE=1 '
           'TPU_NAME=sre2l-pod PROJECT=proj ZONE=zone-a QUEUED_RESOURCE=')
TRAIN = ('train in1k_ipc50 --config=configs/in1k_ipc50.py --workdir=gs://bkt/sre2l/in1k_ipc50 '
         '--distributed --config.dataset.data_dir=/mnt/bkt/tensorflow_datasets '
         '--config.dataset.manual_dir=/mnt/bkt/tensorflow_datasets/downloads/manual')
ENDPOINTS = ['compute', 'tpus', 'tpu-vm', 'describe', 'sre2l-pod',
             '--format=value(networkEndpoints.len())', *SUFFIX]


def test_tpu_all_runs_every_step_detached_copies_logs_back_and_deletes(stubs):
  stubs.rules([
      *absent(stubs),
      {'prog': 'gcloud', 'contains': 'state data', 'stdout': states('data', 'done')},
      {'prog': 'gcloud', 'contains': 'state in1k_ipc50',
       'stdout': 'SSH: connecting\n' + states('in1k_ipc50', *['done'] * 4)},
      {'prog': 'gcloud', 'contains': 'networkEndpoints', 'stdout': '4\n'}])
  logs = stubs.root / 'logs'
  completed = stubs.run('tpu_pod.sh', 'all', LOG_DIR=str(logs), **TPU)
  assert completed.returncode == 0, completed.stderr
  calls = stubs.calls('gcloud')
  # The preflight (the key in the agent, the config tracked), then the zone, the bucket, data.
  assert stubs.calls('ssh-add') == [['-L']]
  assert calls[:4] == PREFLIGHT
  assert calls[4:6] == [EXISTS, ['compute', 'tpus', 'tpu-vm', 'create', 'sre2l-pod',
                                  '--accelerator-type=v4-32', '--version=tpu-ubuntu2204-base',
                                  *SUFFIX]]
  # Set-up: the tracked files to every worker, unpacked; Python 3.12 venv; mount; devices.
  scp = calls[6]
  assert scp[:4] == ['compute', 'tpus', 'tpu-vm', 'scp'] and scp[4].endswith('.tar.gz')
  assert scp[5:] == ['sre2l-pod:sre2l_code.tar.gz', '--worker=all', *SUFFIX]
  # The workdir straight in the bucket (no mount); the data through the gcsfuse mount; the
  # workers told where to report the end and that worker 0 deletes the slice then.
  assert calls[7:] == [
      ssh('all', 'rm -rf sre2l_jax && mkdir -p sre2l_jax && tar -xzf sre2l_code.tar.gz '
                 '-C sre2l_jax'),
      worker_ssh('all', 'install'),
      worker_ssh('all', 'mount'),
      worker_ssh('all', 'devices'),
      # ImageNet once, on worker 0, detached; then waited for.
      worker_ssh('0', 'data'),
      worker_ssh('0', 'state data'),
      # The mount check and the detached start, in one command per worker.
      ENDPOINTS,
      ssh('all', WORKER_ENV.replace(' bash ', f' {JOB_ENV} bash ') + ' ' + TRAIN),
      worker_ssh('all', 'state in1k_ipc50'),
      # The logs the workers left in the bucket; the slice (if worker 0 has not yet).
      ['storage', 'cp', 'gs://bkt/sre2l/in1k_ipc50/launch/worker-*.log', f'{logs}/'],
      EXISTS,
      ['compute', 'tpus', 'tpu-vm', 'delete', 'sre2l-pod', '--quiet', *SUFFIX]]


def test_tpu_failed_setup_deletes_the_slice(stubs):
  stubs.rules([*absent(stubs), {'prog': 'gcloud', 'contains': 'tpu_worker.sh install', 'exit': 1}])
  completed = stubs.run('tpu_pod.sh', 'create', 'setup', **TPU)
  assert completed.returncode != 0
  assert 'deleting sre2l-pod' in completed.stderr
  calls = stubs.calls('gcloud')
  # Right after the failed install (no job ran, so no logs to copy): the delete.
  assert calls[calls.index(worker_ssh('all', 'install')) + 1:] == [
      EXISTS, ['compute', 'tpus', 'tpu-vm', 'delete', 'sre2l-pod', '--quiet', *SUFFIX]]

  # KEEP=1: nothing deleted, and the message says it still bills.
  stubs.log.unlink()
  completed = stubs.run('tpu_pod.sh', 'setup', KEEP='1', **TPU)
  assert completed.returncode != 0 and 'BILLING' in completed.stderr
  assert not [c for c in stubs.calls('gcloud') if 'delete' in c]


def test_tpu_failed_run_copies_logs_then_deletes(stubs):
  stubs.rules([
      *absent(stubs),
      {'prog': 'gcloud', 'contains': 'state in1k_ipc50',
       'stdout': states('in1k_ipc50', 'done', 'failed')},
      {'prog': 'gcloud', 'contains': 'networkEndpoints', 'stdout': '2\n'},
      {'prog': 'gcloud', 'contains': 'worker-*.log', 'exit': 1}])  # nothing in the bucket
  completed = stubs.run('tpu_pod.sh', 'all', PREPARE_DATA='0',
                        LOG_DIR=str(stubs.root / 'logs'), **TPU)
  assert completed.returncode != 0
  assert 'in1k_ipc50 failed on a worker' in completed.stderr
  assert [c[1] if c[0] == 'storage' else c[3] for c in stubs.calls('gcloud')[-6:]] == [
      'cp', 'describe', 'scp', 'scp', 'describe', 'delete']


def test_tpu_check_refuses_before_creating_when_imagenet_is_missing(stubs):
  stubs.rules([{'prog': 'gcloud', 'contains': 'storage ls', 'exit': 1}])
  completed = stubs.run('tpu_pod.sh', 'all', **TPU)
  assert completed.returncode != 0 and 'upload ILSVRC2012_img_train.tar' in completed.stderr
  assert stubs.calls('gcloud') == [*PREFLIGHT, [
      'storage', 'ls', 'gs://bkt/tensorflow_datasets/downloads/manual/ILSVRC2012_img_train.tar',
      'gs://bkt/tensorflow_datasets/downloads/manual/ILSVRC2012_img_val.tar']]


def test_tpu_dry_run_prints_every_command_and_runs_none(stubs):
  completed = stubs.run('tpu_pod.sh', 'all', DRY_RUN='1', SPOT='1', **TPU)
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls() == []
  printed = [line for line in completed.stdout.splitlines() if line.startswith('+ ')]
  assert printed[0] == '+ ssh-add -L'
  assert printed[6] == ('+ gcloud compute tpus tpu-vm create sre2l-pod '
                        '--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot '
                        '--project=proj --zone=zone-a')
  assert printed[-1] == '+ gcloud compute tpus tpu-vm delete sre2l-pod --quiet --project=proj --zone=zone-a'
  for action in ('install', 'mount', 'devices', 'data', 'train', 'state'):
    assert any(f'tpu_worker.sh\\ {action}' in line for line in printed), action


def test_tpu_needs_project_bucket_and_a_known_step(stubs):
  completed = stubs.run('tpu_pod.sh')
  assert completed.returncode != 0 and 'set PROJECT' in completed.stderr
  completed = stubs.run('tpu_pod.sh', PROJECT='p')
  assert completed.returncode != 0 and 'set BUCKET' in completed.stderr
  completed = stubs.run('tpu_pod.sh', 'nonsense', PROJECT='p', BUCKET='b')
  assert completed.returncode == 2 and 'usage' in completed.stderr
  completed = stubs.run('tpu_pod.sh', 'create', PROJECT='p', BUCKET='b', ACCELERATOR='v6e-8')
  assert completed.returncode != 0 and 'set ZONE' in completed.stderr
  assert stubs.calls() == []


def test_tpu_check_refuses_when_the_agent_lacks_gclouds_key(stubs):
  # An agent with another key: gcloud's --worker=all would raise SSHKeyNotInAgent after the
  # slice is up; the preflight refuses first and prints the fix.
  stubs.rules([{'prog': 'ssh-add', 'contains': '-L', 'stdout': 'ssh-ed25519 AAAAother me\n'}])
  completed = stubs.run('tpu_pod.sh', 'all', **TPU)
  assert completed.returncode == 1
  assert f'ssh-add {stubs.key}' in completed.stderr and 'Nothing was created' in completed.stderr
  assert stubs.calls('gcloud') == []
  # No agent at all (ssh-add exits 2), and no key made yet: each says what to do.
  stubs.rules([{'prog': 'ssh-add', 'contains': '-L', 'exit': 2}])
  assert 'not in your ssh-agent' in stubs.run('tpu_pod.sh', 'check', **TPU).stderr
  stubs.key.with_suffix('.pub').unlink()
  completed = stubs.run('tpu_pod.sh', 'check', **TPU)
  assert completed.returncode == 1 and 'ssh-keygen -t rsa -f' in completed.stderr
  assert stubs.calls('gcloud') == []


def _copy_launchers(root, *, git: bool):
  """A checkout with launch/, the default config tracked and configs/my.py not (git=True), or
  the same files without .git (a downloaded archive)."""
  checkout = root / 'checkout'
  (checkout / 'configs').mkdir(parents=True)
  shutil.copytree(LAUNCH, checkout / 'launch')
  shutil.copy(os.path.join(REPO, 'configs', 'in1k_ipc50.py'), checkout / 'configs')
  if git:
    subprocess.run(['git', 'init', '-q'], cwd=checkout, check=True)
    subprocess.run(['git', 'add', 'launch', 'configs'], cwd=checkout, check=True)
  (checkout / 'configs' / 'my.py').write_text('# not added\n')
  return checkout


@pytest.mark.parametrize('git', [True, False], ids=['untracked', 'no_git'])
def test_tpu_check_refuses_a_config_that_would_not_be_shipped(stubs, git):
  checkout = _copy_launchers(stubs.root, git=git)
  completed = subprocess.run(
      ['bash', str(checkout / 'launch' / 'tpu_pod.sh'), 'all'], cwd=checkout,
      capture_output=True, text=True, check=False, timeout=60,
      env=stubs.env(CONFIG='configs/my.py:smoke', **TPU))
  assert completed.returncode == 1
  expected = 'git add configs/my.py' if git else 'is not a git checkout'
  assert expected in completed.stderr and 'Nothing was created' in completed.stderr
  assert stubs.calls('gcloud') == []
  if git:  # the tracked default passes the same check
    completed = subprocess.run(
        ['bash', str(checkout / 'launch' / 'tpu_pod.sh'), 'check'], cwd=checkout,
        capture_output=True, text=True, check=False, timeout=60, env=stubs.env(**TPU))
    assert completed.returncode == 0, completed.stderr


def test_tpu_check_refuses_an_accelerator_not_offered_or_an_unwritable_bucket(stubs):
  stubs.rules([{'prog': 'gcloud', 'contains': 'accelerator-types', 'exit': 1}])
  completed = stubs.run('tpu_pod.sh', 'all', **TPU)
  assert completed.returncode == 1 and 'v4-32 is not offered in zone-a' in completed.stderr
  assert stubs.calls('gcloud') == PREFLIGHT[:1]
  stubs.log.unlink()
  stubs.rules([{'prog': 'gcloud', 'contains': 'storage cp', 'exit': 1}])
  completed = stubs.run('tpu_pod.sh', 'all', **TPU)
  assert completed.returncode == 1 and 'cannot write to gs://bkt/' in completed.stderr
  assert stubs.calls('gcloud') == PREFLIGHT[:2]
  # v5e is v5litepod to gcloud: said before anything runs.
  completed = stubs.run('tpu_pod.sh', 'check', ACCELERATOR='v5e-16', **TPU)
  assert completed.returncode != 0 and 'v5litepod-N' in completed.stderr


def test_tpu_setup_quotes_remote_dir(stubs, tmp_path):
  # A space and a `;` in REMOTE_DIR: one folder of that name on the workers, nothing run.
  remote_dir = 'my code; touch pwned'
  completed = stubs.run('tpu_pod.sh', 'setup', REMOTE_DIR=remote_dir, **TPU)
  assert completed.returncode == 0, completed.stderr
  commands = [c[6][len('--command='):] for c in stubs.calls('gcloud') if c[3] == 'ssh']
  assert len(commands) == 4  # unpack, install, mount, devices
  # Run each as the worker's shell would, in a folder standing in for the worker's home
  # (the unpack with a real archive; the other three reach tpu_worker.sh only by `cd`).
  home = tmp_path / 'home'
  home.mkdir()
  subprocess.run(['tar', '-czf', str(home / 'sre2l_code.tar.gz'), '-C', REPO, 'README.md'],
                 check=True)
  subprocess.run(['bash', '-c', commands[0]], cwd=home, check=True)
  assert sorted(os.listdir(home)) == ['my code; touch pwned', 'sre2l_code.tar.gz']
  assert os.listdir(home / remote_dir) == ['README.md']
  for command in commands[1:]:
    cd = command.split(' && ', 1)[0]
    subprocess.run(['bash', '-c', f'{cd} && pwd > where'], cwd=home, check=True)
    assert (home / remote_dir / 'where').read_text().strip() == str(home / remote_dir)
  assert not (home / 'pwned').exists()


def test_tpu_resume_recreates_a_preempted_slice_and_runs_again(stubs):
  # The first wait finds the workers gone and the slice PREEMPTED; with RESUME=1 the slice is
  # deleted, created and set up again, and `run` starts the same command (every stage
  # resumes from the bucket); the second wait sees the job done.
  deleted, recreated = str(stubs.root / 'deleted'), str(stubs.root / 'recreated')
  stubs.rules([
      {'prog': 'gcloud', 'contains': 'tpu-vm delete', 'touch': deleted},
      {'prog': 'gcloud', 'contains': 'tpu-vm create', 'touch': recreated},
      {'prog': 'gcloud', 'contains': 'state in1k_ipc50', 'exit': 255, 'unless': recreated},
      {'prog': 'gcloud', 'contains': 'value(state)', 'stdout': 'PREEMPTED\n',
       'unless': recreated},
      # The slice exists until deleted, then not until created again.
      {'prog': 'gcloud', 'contains': 'value(name)', 'unless': deleted},
      {'prog': 'gcloud', 'contains': 'value(name)', 'exit': 1, 'unless': recreated},
      {'prog': 'gcloud', 'contains': 'state in1k_ipc50',
       'stdout': states('in1k_ipc50', 'done', 'done')},
      {'prog': 'gcloud', 'contains': 'networkEndpoints', 'stdout': '2\n'}])
  completed = stubs.run('tpu_pod.sh', 'run', 'wait', RESUME='1', KEEP='1', PREPARE_DATA='0',
                        LOG_DIR=str(stubs.root / 'logs'), **TPU)
  assert completed.returncode == 0, completed.stderr
  assert 'sre2l-pod is PREEMPTED' in completed.stderr and 'resuming in1k_ipc50 (1/20)' in (
      completed.stderr)
  train = ssh('all', WORKER_ENV.replace(' bash ', f' {JOB_ENV} bash ') + ' ' + TRAIN)
  train[6] = train[6].replace('NUM_WORKERS=4 MAX_HOURS= DELETE_SLICE=1',
                              'NUM_WORKERS=2 MAX_HOURS= DELETE_SLICE=0')
  kinds = [c[3] if c[0] == 'compute' else c[1] for c in stubs.calls('gcloud')]
  assert kinds == [
      'describe', 'ssh',  # run: the worker count, the start
      'ssh', 'describe',  # wait: no answer, the slice is PREEMPTED
      'describe', 'describe', 'delete', 'describe', 'create',  # resume: state, exists? x 2
      'scp', 'ssh', 'ssh', 'ssh', 'ssh',  # setup
      'describe', 'ssh',  # run again
      'ssh', 'cp']  # wait: done; the logs from the bucket
  calls = stubs.calls('gcloud')
  assert calls[1] == calls[15] == train

  # Without RESUME=1: no recreation, the command that resumes is printed, nothing deleted.
  stubs.log.unlink()
  os.unlink(recreated)
  os.unlink(deleted)
  completed = stubs.run('tpu_pod.sh', 'wait', PREPARE_DATA='0', **TPU)
  assert completed.returncode == 1 and 'RESUME=1 bash launch/tpu_pod.sh resume' in (
      completed.stderr)
  assert not [c for c in stubs.calls('gcloud') if 'delete' in c or 'create' in c]


def test_tpu_wait_after_the_slice_deleted_itself_reads_the_bucket(stubs):
  # Worker 0 deleted the slice when the job ended: the exit codes in the bucket decide.
  stubs.rules([{'prog': 'gcloud', 'contains': 'ssh', 'exit': 255},
               {'prog': 'gcloud', 'contains': 'value(state)', 'exit': 1},
               {'prog': 'gcloud', 'contains': 'value(name)', 'exit': 1},
               {'prog': 'gcloud', 'contains': 'storage cat', 'stdout': '0\n0\n'}])
  completed = stubs.run('tpu_pod.sh', 'wait', 'delete', LOG_DIR=str(stubs.root / 'logs'), **TPU)
  assert completed.returncode == 0, completed.stderr
  assert 'deleted itself after the job' in completed.stdout
  assert 'is deleted already' in completed.stdout
  stubs.rules([{'prog': 'gcloud', 'contains': 'ssh', 'exit': 255},
               {'prog': 'gcloud', 'contains': 'value(state)', 'exit': 1},
               {'prog': 'gcloud', 'contains': 'value(name)', 'exit': 1},
               {'prog': 'gcloud', 'contains': 'storage cat', 'stdout': '0\n1\n'}])
  completed = stubs.run('tpu_pod.sh', 'wait', **TPU)
  assert completed.returncode == 1 and 'in1k_ipc50 failed on a worker' in completed.stderr
  assert not [c for c in stubs.calls('gcloud') if 'delete' in c]


# -------------------------------------------------------------------- TPU worker script


def worker(stubs, *args, mounted=True, **env):
  """Runs launch/tpu_worker.sh with local folders for the mount, venv and jobs."""
  root = stubs.root
  (root / 'mnt').mkdir(exist_ok=True)
  stubs.rules([{'prog': 'mountpoint', 'exit': 0 if mounted else 1},
               {'prog': 'gcloud', 'contains': 'storage ls',
                'stdout': 'gs://bkt/r/worker-0.exit\ngs://bkt/r/worker-1.exit\n'}])
  return stubs.run('tpu_worker.sh', *args, MOUNT=str(root / 'mnt'), BUCKET='bkt',
                   JOBS_DIR=str(root / 'jobs'), VENV=str(root / 'venv'),
                   **{'WORKER_ID': '3', **env})


def finished_state(stubs, name: str, **env) -> str:
  """The worker's state line of job `name` once it stops running (polls up to 10 s)."""
  for _ in range(200):
    state = worker(stubs, 'state', name, **env).stdout.strip()
    if 'running' not in state:
      return state
    time.sleep(0.05)
  return state


def fake_venv(stubs, body):
  python = stubs.root / 'venv' / 'bin' / 'python'
  python.parent.mkdir(parents=True)
  python.write_text(f'#!/bin/bash\necho "python $*" >> {stubs.root}/started\n{body}\n')
  python.chmod(0o755)


def test_tpu_worker_trains_detached_once_and_reports_its_state(stubs):
  release = stubs.root / 'release'
  fake_venv(stubs, f'while [ ! -e {release} ]; do sleep 0.05; done; echo trained')
  start = time.time()
  completed = worker(stubs, 'train', 'exp', '--config=c.py', '--workdir=w')
  assert completed.returncode == 0, completed.stderr
  assert time.time() - start < 15  # returned while the job runs
  assert 'started job exp on worker 3' in completed.stdout
  assert worker(stubs, 'state', 'exp').stdout.strip() == (
      'sre2l-job name=exp worker=3 state=running exit=-')
  # A second start (e.g. gcloud retrying the ssh command) does not start a second copy.
  again = worker(stubs, 'train', 'exp', '--config=c.py', '--workdir=w')
  assert again.returncode == 0 and 'already running' in again.stdout
  release.touch()
  state = finished_state(stubs, 'exp')
  assert state == 'sre2l-job name=exp worker=3 state=done exit=0'
  assert (stubs.root / 'started').read_text() == (
      'python -m sre2l_jax.main --config=c.py --workdir=w\n')
  assert 'trained' in (stubs.root / 'jobs' / 'exp' / 'log').read_text()

  # A failing run is reported as failed.
  fake_python = stubs.root / 'venv' / 'bin' / 'python'
  fake_python.write_text('#!/bin/bash\nexit 3\n')
  assert worker(stubs, 'train', 'exp', '--config=c.py').returncode == 0
  state = finished_state(stubs, 'exp')
  assert state == 'sre2l-job name=exp worker=3 state=failed exit=3'


END = dict(RESULTS='gs://bkt/r', NUM_WORKERS='2', DELETE_SLICE='1', TPU_NAME='pod',
           PROJECT='p', ZONE='z')


@pytest.mark.parametrize('worker_id', ['0', '1'])
def test_tpu_worker_reports_the_end_and_worker_0_deletes_the_slice(stubs, worker_id):
  fake_venv(stubs, 'echo trained')
  completed = worker(stubs, 'train', 'exp', '--config=c.py', WORKER_ID=worker_id, **END)
  assert completed.returncode == 0, completed.stderr
  state = finished_state(stubs, 'exp', WORKER_ID=worker_id)
  assert state == f'sre2l-job name=exp worker={worker_id} state=done exit=0'
  report = f'gs://bkt/r/worker-{worker_id}'
  ended = [['storage', 'rm', f'{report}.exit', f'{report}.log'],  # an earlier start's report
           ['storage', 'cp', str(stubs.root / 'jobs' / 'exp' / 'log'), f'{report}.log'],
           ['storage', 'cp', '-', f'{report}.exit']]
  if worker_id == '0':  # waits for both workers' reports (the stub lists 2), then deletes
    ended += [['storage', 'ls', 'gs://bkt/r/worker-*.exit'],
              ['compute', 'tpus', 'tpu-vm', 'delete', 'pod', '--quiet', '--async',
               '--project=p', '--zone=z']]
  assert stubs.calls('gcloud') == ended
  assert 'worker 0 deletes pod' in (stubs.root / 'jobs' / 'exp' / 'log').read_text() or (
      worker_id != '0')


def test_tpu_worker_stops_the_job_after_max_hours(stubs):
  fake_venv(stubs, 'sleep 60')
  completed = worker(stubs, 'train', 'exp', '--config=c.py', MAX_HOURS='0.0005',  # 1.8 s
                     **{**END, 'DELETE_SLICE': '0'})
  assert completed.returncode == 0, completed.stderr
  assert finished_state(stubs, 'exp') == 'sre2l-job name=exp worker=3 state=failed exit=124'
  assert 'stopped after MAX_HOURS=0.0005 h' in (stubs.root / 'jobs' / 'exp' / 'log').read_text()
  assert stubs.calls('gcloud')[-1] == ['storage', 'cp', '-', 'gs://bkt/r/worker-3.exit']


def test_tpu_worker_tells_a_killed_job_from_a_failed_one(stubs):
  # A maintenance restart kills the job and its wrapper alike: no exit code is written.
  fake_venv(stubs, 'sleep 60')
  assert worker(stubs, 'train', 'exp', '--config=c.py').returncode == 0
  pid = int((stubs.root / 'jobs' / 'exp' / 'pid').read_text())
  os.killpg(pid, signal.SIGKILL)  # the job runs in a session (and process group) of its own
  assert finished_state(stubs, 'exp') == 'sre2l-job name=exp worker=3 state=killed exit=-'
  # SIGTERM (a maintenance notice): main.py saves, exits 143; also resumable, not failed.
  (stubs.root / 'venv' / 'bin' / 'python').write_text('#!/bin/bash\nexit 143\n')
  assert worker(stubs, 'train', 'exp', '--config=c.py').returncode == 0
  assert finished_state(stubs, 'exp') == 'sre2l-job name=exp worker=3 state=killed exit=143'


def test_tpu_worker_refuses_to_train_without_the_mount(stubs):
  fake_venv(stubs, 'exit 0')
  completed = worker(stubs, 'train', 'exp', '--config=c.py', mounted=False)
  assert completed.returncode != 0
  assert 'is not mounted on worker 3' in completed.stderr
  assert not (stubs.root / 'started').exists() and not (stubs.root / 'jobs').exists()


def test_tpu_worker_mounts_with_metadata_caches_off(stubs, tmp_path):
  mount = tmp_path / 'mnt'
  mounted = tmp_path / 'mounted'
  stubs.rules([{'prog': 'gcsfuse', 'touch': str(mounted)}])
  # `mountpoint` answers 1 before the gcsfuse stub ran, 0 after.
  (stubs.bin / 'mountpoint').write_text(f'#!/bin/bash\n[ -e {mounted} ]\n')
  completed = stubs.run('tpu_worker.sh', 'mount', MOUNT=str(mount), BUCKET='bkt',
                        WORKER_ID='0')
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('gcsfuse') == [[
      '--implicit-dirs', '--rename-dir-limit=1000000', '--metadata-cache-ttl-secs=0',
      '--metadata-cache-negative-ttl-secs=0', 'bkt', str(mount)]]
  # Mounted already: not mounted again.
  assert stubs.run('tpu_worker.sh', 'mount', MOUNT=str(mount), BUCKET='bkt').returncode == 0
  assert len(stubs.calls('gcsfuse')) == 1
  # With a file cache (ImageNet read at disk speed after the first epoch).
  mounted.unlink()
  cache = tmp_path / 'cache'
  completed = stubs.run('tpu_worker.sh', 'mount', MOUNT=str(mount), BUCKET='bkt', WORKER_ID='0',
                        FILE_CACHE_GB='200', CACHE_DIR=str(cache))
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('gcsfuse')[-1][4:-2] == [
      f'--cache-dir={cache}', '--file-cache-max-size-mb=204800',
      '--file-cache-cache-file-for-range-read=true']
  assert cache.is_dir()


def test_tpu_worker_installs_gcsfs_for_the_gs_workdir(stubs):
  # `uv` as a stub (first on PATH), the venv's python as a script that succeeds.
  uv = stubs.bin / 'uv'
  uv.write_text((stubs.bin / 'gcloud').read_text())
  uv.chmod(0o755)
  fake_venv(stubs, 'exit 0')
  completed = worker(stubs, 'install')
  assert completed.returncode == 0, completed.stderr
  python = str(stubs.root / 'venv' / 'bin' / 'python')
  assert stubs.calls('uv') == [
      ['pip', 'install', '--python', python, '-q', '-e', '.[gcs,imagenet]', 'jax[tpu]']]


# -------------------------------------------------------------------------------- SLURM

SLURM = dict(SLURM_JOB_ID='77', SLURM_NNODES='4', SLURM_NTASKS_PER_NODE='8',
             SLURM_CPUS_PER_TASK='12')
GPUS = ''.join(f'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\n' for i in range(8))
SRUN = ['--label', '--kill-on-bad-exit=1', '--gpu-bind=none', '--ntasks-per-node=8',
        '--cpus-per-task=12', 'python', '-m', 'sre2l_jax.main', '--config=configs/in1k_ipc50.py',
        '--workdir=/shared/w', '--distributed', '--config.seed=1']


def sbatch_header():
  with open(os.path.join(LAUNCH, 'multi_gpu.sh')) as f:
    return dict(re.findall(r'^#SBATCH --([\w-]+)(?:=(\S+))?', f.read(), re.M))


def test_slurm_submit_asks_for_one_task_per_gpu_cpus_time_and_requeue(stubs):
  completed = stubs.run('multi_gpu.sh', 'submit', 'configs/in1k_ipc50.py', '/shared/w',
                        '--config.seed=1', NODES='4', GPUS_PER_NODE='8', CPUS_PER_TASK='12',
                        TIME='12:00:00', PARTITION='gpu')
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('sbatch') == [[
      '--nodes=4', '--ntasks-per-node=8', '--gpus-per-node=8', '--cpus-per-task=12',
      '--time=12:00:00', '--signal=B:USR1@300', '--requeue', '--open-mode=append',
      '--output=sre2l_%j.log', '--export=ALL,MAX_RESTARTS=10', '--partition=gpu',
      os.path.join(LAUNCH, 'multi_gpu.sh'), 'configs/in1k_ipc50.py', '/shared/w',
      '--config.seed=1']]
  # The script's own defaults (plain `sbatch launch/multi_gpu.sh ...`) are the same layout.
  header = sbatch_header()
  assert header['ntasks-per-node'] == header['gpus-per-node'] == '8'
  assert header['signal'] == 'B:USR1@300' and 'requeue' in header
  assert header['cpus-per-task'] == '8' and header['time'] == '24:00:00'


def test_slurm_job_runs_one_labelled_process_per_gpu(stubs):
  stubs.rules([{'prog': 'nvidia-smi', 'contains': '-L', 'stdout': GPUS},
               {'prog': 'nvidia-smi', 'contains': 'driver_version', 'stdout': '580.65.06\n'}])
  completed = stubs.run('multi_gpu.sh', 'configs/in1k_ipc50.py', '/shared/w', '--config.seed=1',
                        **SLURM)
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('nvidia-smi') == [['-L'], ['--query-gpu=driver_version',
                                                '--format=csv,noheader']]
  assert stubs.calls('srun') == [SRUN]
  assert '4 node(s) x 8 GPU processes, 12 CPUs each' in completed.stdout
  assert 'NVIDIA driver 580.65.06' in completed.stdout


def test_slurm_job_counts_the_gpus_slurm_gave_it(stubs):
  # A shared node or MIG: nvidia-smi lists 8 GPUs, SLURM gave this job 2.
  stubs.rules([{'prog': 'nvidia-smi', 'contains': '-L', 'stdout': GPUS}])
  completed = stubs.run('multi_gpu.sh', 'configs/in1k_ipc50.py', '/shared/w',
                        **{**SLURM, 'SLURM_GPUS_ON_NODE': '2'})
  assert completed.returncode == 2 and '--ntasks-per-node=2 --gpus-per-node=2' in (
      completed.stderr)
  assert ['-L'] not in stubs.calls('nvidia-smi') and stubs.calls('srun') == []
  completed = stubs.run('multi_gpu.sh', 'configs/in1k_ipc50.py', '/shared/w',
                        **{**SLURM, 'SLURM_GPUS_ON_NODE': '8'})
  assert completed.returncode == 0, completed.stderr
  # And --gres for clusters that take no --gpus-per-node.
  completed = stubs.run('multi_gpu.sh', 'submit', 'c.py', '/shared/w', GRES='1',
                        GPUS_PER_NODE='4')
  assert completed.returncode == 0, completed.stderr
  assert stubs.calls('sbatch')[-1][:3] == ['--nodes=1', '--ntasks-per-node=4', '--gres=gpu:4']


def test_slurm_job_refuses_fewer_tasks_than_gpus(stubs):
  stubs.rules([{'prog': 'nvidia-smi', 'stdout': GPUS}])
  completed = stubs.run('multi_gpu.sh', 'configs/in1k_ipc50.py', '/shared/w',
                        **{**SLURM, 'SLURM_NTASKS_PER_NODE': '1'})
  assert completed.returncode == 2 and '--ntasks-per-node=8' in completed.stderr
  assert stubs.calls('srun') == []


def _signalled_job(stubs, ready, *args, timeout=240, **env):
  """Runs multi_gpu.sh CONFIG WORKDIR ARGS under SLURM variables, sends it USR1 (what
  --signal=B:USR1@300 sends) once `ready()`, and returns (returncode, stderr)."""
  process = subprocess.Popen(
      ['bash', os.path.join(LAUNCH, 'multi_gpu.sh'), 'configs/fashion_mnist_ipc10.py:smoke',
       str(stubs.root / 'w'), *args], cwd=REPO, env=stubs.env(**{**SLURM, **env}),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.05)
    if not ready():
      process.kill()
      pytest.fail(f'never ready (rc {process.poll()}): {process.communicate()[1][-3000:]}')
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=timeout)
  finally:
    if process.poll() is None:
      process.kill()
      process.communicate()
  return process.returncode, stderr


def test_slurm_job_stops_the_step_then_requeues(stubs):
  # The step gets TERM and takes its time to save (1 s here); scontrol runs only after it
  # ended, and records whether the save was there by then.
  saved = stubs.root / 'saved'
  started = stubs.root / 'started'
  (stubs.bin / 'srun').write_text(
      f"#!/bin/bash\ntrap 'sleep 1; touch {saved}; exit 143' TERM\ntouch {started}\n"
      f'while true; do sleep 0.05; done\n')
  (stubs.bin / 'scontrol').write_text(
      f'#!/bin/bash\n[ -e {saved} ] && s=after || s=before\n'
      f'echo "scontrol $* $s the save" >> {stubs.root}/order\n')
  stubs.rules([{'prog': 'nvidia-smi', 'stdout': GPUS}])
  returncode, stderr = _signalled_job(stubs, started.exists)
  assert returncode == 0, stderr
  assert (stubs.root / 'order').read_text() == 'scontrol requeue 77 after the save\n'
  assert 'saved and stopped (exit 143); requeueing job 77' in stderr

  # No restarts left: the step still saves and stops, and nothing is requeued.
  for path in (saved, started, stubs.root / 'order'):
    path.unlink()
  returncode, stderr = _signalled_job(stubs, started.exists, SLURM_RESTART_COUNT='10')
  assert returncode == 0 and saved.exists() and not (stubs.root / 'order').exists()
  assert 'not requeueing' in stderr


@pytest.mark.slow
def test_slurm_requeue_comes_after_the_stages_own_save(stubs, fashion_mnist_tfds):
  # The real program under a one-task `srun`: on USR1 the script sends TERM, which JAX's
  # preemption service takes as a notice; squeeze saves a checkpoint at the next step all
  # processes reach, exits 143, and only then does scontrol run (it lists the checkpoints).
  checkpoints = stubs.root / 'w' / 'squeeze' / 'checkpoints'
  (stubs.bin / 'srun').write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
                                  'exec "$@"\n')
  (stubs.bin / 'scontrol').write_text(f'#!/bin/bash\nls {checkpoints} > {stubs.root}/seen\n')
  stubs.rules([])
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', '')).strip()

  def first_checkpoint():
    return checkpoints.is_dir() and any(d.isdigit() for d in os.listdir(checkpoints))

  returncode, stderr = _signalled_job(
      stubs, first_checkpoint, '--stages=squeeze', '--config.squeeze.epochs=500',
      '--config.squeeze.checkpoint_every_steps=50',
      f'--config.dataset.data_dir={fashion_mnist_tfds}',
      PYTHON=sys.executable, SLURM_NTASKS_PER_NODE='1', SLURM_GPUS_ON_NODE='1',
      SLURM_CPUS_PER_TASK='1', SLURM_NNODES='1', SLURM_LOCALID='0', JAX_PLATFORMS='cpu',
      XLA_FLAGS=flags, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES='1',
      JAX_PROCESS_ID='0')
  assert returncode == 0, stderr[-3000:]
  saved = re.search(r'stopped by a preemption notice \(SIGTERM\) after saving step (\d+)',
                    stderr)
  assert saved, stderr[-3000:]
  assert saved[1] in (stubs.root / 'seen').read_text().split()  # there before the requeue
  assert int(saved[1]) % 50  # not one of the regular saves
  assert 'requeueing job 77' in stderr


def test_multi_gpu_needs_slurm_or_a_coordinator(stubs, tmp_path):
  completed = stubs.run('multi_gpu.sh', 'configs/in1k_ipc50.py', str(tmp_path))
  assert completed.returncode == 2 and 'COORDINATOR' in completed.stderr


def test_distributed_start_up_is_on_where_tpu_chips_are_attached(tmp_path):
  # A Cloud TPU VM has no GKE variables; its TPU chips are PCI devices of vendor Google (whose
  # network card, gVNIC, must not count). jax.distributed then finds the slice by itself.
  from sre2l_jax import multihost  # pylint: disable=g-import-not-at-top

  def pci(name, vendor, device):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'vendor').write_text(vendor + '\n')
    (tmp_path / name / 'device').write_text(device + '\n')

  pci('0000:00:04.0', '0x1ae0', '0x0042')  # gVNIC
  pci('0000:00:05.0', '0x10de', '0x2330')  # an H100
  assert not multihost.on_cloud_tpu_vm(str(tmp_path))
  pci('0000:00:06.0', '0x1ae0', '0x0063')  # a v5e chip
  assert multihost.on_cloud_tpu_vm(str(tmp_path))
  assert not multihost.on_cloud_tpu_vm(str(tmp_path / 'absent'))


# --------------------------------------------------------------------- all the launchers


@pytest.mark.parametrize('script', sorted(glob.glob(os.path.join(LAUNCH, '*.sh'))),
                         ids=os.path.basename)
def test_launch_scripts_parse(script):
  completed = subprocess.run(['bash', '-n', script], capture_output=True, text=True,
                             check=False)
  assert completed.returncode == 0, completed.stderr


@pytest.mark.parametrize('name', ['tpu_pod.sh', 'tpu_worker.sh', 'gpu.sh', 'multi_gpu.sh'])
def test_launchers_stop_on_errors(name):
  with open(os.path.join(LAUNCH, name)) as f:
    assert 'set -euo pipefail' in f.read()


def test_python_requires_what_jax_requires():
  config = configparser.ConfigParser()
  config.read(os.path.join(REPO, 'setup.cfg'))
  ours = config['options']['python_requires']
  jax_needs = importlib.metadata.metadata('jax')['Requires-Python']
  version = lambda spec: tuple(int(p) for p in re.search(r'>=\s*([\d.]+)', spec)[1].split('.'))
  assert version(ours) >= version(jax_needs), (ours, jax_needs)


# -------------------------------------------------------------------------------- Colab


def test_colab_notebook_has_a_repository_default_and_an_open_link():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  install = notebook.cells[1].source
  url = re.search(r"^REPO_URL = '(https://github\.com/([\w.-]+/[\w.-]+))'  # @param", install,
                  re.M)
  assert url, 'the install cell needs a REPO_URL form field with a default'
  link = f'https://colab.research.google.com/github/{url[2]}/blob/main/launch/colab.ipynb'
  with open(os.path.join(REPO, 'README.md')) as f:
    assert link in f.read()
  assert 'raise' not in install


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


def _install_cell():
  return nbformat.read(NOTEBOOK, as_version=4).cells[1].source


def test_colab_finds_tpus_by_vfio_as_on_v5e_and_v6e_runtimes(tmp_path, monkeypatch):
  # The cell's own `accelerator` (its IPython magics made Python, then only that function).
  from IPython.core import inputtransformer2  # pylint: disable=g-import-not-at-top
  module = ast.parse(inputtransformer2.TransformerManager().transform_cell(_install_cell()))
  function = next(n for n in module.body
                  if isinstance(n, ast.FunctionDef) and n.name == 'accelerator')
  namespace = {}
  exec('import glob, importlib.util, os, shutil', namespace)  # pylint: disable=exec-used
  code = compile(ast.Module([function], []), NOTEBOOK, 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  accelerator = namespace['accelerator']
  stubs = tmp_path / 'bin'
  stubs.mkdir()
  monkeypatch.setenv('PATH', str(stubs))
  dev = tmp_path / 'dev'
  (dev / 'vfio').mkdir(parents=True)
  (dev / 'vfio' / 'vfio').touch()  # VFIO's control node: there with or without a TPU
  assert accelerator(str(dev)) == ''
  (dev / 'vfio' / '0').touch()  # a v5e-1 / v6e-1 runtime's chip
  assert accelerator(str(dev)) == 'tpu'
  (dev / 'vfio' / '0').unlink()
  (dev / 'accel0').touch()  # v2-v4
  assert accelerator(str(dev)) == 'tpu'
  (dev / 'accel0').unlink()
  (stubs / 'nvidia-smi').write_text('#!/bin/sh\n')
  (stubs / 'nvidia-smi').chmod(0o755)
  assert accelerator(str(dev)) == 'cuda'


@pytest.mark.slow
def test_colab_install_cell_in_a_clean_environment(tmp_path, monkeypatch):
  # A runtime without the package: the cell clones (here from this checkout), installs it with
  # its dependencies into the kernel's own environment in one pip call, and moves into the
  # checkout; after a restart (a new kernel) it installs nothing and still moves there.
  # About a minute: a fresh venv with ipykernel, then the package's dependencies (pip's cache).
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
  subprocess.run([str(venv / 'bin' / 'python'), '-m', 'pip', 'install', '-q', 'ipykernel'],
                 check=True, timeout=300)
  spec = tmp_path / 'jupyter' / 'kernels' / 'clean'
  spec.mkdir(parents=True)
  (spec / 'kernel.json').write_text(json.dumps({
      'argv': [str(venv / 'bin' / 'python'), '-m', 'ipykernel_launcher', '-f',
               '{connection_file}'], 'display_name': 'clean', 'language': 'python'}))
  monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
  monkeypatch.setenv('SRE2L_REPO_URL', REPO)
  monkeypatch.setenv('SRE2L_FASHION_MNIST_DIR', str(tmp_path))  # no download
  monkeypatch.delenv('PYTHONPATH', raising=False)
  runtime = tmp_path / 'content'
  runtime.mkdir()
  checkout = runtime / 'sre2l_jax_repo'

  def run_cells(*sources):
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nbclient.NotebookClient(notebook, timeout=600, kernel_name='clean',
                            resources={'metadata': {'path': str(runtime)}}).execute()
    return ''.join(o.get('text', '') for c in notebook.cells for o in c.outputs)

  where = 'import os, sys; print("cwd", os.getcwd()); print("python", sys.executable)'
  text = run_cells(_install_cell(), where)
  assert f'installing {checkout} with jax>=' in text
  assert f'sre2l_jax from {checkout / "sre2l_jax"}' in text
  assert f'cwd {checkout}\n' in text and f'python {venv}/bin/python' in text
  assert (checkout / 'configs' / 'fashion_mnist_ipc10.py').exists()
  # A restart: importable now, nothing installed, and still in the checkout.
  text = run_cells(_install_cell(), where)
  assert 'installing' not in text and f'cwd {checkout}\n' in text
