"""gs:// workdirs, for real but offline: a GCS JSON-API emulator on 127.0.0.1 (PyPI's
`gcp-storage-emulator`, see `gcs_emulator.py`), started and stopped by these tests.

Every client is pointed at it: gcsfs (etils.epath's gs:// backend without TensorFlow) and
google-cloud-storage by STORAGE_EMULATOR_HOST, TensorStore (Orbax's array writer) by
TENSORSTORE_GCS_HTTP_URL; no credentials are looked for (anonymous gcsfs, TensorStore's
testing token), and gcsfs's bucket-type lookup over gRPC, which the emulator does not
serve, is off. Nothing but the loopback address is reached.
"""

import os
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from etils import epath

from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import runner
from sre2l_jax.data import builders
from sre2l_jax.data import datasets
import testlib

BUCKET = 'sre2l-test'


def emulator_env(port: int) -> dict:
  """The environment variables that point every GCS client at the emulator on `port`."""
  url = f'http://127.0.0.1:{port}'
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'FSSPEC_GCS_TOKEN': 'anon',
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'EPATH_USE_TF': 'false'}


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator's environment, set in this process too; the emulator stops afterwards."""
  log = tmp_path_factory.mktemp('gcs') / 'emulator.log'
  with open(log, 'w') as stderr:
    process = subprocess.Popen([sys.executable, os.path.join(testlib.REPO, 'tests',
                                                             'gcs_emulator.py'), BUCKET],
                               stdout=subprocess.PIPE, stderr=stderr, text=True)
  saved = {}
  try:
    line = process.stdout.readline()  # 'port N' once it listens
    assert line.startswith('port '), line + log.read_text()
    env = emulator_env(int(line.split()[1]))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec  # pylint: disable=g-import-not-at-top
    gcs_conf = fsspec.config.conf.setdefault('gcs', {})
    saved_token = gcs_conf.get('token')
    gcs_conf['token'] = 'anon'  # fsspec reads FSSPEC_GCS_TOKEN at import only
    yield env
    if saved_token is None:
      del gcs_conf['token']
    else:
      gcs_conf['token'] = saved_token
  finally:
    process.kill()
    process.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def relative_files(folder) -> list[str]:
  """The files under `folder` (local or gs://) relative to it, in `files`' copy order."""
  root = files.as_path(folder)
  return [os.fspath(p.relative_to(root)) for p in files.files_in_copy_order(root)]


def test_files_helpers_work_in_a_bucket(gcs, tmp_path):
  del gcs
  tensorflow_before = 'tensorflow' in sys.modules  # (another test module may import it)
  root = f'gs://{BUCKET}/helpers'
  # gcsfs, not TensorFlow's gfile, serves gs:// (files sets EPATH_USE_TF=false by default).
  backend = epath.Path(root)._backend  # pylint: disable=protected-access
  assert type(backend).__name__ == '_FileSystemSpecBackend'
  assert files.absolute(root) == root and files.is_remote(root)
  assert not files.exists(f'{root}/a.json')
  files.write_json(f'{root}/a.json', {'x': (1, 2)})
  assert files.read_json(f'{root}/a.json') == {'x': [1, 2]}
  array = np.arange(12, dtype=np.float32).reshape(3, 4)
  files.save_npy(f'{root}/a.npy', array)
  np.testing.assert_array_equal(files.load_npy(f'{root}/a.npy'), array)
  assert files.size(f'{root}/a.npy') == len(files.read_bytes(f'{root}/a.npy')) > array.nbytes
  many = [(f'{root}/many/{i:02d}.bin', bytes([i]) * (100 + i)) for i in range(40)]
  files.write_all(many)  # 16 uploads at a time
  assert [files.read_bytes(path) for path, _ in many] == [data for _, data in many]

  # A folder replaced from a local one and from one in the bucket: whole, old files gone,
  # the temporary folder deleted; JSON files copied last, files in subfolders first.
  local = tmp_path / 'folder'
  (local / 'sub').mkdir(parents=True)
  (local / 'sub' / 'w.bin').write_bytes(b'\0' * 100)
  (local / 'meta.json').write_text('{}')
  (local / 'z.txt').write_text('z')
  assert relative_files(local) == ['sub/w.bin', 'z.txt', 'meta.json']
  files.atomic_write(f'{root}/folder/stale.txt', 'old')
  files.replace_dir(local, f'{root}/folder')
  assert relative_files(f'{root}/folder') == ['sub/w.bin', 'z.txt', 'meta.json']
  assert not files.exists(local)
  files.replace_dir(f'{root}/folder', f'{root}/moved')
  assert not files.exists(f'{root}/folder')
  assert files.read_bytes(f'{root}/moved/sub/w.bin') == b'\0' * 100
  with files.local_copy(f'{root}/moved') as copy:
    assert open(os.path.join(copy, 'z.txt')).read() == 'z'
  assert not os.path.exists(copy)
  files.rmtree(f'{root}/moved')
  assert not files.exists(f'{root}/moved/z.txt')

  # A TFDS export (ArrayRecord is written locally and uploaded) reads back in order.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 28, 28, 1), np.uint8)
  labels = np.repeat(np.arange(3), 2).astype(np.int32)
  dataset_dir = export.write_tfds(f'{root}/tfds', images, labels, 3)
  got_images, got_labels = export.read_tfds(dataset_dir)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  assert tensorflow_before or 'tensorflow' not in sys.modules  # gs:// needs no TensorFlow


