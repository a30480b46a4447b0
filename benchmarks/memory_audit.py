"""Memory audit at ImageNet shapes: XLA's per-device memory of the stages' real steps.

  python -m benchmarks.memory_audit --json=memory_cpu.json                # this CPU's XLA
  python -m benchmarks.memory_audit --target=tpu_v5e --libtpu=DIR --json=memory_v5e.json

Every step is the stage's own (`optimize.create_recover_step`, `squeeze.
create_classification_step`, `student.create_student_step`), compiled at abstract shapes
(`jax.ShapeDtypeStruct`; nothing is allocated, no data or teacher file is read) for
`--target`: 'cpu' (this machine's XLA) or a TPU chip compiled for without one ('tpu_v4',
'tpu_v5e': deviceless compilation through libtpu, installed apart from the environment with
`pip install --target DIR libtpu==0.0.42.*`, the version jax[tpu] 0.10.2 pins).

recover (configs/in1k_ipc50.py: ResNet-18, 224 x 224, groups of 100): each lever at 1, 2
and 4 groups, the line peak = fixed + groups * per_group, and from it groups per round and
rounds for the known devices (`memory.DEVICES`, `--margin` of their memory) and a projected
time on one H100 (XLA's FLOPs at `memory.PROJECTED_UTILISATION` of the datasheet peak: a
projection). squeeze (batch 256) and the student step with the online teacher (batch 1024):
the peak of one step. The stage itself checks its round against XLA at its real size
(`python -m sre2l_jax.main ... --stages=recover --dry_run`).
"""

import argparse
import functools
import json
import os
import platform
import sys
import time

LEVERS = {
    # name: (recover.dtype, recover.remat, donate the state, recover.parallel_groups)
    'float32': ('float32', 'none', True, 1),
    'bfloat16': ('bfloat16', 'none', True, 1),
    'float32_remat_teacher': ('float32', 'teacher', True, 1),
    'float32_remat_blocks': ('float32', 'blocks', True, 1),
    'bfloat16_remat_blocks': ('bfloat16', 'blocks', True, 1),
    'float32_not_donated': ('float32', 'none', False, 1),
    # Every group of a device at once (vmapped): the step before rounds, the numbers.
    'float32_all_at_once': ('float32', 'none', True, 0),
    'bfloat16_all_at_once': ('bfloat16', 'none', True, 0),
}
TPU_TOPOLOGIES = {'tpu_v4': ('v4:1x1x1', 'megacore'), 'tpu_v5e': ('v5e:1x1', 'default')}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--what', default='recover,squeeze,student')
  p.add_argument('--levers', default=','.join(LEVERS), help=f'comma list of {list(LEVERS)}')
  p.add_argument('--groups', default='1,2,4', help='recover: groups per device to compile')
  p.add_argument('--target', default='cpu', choices=('cpu',) + tuple(TPU_TOPOLOGIES))
  p.add_argument('--libtpu', default='', help='folder holding the libtpu package (TPU targets)')
  p.add_argument('--margin', type=float, default=0.9, help='fraction of device memory planned')
  p.add_argument('--squeeze_batch', type=int, default=256)
  p.add_argument('--student_batch', type=int, default=1024)
  p.add_argument('--json', default='')
  return p.parse_args(argv)


def target_mesh(target: str, libtpu: str):
  """A one-device mesh of `target` (a real CPU device, or an abstract TPU chip)."""
  import jax  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import batching  # pylint: disable=g-import-not-at-top
  if target == 'cpu':
    return batching.create_mesh(1)
  if libtpu:
    sys.path.insert(0, libtpu)
  # libtpu looks for a TPU VM's metadata unless told it is alone.
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-1')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name, chip = TPU_TOPOLOGIES[target]
  topology = topologies.get_topology_desc(topology_name=name, platform='tpu',
                                          chips_per_host_bounds=(1, 1, 1),
                                          chip_config_name=chip)
  del jax
  return topologies.make_mesh(topology, (1,), ('data',))


def imagenet_config():
  from sre2l_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                   'in1k_ipc50.py'), None)


