"""Multi-host: 2 processes x 4 CPU devices recover the same images as 1 process x 8 devices.

The processes are real: `python -m sre2l_jax.main --distributed` twice (SRe2L, and edc with its
per-class statistics and k-means start), joined through
jax.distributed on localhost (gloo collectives), writing one Orbax checkpoint and one
workdir together. Also: processes started with different configs refuse to run, and
`multihost.to_host` gathers an array spread over processes chunk by chunk.
The teacher is a ConvNet-BN of width 8 with random weights and random BN statistics.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import multihost
from sre2l_jax import recover
from sre2l_jax import synthesis
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.synthesis import optimize

import testlib

SPEC = datasets.get_spec('fashion_mnist')
# Groups of 5 classes, 3 images per class: 6 real groups, padded to 8 (one per device).
OVERRIDES = {'teacher.width': 8, 'recover.ipc': 3, 'recover.batch_size': 5,
             'recover.iterations': 4, 'recover.checkpoint_every_steps': 2,
             'recover.log_every_steps': 2}
TIMEOUT = 300


def make_config():
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.update_from_flattened_dict(OVERRIDES)
  return config


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def process_env(num_processes, process_id, port, devices):
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '', env.get('XLA_FLAGS', ''))
  env.update(XLA_FLAGS=f'{flags} --xla_force_host_platform_device_count={devices}'.strip(),
             JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
             JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id))
  return env


def run_processes(commands, workdir, devices_per_process=4):
  """Runs one command per process (all joined by jax.distributed); returns [(rc, log)]."""
  os.makedirs(workdir, exist_ok=True)
  port = free_port()
  procs = []
  for i, command in enumerate(commands):
    log = open(os.path.join(workdir, f'process{i}.log'), 'w')
    env = process_env(len(commands), i, port, devices_per_process)
    procs.append((subprocess.Popen(command, cwd=testlib.REPO, stdout=log,
                                   stderr=subprocess.STDOUT, env=env), log))
  out = []
  try:
    for proc, log in procs:
      proc.wait(timeout=TIMEOUT)
  finally:
    for proc, log in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
      log.close()
      with open(log.name) as f:
        out.append((proc.returncode, f.read()))
  return out


def main_command(workdir, **extra):
  return testlib.main_command('fashion_mnist_ipc10', workdir, stages='recover',
                              overrides=dict(OVERRIDES, **extra), flags=['--distributed'])


def restore_images(workdir):
  """(step, float images) of the latest recover checkpoint, restored onto one device
  whatever the topology that wrote it."""
  directory = os.path.join(workdir, 'recover', 'checkpoints')
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(step), 'default')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckptr:
    tree = ckptr.metadata(path).item_metadata
    tree = getattr(tree, 'tree', tree)
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    state = ckptr.restore(path, target)
  return step, np.asarray(state['images'])


def assert_same_recovery(multi, single, single_result, groups_shape) -> dict:
  """The two workdirs recovered the same set: equal exported images and labels, equal float
  images (`groups_shape` (G, B) of them) in the checkpoint the processes wrote together, the
  same BN losses, and the images moved. Returns the multi-process run's result.json."""
  result = files.read_json(os.path.join(multi, 'recover', 'result.json'))
  images, labels = export.read_tfds(export.tfds_dataset_dir(image_sets.distilled_dir(multi)))
  ref_images, ref_labels = export.read_tfds(
      export.tfds_dataset_dir(image_sets.distilled_dir(single)))
  assert images.shape == (result['images'],) + SPEC.image_shape
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_array_equal(images, ref_images)
  step, floats = restore_images(multi)
  ref_step, ref_floats = restore_images(single)
  assert step == ref_step == OVERRIDES['recover.iterations']
  assert floats.shape == ref_floats.shape == tuple(groups_shape) + SPEC.image_shape
  np.testing.assert_allclose(floats, ref_floats, rtol=0, atol=1e-5)
  for key in ('bn_loss_final', 'bn_loss_initial'):
    assert result[key] == pytest.approx(single_result[key], rel=1e-5)
  assert result['bn_loss_final'] != result['bn_loss_initial']  # the images moved
  return result


@pytest.fixture(scope='module')
def teacher_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  testlib.write_teacher(make_config(), workdir)
  return workdir