def test_a_data_dir_in_a_bucket_is_read_from_a_copy_on_the_host(gcs, tmp_path, monkeypatch):
  del gcs
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  cut = testlib.cut_fashion_mnist(tmp_path, train=64, test=64)  # small: the emulator is slow
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke').dataset
  config.data_dir = f'gs://{BUCKET}/tfds_prepared'
  # Nothing prepared there: refused with the way to prepare it (a bucket is never written).
  with pytest.raises(ValueError, match='holds no prepared fashion_mnist.*tpu_pod.sh data'):
    datasets.prepare(config)
  # Prepared (locally, then uploaded): each host reads its own copy, made once.
  files.copy_tree(cut['data_dir'], config.data_dir)
  local = ml_collections.ConfigDict({**config.to_dict(), 'data_dir': cut['data_dir']})
  expected = datasets.load_arrays(local, 'test', limit=64)
  builder = datasets.prepare(config)
  copy_dir = tmp_path / 'cache' / 'sre2l_jax' / 'data' / 'gs' / BUCKET / 'tfds_prepared'
  assert builder.data_dir.startswith(str(copy_dir))
  assert (files.as_path(builder.data_dir) / datasets.HOST_COPY_MARK).exists()
  got = datasets.load_arrays(config, 'test', limit=64)
  np.testing.assert_array_equal(got[0], expected[0])
  np.testing.assert_array_equal(got[1], expected[1])
  # A second reader reuses the copy (a changed local file stays as it is).
  marker = files.as_path(builder.data_dir) / 'dataset_info.json'
  marker.write_text(marker.read_text())
  stamp = os.stat(marker).st_mtime_ns
  datasets.prepare(config)
  assert os.stat(marker).st_mtime_ns == stamp


def finalized_steps(directory: str) -> list[int]:
  """The finalized steps of an Orbax checkpoint folder in a bucket (Orbax marks each with
  commit_success.txt there: GCS has no atomic folder rename)."""
  path = files.as_path(directory)
  if not path.exists():
    return []
  return sorted(int(p.name) for p in path.iterdir()
                if p.name.isdigit() and (p / 'commit_success.txt').exists())