def audit_recover(args, mesh) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from sre2l_jax import memory, models, recover, synthesis  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import batching, datasets  # pylint: disable=g-import-not-at-top
  from sre2l_jax.synthesis import optimize  # pylint: disable=g-import-not-at-top
  config = imagenet_config()
  spec = datasets.get_spec(config.dataset.name)
  cfg = config.recover
  groups_total = cfg.ipc * spec.num_classes // cfg.batch_size
  counts = [int(g) for g in args.groups.split(',')]
  out = {'config': 'configs/in1k_ipc50.py', 'teacher': 'resnet18', 'image_size': 224,
         'group_size': cfg.batch_size, 'groups': groups_total, 'iterations': cfg.iterations,
         'levers': {}}
  for lever in args.levers.split(','):
    dtype, remat, donate, parallel = LEVERS[lever]
    with config.unlocked():
      config.recover.update(dtype=dtype, remat=remat, parallel_groups=parallel)
    model = recover.create_teacher_model(config, spec)
    teacher = models.abstract_variables(model, spec.image_shape)
    tx = optimize.create_optimizer(config.recover)
    shardings = optimize.state_shardings(tx, (1, cfg.batch_size) + spec.image_shape, mesh)
    recovery = optimize.Recovery(synthesis.get_method(cfg.method), model, config.recover, tx,
                                 optimize.pixel_bounds(spec), mesh)
    step = optimize.create_recover_step(recovery, shardings)
    if not donate:  # the same step without donation: its outputs are new buffers
      sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
      step = jax.jit(
          functools.partial(optimize.recover_step, recovery=recovery),
          in_shardings=(shardings, sharded, sharded, replicated, replicated),
          out_shardings=(shardings, sharded))
    rng = jax.random.key(0)
    rows = []
    for g in counts:
      start = time.time()
      compiled = optimize.compile_recover_step(step, tx, g, cfg.batch_size, spec.image_shape,
                                               mesh, teacher, rng)
      report = memory.analyse(compiled)
      rows.append(report.to_dict() | {'groups': g, 'compile_s': time.time() - start})
      print(f'recover {lever} {g} group(s): {memory.describe(report)}, '
            f'{(report.flops or 0) / 1e9:.0f} GFLOP ({time.time() - start:.0f} s)', flush=True)
    fixed, per_group = memory.fit_line([r['groups'] for r in rows],
                                       [r['peak_bytes'] for r in rows])
    flops_per_group = rows[0]['flops'] / rows[0]['groups'] if rows[0]['flops'] else None
    devices = {}
    for name, device in memory.DEVICES.items():
      budget = device.memory_gib * memory.GIB * args.margin
      fit = int((budget - fixed) // per_group)
      entry = {'memory_gib': device.memory_gib, 'groups_per_round': fit}
      if fit >= 1:
        entry['rounds'], entry['balanced_groups_per_round'] = memory.balanced_rounds(
            groups_total, min(fit, groups_total))
      if flops_per_group:
        peak = device.peak_tflops[dtype]
        entry['projected_hours'] = memory.projected_seconds(
            flops_per_group * groups_total, cfg.iterations, 1, peak,
            memory.PROJECTED_UTILISATION) / 3600
        entry['projection'] = (f'{100 * memory.PROJECTED_UTILISATION:.0f}% of {peak:g} '
                               f'TFLOP/s ({dtype})')
      devices[name] = entry
    out['levers'][lever] = {'dtype': dtype, 'remat': remat, 'donated': donate,
                            'parallel_groups': parallel,
                            'reports': rows, 'fixed_bytes': fixed,
                            'bytes_per_group': per_group, 'flops_per_group_step': flops_per_group,
                            'devices': devices}
    print(f'recover {lever}: {per_group / memory.GIB:.2f} GiB per group + '
          f'{fixed / memory.GIB:.2f} GiB; ' + ', '.join(
              f'{n} {d["groups_per_round"]} groups/round'
              + (f' {d["rounds"]} rounds' if 'rounds' in d else '')
              + (f' {d["projected_hours"]:.1f} h' if 'projected_hours' in d else '')
              for n, d in devices.items()), flush=True)
  return out


def audit_squeeze(args, mesh) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sre2l_jax import memory, models, squeeze, train_lib  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import batching, datasets  # pylint: disable=g-import-not-at-top
  config = imagenet_config()
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  tx = train_lib.create_optimizer(config.squeeze, train_lib.warmup_cosine(0.1, 1000))
  state = train_lib.abstract_train_state(model, tx, spec.image_shape, mesh)
  b = args.squeeze_batch
  sharded = batching.data_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((b,) + spec.image_shape, jnp.uint8, sharding=sharded),
           'label': jax.ShapeDtypeStruct((b,), jnp.int32, sharding=sharded)}
  rng = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype,
                             sharding=batching.replicated(mesh))
  step = squeeze.create_classification_step(spec, mesh, 0.0)
  report = memory.analyse(step.lower(state, batch, rng).compile())
  print(f'squeeze batch {b}: {memory.describe(report)}', flush=True)
  return report.to_dict() | {'batch_size': b, 'model': 'resnet18'}


def audit_student(args, mesh) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from sre2l_jax import memory, models, student, train_lib  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import batching, datasets  # pylint: disable=g-import-not-at-top
  config = imagenet_config()
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.student, spec.num_classes)
  teacher_model = models.create_model(config.teacher, spec.num_classes)
  tx = train_lib.create_optimizer(config.evaluate, train_lib.warmup_cosine(1e-3, 1000))
  replicated, sharded = batching.replicated(mesh), student.stacked_sharding(mesh)
  state = jax.tree_util.tree_map(  # a stack of one student
      lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype, sharding=replicated),
      train_lib.abstract_train_state(model, tx, spec.image_shape, mesh))
  teacher = models.abstract_variables(teacher_model, spec.image_shape, replicated)
  b = args.student_batch
  images = jax.ShapeDtypeStruct((1, b) + spec.image_shape, jnp.uint8, sharding=sharded)
  labels = jax.ShapeDtypeStruct((1, b), jnp.int32, sharding=sharded)
  key = jax.ShapeDtypeStruct(jax.random.key(0).shape, jax.random.key(0).dtype,
                             sharding=replicated)
  step = student.create_student_step(config, spec, teacher_model, mesh, 'online')
  report = memory.analyse(step.lower(state, images, labels, None, key, teacher).compile())
  print(f'student batch {b} (online teacher): {memory.describe(report)}', flush=True)
  return report.to_dict() | {'batch_size': b, 'student': 'resnet18', 'teacher': 'resnet18'}


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  mesh = target_mesh(args.target, args.libtpu)
  out = {'target': args.target, 'margin': args.margin, 'jax': jax.__version__,
         'machine': platform.machine(), 'command': ' '.join(['python -m benchmarks.memory_audit']
                                                             + sys.argv[1:])}
  what = args.what.split(',')
  if 'recover' in what:
    out['recover'] = audit_recover(args, mesh)
  if 'squeeze' in what:
    out['squeeze'] = audit_squeeze(args, mesh)
  if 'student' in what:
    out['student'] = audit_student(args, mesh)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == '__main__':
  main()