def new_workdir(teacher_workdir, path):
  shutil.copytree(os.path.join(teacher_workdir, 'squeeze'), os.path.join(path, 'squeeze'))
  return str(path)


@pytest.mark.equivalence
@pytest.mark.slow
def test_two_processes_recover_the_same_images_as_one(teacher_workdir, tmp_path):
  single = new_workdir(teacher_workdir, tmp_path / 'one_process')
  # In process: 1 process x 8 devices.
  single_result = testlib.run_stage(recover, make_config(), single)
  assert single_result['devices'] == 8

  multi = new_workdir(teacher_workdir, tmp_path / 'two_processes')
  outputs = run_processes([main_command(multi)] * 2, multi)
  for i, (rc, log) in enumerate(outputs):
    assert rc == 0, f'process {i} failed:\n{log[-4000:]}'
  assert 'stages [\'recover\'] on 8 devices (2 processes)' in outputs[0][1]

  result = assert_same_recovery(multi, single, single_result, (8, 5))
  assert result['devices'] == 8 and result['groups'] == 6 and result['images'] == 30
  # Process 0 alone wrote the exports; both wrote their part of the checkpoint.
  assert os.path.exists(os.path.join(multi, 'recover', 'grid.png'))
  assert not [p for p in os.listdir(os.path.join(multi, 'recover')) if p.endswith('.tmp')]


# edc: a group is one class's `ipc` images (10 groups of 3, padded to 16: 2 per device).
EDC_OVERRIDES = dict(OVERRIDES, **{'recover.batch_size': 3})