@pytest.mark.equivalence
@pytest.mark.slow
def test_pipeline_in_a_bucket_killed_and_resumed_makes_the_local_images(gcs, tmp_path):
  """The smoke pipeline with --workdir=gs://..., SIGKILLed mid-recover and run again there,
  ends like a local workdir: the same teacher-made images, bit for bit. Its labels are
  stored (label shards in the bucket, checked and read back by evaluate)."""
  data = testlib.cut_fashion_mnist(tmp_path)
  # Recover (8 iterations) checkpoints every 2: the kill comes 6 iterations before its end.
  overrides = {**{f'dataset.{k}': v for k, v in data.items()},
               'recover.checkpoint_every_steps': 2}
  env = dict(os.environ, **gcs)
  workdir = f'gs://{BUCKET}/run'
  stages = 'squeeze,recover,relabel,evaluate'
  command = testlib.main_command('fashion_mnist_ipc10', workdir, stages=stages,
                                 overrides={**overrides, 'relabel.mode': 'stored'})
  checkpoints = f'{workdir}/recover/checkpoints'
  first = files.as_path(f'{checkpoints}/2/commit_success.txt')  # Orbax's mark, last written
  last_poll = [0.0]

  def recover_checkpointed() -> bool:
    if time.time() - last_poll[0] < 0.02:  # one request to the emulator per poll
      return False
    last_poll[0] = time.time()
    return first.exists()

  testlib.kill_when(command, recover_checkpointed, tmp_path / 'killed.log', env=env,
                    timeout_s=600)
  assert not files.exists(f'{workdir}/recover/result.json')
  saved = finalized_steps(checkpoints)[-1]
  resumed = testlib.run_command(command, env=env, timeout_s=600)
  assert f'resumed from step {saved} ({checkpoints})' in resumed.stderr, resumed.stderr[-3000:]
  for stage in ('squeeze', 'recover', 'relabel', 'evaluate'):
    assert files.exists(f'{workdir}/{stage}/result.json'), stage
  for name in ('config.json', 'report.md', 'recover/images/new009/class009_id009.png'):
    assert files.exists(f'{workdir}/{name}'), name
  labels = files.read_json(f'{workdir}/relabel/result.json')['sets']['distilled']['dir']
  manifest = files.read_json(f'{workdir}/{labels}/manifest.json')
  assert manifest['complete'] and len(manifest['shards']) == 2  # 4 epochs, 2 per shard

  local = str(tmp_path / 'local')
  testlib.run_command(testlib.main_command('fashion_mnist_ipc10', local, stages='squeeze,recover',
                                           overrides=overrides), timeout_s=600)
  gs_images, gs_labels = export.read_tfds(export.tfds_dataset_dir(f'{workdir}/recover/tfds'))
  images, labels = export.read_tfds(export.tfds_dataset_dir(f'{local}/recover/tfds'))
  np.testing.assert_array_equal(gs_images, images)
  np.testing.assert_array_equal(gs_labels, labels)
  assert files.read_bytes(f'{workdir}/recover/grid.png') == files.read_bytes(
      f'{local}/recover/grid.png')


def test_raw_files_are_read_from_a_bucket(gcs, tmp_path):
  """Fashion-MNIST prepared from IDX files in a bucket (source_dir=gs://...) into a local
  data_dir reads back as written."""
  del gcs
  rng = np.random.default_rng(1)
  arrays = {}
  for split, (images_name, labels_name) in builders.FASHION_MNIST_FILES.items():
    n = {'train': 24, 'test': 8}[split]
    arrays[split] = (rng.integers(0, 256, (n, 28, 28), np.uint8),
                     rng.integers(0, 10, (n,), np.uint8))
    for name, array in zip((images_name, labels_name), arrays[split]):
      local = tmp_path / name[:-len('.gz')]
      testlib.write_idx(local, array)
      files.atomic_write(f'gs://{BUCKET}/idx/{local.name}', local.read_bytes())
  config = ml_collections.ConfigDict(dict(name='fashion_mnist', data_dir=str(tmp_path / 'tfds'),
                                          source_dir=f'gs://{BUCKET}/idx'))
  for split, (images, labels) in arrays.items():
    got_images, got_labels = datasets.load_arrays(config, split)
    order = np.argsort([np.flatnonzero((images == g[..., 0]).all((1, 2)))[0]
                        for g in got_images])  # TFDS shuffles on write
    np.testing.assert_array_equal(got_images[order][..., 0], images)
    np.testing.assert_array_equal(got_labels[order], labels)


def test_a_bucket_workdir_without_gcsfs_says_what_to_install(monkeypatch):
  files.check_reachable(f'gs://{BUCKET}/run')  # installed here: nothing to say
  monkeypatch.setitem(sys.modules, 'gcsfs', None)  # `import gcsfs` now fails
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  with pytest.raises(ValueError, match=r'pip install -e "\.\[gcs\]"'):
    runner.run(config, f'gs://{BUCKET}/run', ['squeeze'])
  files.check_reachable('/tmp/run')  # a local folder needs nothing
