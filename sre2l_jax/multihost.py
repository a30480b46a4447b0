"""Running one experiment as several processes (TPU pod slices, multi-node GPU, tests).

Every process runs the same program on its own devices; arrays sharded on the mesh's 'data'
axis span all of them. Three things need care beyond that:
  start-up     `initialize()`: jax.distributed.initialize() with the process layout taken
               from the environment where JAX does not detect it by itself; and on a CPU
               host `set_cpu_devices(n)`: the devices JAX makes of the host's cores;
  agreement    `check_same_config(config)`: processes started with different configs would
               run different programs and hang or corrupt the workdir, so they must refuse;
  host copies  `to_host(array)`: an array sharded over several processes is not readable by
               one of them; it is gathered (in bounded chunks) before it is exported;
               `tree_to_host(tree)` gathers many small ones (metrics) in one program.
Only process 0 writes metrics, JSON and exports (`checkpoint.write_json`,
`train_lib.create_writer`, the stages' exports); Orbax checkpoints are written by all
processes together into the same (shared) directory.
"""

import glob
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

# Read by `initialize` (JAX itself reads JAX_COORDINATOR_ADDRESS, and detects Cloud TPU,
# SLURM, Open MPI and Kubernetes layouts; these cover any other launcher, e.g. the tests).
NUM_PROCESSES_ENV = 'JAX_NUM_PROCESSES'
PROCESS_ID_ENV = 'JAX_PROCESS_ID'


# PCI ids of Cloud TPU chips (vendor Google): v3, v4, v5p, v5e, v6e, TPU7x. The vendor also
# makes the VMs' network card (gVNIC, 0x0042), hence the device list.
_GOOGLE_PCI_VENDOR = '0x1ae0'
_TPU_PCI_DEVICES = frozenset({'0x0027', '0x005e', '0x0062', '0x0063', '0x006f', '0x0076'})


def on_cloud_tpu_vm(pci_devices: str = '/sys/bus/pci/devices') -> bool:
  """Whether TPU chips are attached to this host (a Cloud TPU VM): there
  jax.distributed.initialize() finds the slice's hosts from the metadata server by itself,
  without the TPU_WORKER_HOSTNAMES that GKE sets. Reads PCI ids only (no network)."""
  for vendor in glob.glob(os.path.join(pci_devices, '*', 'vendor')):
    device = os.path.join(os.path.dirname(vendor), 'device')
    with open(vendor) as f:
      if f.read().strip() != _GOOGLE_PCI_VENDOR:
        continue
    with open(device) as f:
      if f.read().strip() in _TPU_PCI_DEVICES:
        return True
  return False


FORCE_DEVICES_FLAG = 'xla_force_host_platform_device_count'


def set_cpu_devices(count) -> bool:
  """Has JAX's CPU backend make `count` devices of this host's cores (`cpu_devices` of the
  config); a batch is then split over them as over several GPUs, by the same sharded steps.
  Returns whether it was set.

  Why: XLA runs one CPU device's step with cores left idle; with several devices their
  shares run side by side (docs/performance.md: on 2 cores, 2 devices train the
  Fashion-MNIST teacher 1.5x and its students 2.1x as fast as one). The risk: XLA's CPU
  collectives can abort the process (a rendezvous timeout; seen once in squeeze's test pass
  with a second such job on the cores), hence opt-in. 0 leaves JAX's default (one device). It takes effect only before JAX's backends start (main and `api.distill`
  call it first; in a notebook that used JAX already it logs that it had none); XLA_FLAGS'
  --xla_force_host_platform_device_count, an explicit choice of the environment (the tests'
  8 devices), wins. GPU and TPU hosts are unaffected: their devices are the accelerators.
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 0:
    raise ValueError(f'cpu_devices={count!r} must be an integer >= 0 (0: JAX\'s default, '
                     f'one device).')
  if count == 0 or FORCE_DEVICES_FLAG in os.environ.get('XLA_FLAGS', ''):
    return False
  try:
    jax.config.update('jax_num_cpu_devices', count)
  except RuntimeError:  # JAX's backends started before (e.g. a notebook that used JAX)
    logging.warning('cpu_devices=%d has no effect: JAX had started; set it before the first '
                    'JAX call (jax.config.update("jax_num_cpu_devices", %d)).', count, count)
    return False
  return True


def initialize() -> None:
  """jax.distributed.initialize(), with num_processes / process_id from the environment.

  Set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID where JAX
  cannot detect the cluster; on Cloud TPU and under SLURM nothing needs setting.
  """
  kwargs = {}
  if os.environ.get(NUM_PROCESSES_ENV):
    kwargs['num_processes'] = int(os.environ[NUM_PROCESSES_ENV])
  if os.environ.get(PROCESS_ID_ENV):
    kwargs['process_id'] = int(os.environ[PROCESS_ID_ENV])
  jax.distributed.initialize(**kwargs)


def config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(sort_keys=True)


def config_digest(config: ml_collections.ConfigDict) -> np.ndarray:
  """SHA-256 of the config's JSON as uint32 (8,) (a dtype collectives carry without x64)."""
  digest = hashlib.sha256(config_json(config).encode()).digest()
  return np.frombuffer(digest, np.uint32).copy()


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (length first: shapes must agree)."""
  data = np.frombuffer(text.encode(), np.uint8)
  length = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
  padded = np.zeros(length, np.uint8)
  padded[:min(length, len(data))] = data[:length]
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(padded))).decode()


def check_same_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on every process unless all processes hold the same config.

  Collective: every process must call it. The message names the processes whose config
  differs from process 0's, and on those processes the differing keys.
  """
  if jax.process_count() == 1:
    return
  digests = np.asarray(multihost_utils.process_allgather(config_digest(config)))
  groups: dict[bytes, list[int]] = {}
  for process, digest in enumerate(digests.reshape(jax.process_count(), -1)):
    groups.setdefault(digest.tobytes(), []).append(process)
  if len(groups) == 1:
    return
  # Every process takes this branch (they all see the same digests), so the broadcast below
  # is entered by all of them.
  reference = broadcast_text(config_json(config))
  different = sorted(p for members in groups.values() if 0 not in members for p in members)
  ours, theirs = _flatten(json.loads(config_json(config))), _flatten(json.loads(reference))
  keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
  detail = '; '.join(f'{k}: process 0 has {theirs.get(k)!r}, this process '
                     f'({jax.process_index()}) has {ours.get(k)!r}' for k in keys)
  raise ValueError(
      f'The {jax.process_count()} processes were started with different configurations: '
      f'process(es) {different} disagree with process 0 (config SHA-256 per process: '
      f'{[bytes(d.view(np.uint8)).hex()[:12] for d in digests.reshape(jax.process_count(), -1)]}). '
      + (f'Differences: {detail}. ' if detail else '')
      + 'Start every process with the same --config, config overrides and code version.')