@pytest.mark.equivalence
@pytest.mark.slow
def test_two_processes_run_edc_like_one(teacher_workdir, tmp_path):
  """What edc adds, across processes: the per-class statistics (one pass over the training
  split, the sums reduced over the 8-device mesh), the k-means coreset start and groups of one
  class give the same statistics file and the same images as one process."""
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke,method=edc')
  config.update_from_flattened_dict(EDC_OVERRIDES)
  single = new_workdir(teacher_workdir, tmp_path / 'one_process')
  single_result = testlib.run_stage(recover, config, single)

  multi = new_workdir(teacher_workdir, tmp_path / 'two_processes')
  command = testlib.main_command('fashion_mnist_ipc10', multi, stages='recover',
                                 arg='smoke,method=edc', overrides=EDC_OVERRIDES,
                                 flags=['--distributed'])
  outputs = run_processes([command] * 2, multi)
  for i, (rc, log) in enumerate(outputs):
    assert rc == 0, f'process {i} failed:\n{log[-4000:]}'
  assert 'class_stats: computed and wrote' in outputs[0][1]

  result = assert_same_recovery(multi, single, single_result, (16, 3))
  assert result['method'] == 'edc' and result['devices'] == 8 and result['images'] == 30
  stats = {}
  for name, workdir in (('single', single), ('multi', multi)):
    teacher_dir = os.path.join(workdir, 'squeeze', 'teacher')
    written = [n for n in os.listdir(teacher_dir) if n.startswith('class_stats-')]
    assert len(written) == 1, written
    with np.load(os.path.join(teacher_dir, written[0])) as data:
      stats[name] = {k: np.asarray(data[k]) for k in data.files}
  assert stats['multi'].keys() == stats['single'].keys()
  for key, value in stats['single'].items():
    np.testing.assert_allclose(stats['multi'][key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_different_configs_refuse_to_start(teacher_workdir, tmp_path):
  workdir = new_workdir(teacher_workdir, tmp_path / 'mismatch')
  outputs = run_processes([main_command(workdir, **{'recover.lr': 0.25}),
                           main_command(workdir, **{'recover.lr': 0.1})], workdir)
  for i, (rc, log) in enumerate(outputs):
    assert rc != 0, f'process {i} ran with a config that differs from its peer'
    # main's one-line error (no traceback unless --verbosity=1).
    assert 'sre2l_jax: The 2 processes were started with different configurations' in log
    assert 'process(es) [1] disagree with process 0' in log
  assert "recover.lr: process 0 has 0.25, this process (1) has 0.1" in outputs[1][1]
  assert not os.path.exists(os.path.join(workdir, 'recover'))  # nothing was started


GATHER_SCRIPT = textwrap.dedent('''
    import jax, ml_collections, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sre2l_jax import multihost
    multihost.initialize()
    mesh = Mesh(np.asarray(jax.devices()), ('data',))
    full = np.arange(8 * 6 * 5, dtype=np.float32).reshape(8, 6, 5)
    x = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P('data')),
                                     lambda index: full[index])
    assert not x.is_fully_addressable
    # Rows of 120 bytes, chunks of at most 250 bytes: 2 rows at a time, 4 gathers.
    np.testing.assert_array_equal(multihost.to_host(x, max_chunk_bytes=250), full)
    # Many small leaves (metrics rows, one per device) and a local one: one gather.
    rows = [{'loss': x[:, 0, 0] + k, 'finite': x[:, 0, 0] >= 0} for k in range(3)]
    host = multihost.tree_to_host(rows + [np.float32(7)])
    for k in range(3):
      np.testing.assert_array_equal(host[k]['loss'], full[:, 0, 0] + k)
      np.testing.assert_array_equal(host[k]['finite'], full[:, 0, 0] >= 0)
    assert host[3] == 7
    multihost.check_same_config(ml_collections.ConfigDict({'a': 1, 'b': 'x'}))
    multihost.sync('done')
    print('gathered', jax.process_index(), jax.process_count())
''')


def test_to_host_gathers_across_processes_in_chunks(tmp_path):
  outputs = run_processes([[sys.executable, '-c', GATHER_SCRIPT]] * 2, str(tmp_path))
  for i, (rc, log) in enumerate(outputs):
    assert rc == 0, log[-4000:]
    assert f'gathered {i} 2' in log


PREEMPTION_SCRIPT = textwrap.dedent('''
    import os, signal, sys, time
    import numpy as np
    import orbax.checkpoint as ocp
    from sre2l_jax import checkpoint, multihost
    multihost.initialize()  # one process
    root, case = sys.argv[1:]
    state = {'w': np.zeros(3)}

    def step_to(manager, step):
      if manager.should_save(step):
        manager.save(step, args=ocp.args.StandardSave(state))
        return manager.reached_preemption(step)
      return False

    def notice():  # SIGTERM while no loop asks; JAX's notifier polls each second
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(3)

    first = checkpoint.create_manager(os.path.join(root, 'first'), save_interval_steps=5)
    for step in range(1, 31 if case == 'between_loops' else 8):
      step_to(first, step)
    first.wait_until_finished()
    if case == 'after_a_save':
      first.reached_preemption(5)  # Orbax's finalize thread asks this after step 5's save
      notice()
      manager, steps = first, range(8, 100)
    else:  # a notice between two stages' loops, the second shorter than the first
      first.close()
      notice()
      manager, steps = checkpoint.create_manager(os.path.join(root, 'second')), range(1, 21)
    for step in steps:
      if step_to(manager, step):
        print('saved and stopped at', step)
        break
      time.sleep(0.02)
    manager.close()
''')


@pytest.mark.parametrize('case', ['after_a_save', 'between_loops'])
def test_a_preemption_notice_stops_the_next_loop_to_ask(tmp_path, case):
  """JAX sets the preemption sync point to the question after the last one it was asked.
  Orbax's finalize thread asks about the step it has just written, when the loop can be
  steps further on (CI stop 41: a Slurm time-limit TERM went unheeded and the job ran on),
  and a notice can come between two stages' loops; the stages' managers count their
  questions once across loops, so the loop that asks next stops: at the step after the
  last one asked (8, or 1 of the second loop; later only if the protocol took over 3 s)."""
  (rc, log), = run_processes([[sys.executable, '-c', PREEMPTION_SCRIPT, str(tmp_path / 'c'),
                               case]], str(tmp_path), devices_per_process=1)
  assert rc == 0, log[-4000:]
  stopped = re.search(r'saved and stopped at (\d+)', log)
  assert stopped, log[-4000:]
  step, loop = int(stopped[1]), 'first' if case == 'after_a_save' else 'second'
  assert step >= (8 if case == 'after_a_save' else 1)
  assert os.path.isdir(tmp_path / 'c' / loop / str(step))


def test_single_process_helpers():
  multihost.check_same_config(make_config())  # one process: nothing to compare
  multihost.sync('nothing to wait for')
  x = jnp.arange(12.0).reshape(6, 2)
  np.testing.assert_array_equal(multihost.to_host(x), np.arange(12.0).reshape(6, 2))
  host = multihost.tree_to_host({'x': x, 'n': np.int32(3)})
  assert isinstance(host['x'], np.ndarray) and host['n'] == 3
  np.testing.assert_array_equal(host['x'], np.arange(12.0).reshape(6, 2))
  digest = multihost.config_digest(make_config())
  assert digest.dtype == np.uint32 and digest.shape == (8,)
  other = make_config()
  other.recover.lr = 0.5
  assert not np.array_equal(multihost.config_digest(other), digest)


def test_cpu_devices_sets_the_device_count_unless_xla_flags_do(tmp_path):
  """Config `cpu_devices` has main's JAX make that many CPU devices and plan the work over
  them; `multihost.set_cpu_devices` makes any count, and XLA_FLAGS'
  --xla_force_host_platform_device_count, where set, wins (as the tests' 8 devices do)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                            env.get('XLA_FLAGS', '')).strip()
  command = testlib.main_command('fashion_mnist_ipc10', tmp_path / 'w', stages='recover',
                                 overrides={'cpu_devices': 2}, flags=['--dry_run'])
  out = testlib.run_command(command, env=env, timeout_s=TIMEOUT)
  assert set(re.findall(r'on (\d+) device\(s\)', out.stdout + out.stderr)) == {'2'}
  assert not (tmp_path / 'w').exists()  # a dry run writes nothing

  def devices(count, env):
    code = ('import jax; from sre2l_jax import multihost; '
            f'print(multihost.set_cpu_devices({count}), jax.device_count())')
    return testlib.run_command([sys.executable, '-c', code], env=env,
                               timeout_s=TIMEOUT).stdout.split()

  assert devices(3, env) == ['True', '3']
  forced = dict(env, XLA_FLAGS=f'{env["XLA_FLAGS"]} --xla_force_host_platform_device_count=4')
  assert devices(3, forced) == ['False', '4']


def test_recover_metrics_keep_a_row_per_device_and_average_like_one_device():
  """The recover step has no collective (XLA's CPU runtime deadlocked in its collectives on
  several devices, docs/performance.md): each device steps its own groups and its metrics
  come back one row per device; averaged as the loop reads them (`Loop.per_device`) they
  are the one-device step's, and so are the images."""
  config = make_config()
  model, teacher = testlib.random_teacher(config)
  cfg = config.recover
  tx = optimize.create_optimizer(cfg)
  labels, uids, _ = optimize.group_layout(SPEC.num_classes, 2, 5, 1)  # 4 groups of 5
  # On the host: each mesh gets buffers of its own (the step donates its state).
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), uids.shape + SPEC.image_shape))
  results = {}
  for devices in (1, 4):
    mesh = batching.create_mesh(devices)
    recovery = optimize.Recovery(synthesis.get_method('sre2l'), model, cfg, tx,
                                 optimize.pixel_bounds(SPEC), mesh)
    shardings = optimize.state_shardings(tx, images.shape, mesh)
    sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
    args = (jax.device_put(optimize.create_state(images, tx), shardings),
            jax.device_put(labels, sharded), jax.device_put(uids, sharded),
            jax.device_put(jax.random.PRNGKey(1), replicated),
            jax.device_put(teacher, replicated))
    step = optimize.create_recover_step(recovery, shardings)
    program = step.lower(*args).compile().as_text()
    assert not re.search(r'all-reduce|all-gather|collective-permute|all-to-all', program)
    state, metrics = step(*args)
    assert metrics['loss'].shape == (devices,) and metrics['finite'].shape == (devices,)
    results[devices] = (np.asarray(state['images']),
                        train_lib.fetch_metrics([metrics], per_device=True)[0])
  # The same per-group arithmetic (a group's program does not depend on what else its
  # device holds, optimize.map_groups); only the mean over groups is summed in another
  # order: float32 rounding of 4 terms.
  np.testing.assert_allclose(results[4][0], results[1][0], rtol=1e-6, atol=1e-6)
  for key in ('loss', 'bn_loss', 'ce'):
    np.testing.assert_allclose(results[4][1][key], results[1][1][key], rtol=1e-6)
  assert results[4][1]['finite'] and results[1][1]['finite']
