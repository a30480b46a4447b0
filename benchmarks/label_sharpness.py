"""How soft a teacher's labels are: at the students' temperature, on the real test split or
on the image sets a run's students train on.

  python -m benchmarks.label_sharpness --teacher_dirs=runs/fm/squeeze/teacher,runs/t15/squeeze/teacher
  python -m benchmarks.label_sharpness --teacher_dirs=runs/fm/squeeze/teacher \
      --config=configs/fashion_mnist_ipc10.py:ipc=50 --workdir=runs/fm_ipc50

For each teacher folder (a squeeze stage's `teacher/`, read as `squeeze.teacher_dir` of
`--config`): its top-1 and, of softmax(logits / T) with T = `evaluate.temperature` (4 for
Fashion-MNIST) unless `--temperature` says otherwise, the mean entropy (nats; log C is
uniform) and the mean top probability. Two teachers of the same accuracy can teach very
differently: the students learn from these distributions, not from the argmax (docs/results.md,
issue 30: a longer-trained, more accurate teacher with sharper labels gave weaker students).
With `--workdir` (one teacher): the same figures on the whole images of each set its students
train on, the distilled set `--config` recovered there and the random subset and coreset
(`image_sets.image_sets`): how much recovery sharpened the labels of its starting images.
"""

import argparse
import ast
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sre2l_jax import config_lib
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import teacher as teacher_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets


def sharpness(logits, labels, temperature: float) -> dict:
  """{'top1', 'entropy' (nats, mean over images), 'top_prob' (mean)} of logits (N, C)."""
  p = jax.nn.softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)
  return {'top1': float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(labels))),
          'entropy': float(jnp.mean(entropy)), 'top_prob': float(jnp.mean(p.max(-1)))}


def teacher_forward(config, teacher_dir: str, batch: int = 1000):
  """The frozen teacher of `teacher_dir`, loaded and compiled once, as a function of uint8
  images (N, H, W, C) returning its logits (N, C) (in batches of `batch`)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.squeeze.teacher_dir = teacher_dir
  mesh = batching.create_mesh(1)
  model, variables = teacher_lib.load(config, '', mesh)
  spec = datasets.spec_of(config.dataset)
  forward = label_store.create_teacher_logits(model, variables, mesh)
  return lambda images: np.concatenate([
      np.asarray(forward(jnp.asarray(datasets.normalise(images[i:i + batch], spec))))
      for i in range(0, len(images), batch)])


def set_value(config, item: str) -> None:
  """Sets 'section.key=value' (a Python literal, else the string) in `config`."""
  key, sep, text = item.partition('=')
  found = config_lib.find(config, key) if sep else None
  if found is None:
    raise ValueError(f'--set={item!r}: expected KEY=VALUE with KEY a config key, e.g. '
                     f'recover.r_ce=0.')
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  node, name = found
  node[name] = value


def set_rows(config, teacher_dir: str, workdir: str, temperature: float) -> dict:
  """{set name: `sharpness` and 'images' (the count)} of the teacher on each image set of
  `workdir`."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.squeeze.teacher_dir = teacher_dir
  config.evaluate.baselines = ('random', 'coreset')
  logits = teacher_forward(config, teacher_dir)
  return {name: dict(sharpness(logits(images), labels, temperature), images=len(labels))
          for name, (images, labels) in image_sets.image_sets(config, workdir).items()}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher_dirs', required=True, help='comma-separated teacher folders')
  parser.add_argument('--config', default='configs/fashion_mnist_ipc10.py',
                      help="a config file, optionally with its argument: 'file.py:smoke'")
  parser.add_argument('--data_dir', default='', help="the config's dataset.data_dir if set")
  parser.add_argument('--temperature', type=float, default=0.0,
                      help="0: the config's evaluate.temperature")
  parser.add_argument('--limit', type=int, default=0, help='first N test images (0: all)')
  parser.add_argument('--workdir', default='',
                      help="the image sets of this run (its distilled set, the random subset "
                           "and the coreset) instead of the test split; one teacher")
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help="a config value as the run's --config.KEY flag set it, e.g. "
                           "--set=recover.r_ce=0 (repeatable)")
  args = parser.parse_args(argv)
  path, _, arg = args.config.partition(':')
  config = config_lib.load_config_file(path, arg or None)
  for item in args.set:
    set_value(config, item)
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  temperature = args.temperature or float(config.evaluate.temperature)
  teacher_dirs = list(filter(None, args.teacher_dirs.split(',')))
  if args.workdir:
    if len(teacher_dirs) != 1:
      raise ValueError(f'--workdir measures one teacher; got --teacher_dirs={args.teacher_dirs!r}.')
    out = {'temperature': temperature, 'teacher': teacher_dirs[0],
           'sets': set_rows(config, teacher_dirs[0], args.workdir, temperature)}
    for name, row in out['sets'].items():
      print(f'{name}: teacher top-1 {100 * row["top1"]:.2f}%, at T = {temperature:g}: entropy '
            f'{row["entropy"]:.3f} nats, top probability {row["top_prob"]:.3f}')
    print(json.dumps(out))
    return out
  images, labels = datasets.load_arrays(config.dataset, 'test', args.limit or None)
  out = {'temperature': temperature, 'images': len(labels), 'teachers': {}}
  for teacher_dir in teacher_dirs:
    logits = teacher_forward(config, teacher_dir)(images)
    out['teachers'][teacher_dir] = row = sharpness(logits, labels, temperature)
    print(f'{teacher_dir}: top-1 {100 * row["top1"]:.2f}%, at T = {temperature:g}: entropy '
          f'{row["entropy"]:.3f} nats (uniform {np.log(logits.shape[-1]):.3f}), top '
          f'probability {row["top_prob"]:.3f}')
  print(json.dumps(out))
  return out


if __name__ == '__main__':
  main()
