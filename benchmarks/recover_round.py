"""One full-size round of the real recover stage at ImageNet shapes, beside its plan.

  python -m benchmarks.recover_round --workdir=/tmp/round --iterations=20 --json=round.json

On the device this runs on (a GPU in `launch/gpu_bench.sh`): the dry-run plan of
configs/in1k_ipc50.py for this device's own memory limit (`recover.plan`: groups per round,
XLA's predicted peak per device), then the stage itself (`recover.run`) on exactly one round
of that size (`ipc` chosen so the groups fill one round; `--iterations` instead of 4000), with
a random ResNet-18 teacher (random weights, non-trivial running statistics, nothing learned:
the quality checks are off). Records the measured peak device memory
(`memory_stats()['peak_bytes_in_use']`) and throughput (image-iterations/s) next to the
prediction. The stage's TFDS export needs tensorflow_datasets; where it is missing the round's
own outputs (written before the export) still hold the measurement.
"""

import argparse
import json
import math
import os
import shutil
import time


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--workdir', default='/tmp/recover_round')
  p.add_argument('--iterations', type=int, default=20)
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  p.add_argument('--device_memory_gb', type=float, default=0.0,
                 help='0: the device\'s own limit (memory_stats bytes_limit)')
  p.add_argument('--json', default='')
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import bench  # pylint: disable=g-import-not-at-top
  from sre2l_jax import config_lib, context, memory, recover  # pylint: disable=g-import-not-at-top
  from sre2l_jax import teacher as teacher_lib  # pylint: disable=g-import-not-at-top
  from sre2l_jax.data import datasets  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load_config_file(os.path.join(repo, 'configs', 'in1k_ipc50.py'), None)
  spec = datasets.get_spec(config.dataset.name)
  with config.unlocked():
    config.recover.update(iterations=args.iterations, dtype=args.dtype,
                          device_memory_gb=args.device_memory_gb, min_bn_reduction=0.0,
                          min_teacher_top1=0.0, checkpoint_every_steps=10 ** 6,
                          log_every_steps=max(1, args.iterations // 4))
    config.mesh_shape = 1
  device = jax.local_devices()[0]
  out = {'device': device.device_kind, 'dtype': args.dtype, 'iterations': args.iterations}

  start = time.time()
  ctx = context.resolve(config, args.workdir)
  planned = recover.plan(config, args.workdir, ctx)['plans']['this device']
  out['plan'] = planned
  out['plan_seconds'] = time.time() - start
  groups = planned['largest_groups_per_round'] or planned['groups_per_round']
  chunks = spec.num_classes // config.recover.batch_size
  with config.unlocked():
    config.recover.ipc = max(1, math.floor(groups / chunks))  # one round, full or nearly
    config.recover.groups_per_round = config.recover.ipc * chunks
  out['groups_run'] = config.recover.groups_per_round

  shutil.rmtree(args.workdir, ignore_errors=True)
  model = recover.create_teacher_model(config, spec)
  variables = bench.teacher_variables(model, spec.image_shape, seed=0)
  teacher_lib.save(teacher_lib.teacher_dir(config, args.workdir), variables,
                   teacher_lib.teacher_meta(config, spec))
  start = time.time()
  try:
    result = recover.run(config, args.workdir, ctx)
    out['result'] = {k: result[k] for k in ('rounds', 'groups_per_round',
                                            'image_iterations_per_second', 'wall_seconds')}
  except Exception as e:  # pylint: disable=broad-except  # e.g. the TFDS export, absent here
    out['error_after_round'] = f'{type(e).__name__}: {str(e)[:300]}'
  out['stage_seconds'] = time.time() - start
  summary = os.path.join(args.workdir, 'recover', 'rounds', 'round_00000.json')
  if os.path.exists(summary):
    with open(summary) as f:
      out['image_iterations_per_second'] = json.load(f)['image_iterations_per_second']
  stats = device.memory_stats() or {}
  out['measured_peak_bytes'] = stats.get('peak_bytes_in_use')
  out['bytes_limit'] = stats.get('bytes_limit')
  plan_path = os.path.join(args.workdir, 'recover', 'plan.json')
  predicted = None
  if os.path.exists(plan_path):  # the stage's own plan of the round it ran
    with open(plan_path) as f:
      predicted = json.load(f)['peak_bytes']  # the round's: its step's or measure pass's
  out['predicted_peak_bytes'] = predicted
  print(f'recover round on {device.device_kind}: {out["groups_run"]} groups of 100, '
        f'{args.dtype}; planned peak '
        + (memory.format_bytes(predicted) if predicted else 'n/a')
        + ', measured peak '
        + (memory.format_bytes(out['measured_peak_bytes']) if out['measured_peak_bytes']
           else 'n/a')
        + f', {out.get("image_iterations_per_second") or 0:.0f} image-iterations/s')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1, default=str)
  return out


if __name__ == '__main__':
  main()