def sync(name: str) -> None:
  """Barrier across processes (no-op on one process): e.g. after process 0 wrote files
  that the others read next."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(array: jax.Array, max_chunk_bytes: int = 1 << 28) -> np.ndarray:
  """The whole of `array` as numpy on every process, whatever its sharding.

  A fully addressable array is read directly. An array spread over several processes is
  gathered along axis 0 in slices of at most ~`max_chunk_bytes` (replicated on every device
  while in flight), so a distilled set far larger than one device's memory can be read.
  """
  if array.is_fully_addressable:
    return np.asarray(jax.device_get(array))
  if not isinstance(array.sharding, jax.sharding.NamedSharding):
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  rows = array.shape[0]
  row_bytes = max(1, array.nbytes // max(rows, 1))
  chunk = max(1, min(rows, max_chunk_bytes // row_bytes))
  while rows % chunk:  # equal slices: one compiled gather
    chunk -= 1
  replicated = jax.sharding.NamedSharding(array.sharding.mesh, jax.sharding.PartitionSpec())
  gather = jax.jit(lambda x, i: jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk),
                   out_shardings=replicated)
  parts = [np.asarray(gather(array, i).addressable_data(0)) for i in range(rows // chunk)]
  return np.concatenate(parts)


def tree_to_host(tree):
  """Every leaf of `tree` (small arrays: metrics) as numpy on every process, gathered in
  one compiled program whatever the number of leaves: `to_host` leaf by leaf would run a
  program (and a cross-process collective) per leaf, e.g. recover's per-layer metrics of
  every step between two logs. Leaves spread over processes must be NamedSharding'd on one
  mesh; others are read as they are."""
  leaves, treedef = jax.tree.flatten(tree)
  spread = [i for i, leaf in enumerate(leaves)
            if not getattr(leaf, 'is_fully_addressable', True)]
  host = [None] * len(leaves)
  if spread:
    shardings = [leaves[i].sharding for i in spread]
    if (not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings)
        or len({s.mesh for s in shardings}) != 1):
      raise ValueError('tree_to_host gathers leaves sharded on one mesh (NamedSharding); '
                       'use to_host for each of these.')
    replicated = jax.sharding.NamedSharding(shardings[0].mesh, jax.sharding.PartitionSpec())
    gathered = jax.jit(lambda *xs: xs, out_shardings=replicated)(*[leaves[i] for i in spread])
    for i, leaf in zip(spread, gathered):
      host[i] = np.asarray(leaf.addressable_data(0))
  local = [i for i in range(len(leaves)) if host[i] is None]
  for i, value in zip(local, jax.device_get([leaves[i] for i in local])):
    host[i] = np.asarray(value)
  return jax.tree.unflatten(treedef, host)
