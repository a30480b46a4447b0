"""Wall time of the evaluate stage with its students trained together vs one by one.

  python -m benchmarks.evaluate_stack --config=configs/fashion_mnist_ipc10.py:ipc=10,seeds=3 \
      --inputs=runs/fm_ipc10 --workdir=runs/bench_evaluate --json=runs/bench_evaluate.json

Runs `evaluate.run` twice on the same inputs, each in a fresh workdir and the same process:
once with `evaluate.stack_students=1` (every student compiled and trained by itself, as
evaluate did before students were stacked) and once with `evaluate.stack_students=0` (all
students of a stack in one compiled step; at the README's settings the 3 seeds of the
distilled set and the 3 of the random subset, 6 students, share the views and the teacher's
forward per set). The order alternates with `--order`. Reports the wall time of each (the
whole stage: loading, compiling, training, testing), their ratio, the per-student test top-1
of both and their largest difference (float rounding only), the load average before and
after each, and the device count.

Inputs: `--inputs` is a workdir holding a teacher (`squeeze/teacher`) and a distilled set
(`recover/tfds`), e.g. the default command's; without it a teacher with random weights and a
distilled set of noise are made (wall time does not depend on the values). Fashion-MNIST is
read as the config says (the default command prepares it). `--set key=value` overrides
config keys (e.g. `--set student.epochs=2` for a quick check). A persistent JAX compilation
cache would let the second run skip compiling: the JSON records whether one is configured.
"""

import argparse
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

from benchmarks import bench
from sre2l_jax import config_lib
from sre2l_jax import context
from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import image_sets
from sre2l_jax import models
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import teacher_store
from sre2l_jax.data import datasets


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--config', default='configs/fashion_mnist_ipc10.py:ipc=10,seeds=3',
                 help='config file[:argument], as main takes it')
  p.add_argument('--inputs', default='', help='workdir with squeeze/teacher and recover/tfds')
  p.add_argument('--workdir', default='runs/bench_evaluate', help='replaced if it exists')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. student.epochs=2 (repeatable)')
  p.add_argument('--order', default='alone,together',
                 help='which run first: alone,together or together,alone')
  p.add_argument('--json', default='', help='write the results here')
  args = p.parse_args(argv)
  args.order = [o.strip() for o in args.order.split(',')]
  if sorted(args.order) != ['alone', 'together']:
    p.error('--order must name alone and together once each')
  return args


def load_config(args):
  path, _, arg = args.config.partition(':')
  config = config_lib.load_config_file(path, arg or None)
  for item in args.set:
    key, _, value = item.partition('=')
    section, _, name = key.rpartition('.')
    target = config[section] if section else config
    current = target[name]
    if isinstance(current, bool):
      target[name] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(current, tuple):
      target[name] = tuple(v for v in value.split(',') if v)
    else:
      target[name] = type(current)(value)
  return config


def make_inputs(config, inputs: str, workdir: str) -> str:
  """A workdir holding the evaluate stage's inputs: copied from `inputs`, or made."""
  os.makedirs(workdir)
  if inputs:
    for part in (('squeeze', 'teacher'), ('recover',)):
      shutil.copytree(os.path.join(inputs, *part), os.path.join(workdir, *part))
    return workdir
  spec = datasets.get_spec(config.dataset.name)
  model = models.create_model(config.teacher, spec.num_classes)
  variables = bench.teacher_variables(model, spec.image_shape, config.seed)
  teacher_store.save(os.path.join(workdir, 'squeeze', 'teacher'), variables,
                   teacher_lib.teacher_meta(config, spec))
  rng = np.random.default_rng(config.seed)
  ipc = config.recover.ipc
  images = rng.integers(0, 256, (spec.num_classes * ipc,) + spec.image_shape, np.uint8)
  labels = np.repeat(np.arange(spec.num_classes), ipc).astype(np.int32)
  export.write_tfds(image_sets.distilled_dir(workdir), images, labels, spec.num_classes)
  return workdir


def run(args) -> dict:
  config = load_config(args)
  if os.path.exists(args.workdir):
    shutil.rmtree(args.workdir)
  base = make_inputs(config, args.inputs, os.path.join(args.workdir, 'inputs'))
  out = {'config': args.config, 'overrides': args.set, 'inputs': args.inputs or 'random',
         'device_count': jax.device_count(), 'backend': jax.default_backend(),
         'cpu_count': os.cpu_count(), 'seeds': config.evaluate.seeds,
         'compilation_cache_dir': jax.config.jax_compilation_cache_dir, 'runs': {}}
  for mode in args.order:
    workdir = os.path.join(args.workdir, mode)
    shutil.copytree(base, workdir)
    config.evaluate.stack_students = 1 if mode == 'alone' else 0
    load_before = bench.load_average()
    start = time.perf_counter()
    result = evaluate.run(config, workdir, context.resolve(config, workdir))
    wall = time.perf_counter() - start
    out['runs'][mode] = {
        'wall_s': wall, 'loadavg_before': load_before, 'loadavg_after': bench.load_average(),
        'stack_students': config.evaluate.stack_students,
        'students': sum(v['seeds'] for v in result['variants'].values()),
        'test_top1': {name: v['test_top1'] for name, v in result['variants'].items()}}
    print(f'{mode}: {wall:.1f} s', flush=True)
  alone, together = out['runs']['alone'], out['runs']['together']
  out['speedup_together_over_alone'] = alone['wall_s'] / together['wall_s']
  out['max_top1_difference'] = max(
      abs(a - b) for name in alone['test_top1']
      for a, b in zip(alone['test_top1'][name], together['test_top1'][name]))
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  print(f'{together["students"]} students: one by one {alone["wall_s"]:.1f} s, together '
        f'{together["wall_s"]:.1f} s, {out["speedup_together_over_alone"]:.2f}x; largest '
        f'top-1 difference {out["max_top1_difference"]:.4f}')
  return out


def main(argv=None) -> dict:
  return run(parse_args(argv))


if __name__ == '__main__':
  main(sys.argv[1:])
