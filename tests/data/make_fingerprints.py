"""Every settings record a workdir keeps, for the shipped configs, as commit c0f06d5 computed
them: the frozen reference that `tests/test_fingerprints.py` holds `sre2l_jax.fingerprints`
to (issue 29: one rule in place of six functions, the bytes written unchanged, so a workdir
finished before is still finished after).

Run at c0f06d5 (its package first on the path), from the repository root:
  git archive c0f06d5 | tar -x -C /tmp/c0f06d5
  PYTHONPATH=/tmp/c0f06d5 python tests/data/make_fingerprints.py
It writes tests/data/fingerprints_c0f06d5.json: {case: {record: value}}, a record's value as
it is written to the workdir (JSON) or the folder name made from it. `CASES` and the fixed
inputs below are what the test reuses; `records` calls c0f06d5's functions.
"""

import json
import os

import numpy as np

# Fixed stand-ins for what a run reads: a teacher's digest, an image set, teacher weights.
TEACHER_DIGEST = 'ab' * 32
IMAGES = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
VARIABLES = {'params': {'w': np.arange(6, dtype=np.float32)}}
WORKDIR = 'W'

# (config name, its argument, {'section.key': value} overrides).
# Fashion-MNIST's cases that meant the default method name it (edc at c0f06d5, since changed):
# its IPC 10 default is 'method=edc', the continual config's 'method=edc' (the same records).
CASES = [(name, arg, {}) for name in (
    'cifar100_ipc50', 'in1k_edc', 'in1k_ipc50', 'in1k_rded', 'tiny_continual',
    'tiny_ipc50') for arg in (None, 'smoke')]
CASES += [('fashion_mnist_continual', arg, {}) for arg in ('method=edc', 'smoke')]
CASES += [('fashion_mnist_ipc10', arg, {}) for arg in (
    'smoke', 'method=sre2l', 'method=edc', 'ipc=1,method=edc', 'ipc=50,seeds=3,method=edc', 'smoke,method=edc',
    'smoke,ipc=1')]
CASES += [('in1k_edc', 'ipc=50', {}), ('tiny_ipc50', 'ipc=10', {})]
CASES += [('fashion_mnist_ipc10', 'smoke', overrides) for overrides in (
    {'relabel.mode': 'stored', 'relabel.storage': 'topk'},
    {'relabel.mode': 'stored', 'relabel.storage': 'float16'},
    {'teacher.extra_teachers': ('convnet:width=32',)},
    {'evaluate.lr_zeta': 2.0, 'evaluate.ema_decay': 0.99, 'evaluate.loss': 'mse_ce'},
    {'evaluate.baselines': ('random', 'coreset', 'hard_label', 'full_data'),
     'evaluate.full_data_dir': '/full'},
    {'evaluate.students': ('convnet', 'resnet18_small:width=16')},
    {'squeeze.teacher_dir': '/teacher'},
    {'recover.init_pick': 'centre'},
    {'recover.init_pick': 'score', 'recover.device_memory_gb': 80.0},
    {'dataset.train_limit': 500, 'dataset.test_limit': 100},
)]


def case_name(name: str, arg, overrides: dict) -> str:
  return f'{name}:{arg or ""}' + (f' {json.dumps(overrides, sort_keys=True)}' if overrides else '')


def load(name: str, arg, overrides: dict):
  """The config of one case, from the configs/ beside the package imported."""
  from sre2l_jax import config_lib  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(config_lib.__file__)))
  config = config_lib.load_config_file(os.path.join(root, 'configs', f'{name}.py'), arg)
  moved = getattr(config_lib, 'MOVED', {})  # keys renamed after c0f06d5, at their new place
  for key, value in overrides.items():
    *sections, field = moved.get(key, key).split('.')
    node = config
    for section in sections:
      node = node[section]
    assert field in node, key
    node[field] = value
  return config


def normalised(value):
  return json.loads(json.dumps(value, default=float))


def records(config) -> dict:
  """Every record of one config, by c0f06d5's functions."""
  # pylint: disable=g-import-not-at-top
  from sre2l_jax import class_stats, continual, evaluate, image_sets, label_store, squeeze
  from sre2l_jax import teacher
  from sre2l_jax.data import datasets
  spec = datasets.get_spec(config.dataset.name)
  out = {'squeeze': squeeze.fingerprint(config),
         'recover': image_sets.recover_fingerprint(config, TEACHER_DIGEST),
         'recover_without_teacher': image_sets.recover_fingerprint(config),
         'teacher_meta': teacher.teacher_meta(config, spec)}
  stats = class_stats.fingerprint(VARIABLES, config.dataset, spec.num_classes)
  out['class_stats'] = stats
  out['class_stats_file'] = class_stats.file_name(stats)
  out['label_settings'] = label_store.label_settings(config)
  for name in ('distilled', 'random', 'coreset'):
    out[f'label_dir/{name}'] = label_store.label_dir(config, WORKDIR, name)
  for name, _, hard in evaluate.variants(config):
    for arch, student_cfg in evaluate.student_configs(config):
      settings = evaluate.student_settings(config, hard, IMAGES, student_cfg)
      out[f'evaluate/{name}/{arch}'] = settings
      out[f'evaluate_dir/{name}/{arch}'] = evaluate.variant_dir(
          WORKDIR, name, settings, config.evaluate.full_data_dir)
  order = continual.class_order(config, spec.num_classes)
  for name in continual.SETS:
    out[f'continual/{name}'] = continual.fingerprint(config, name, order, IMAGES)
  return normalised(out)


def main():
  out = {case_name(*case): records(load(*case)) for case in CASES}
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fingerprints_c0f06d5.json')
  with open(path, 'w') as f:
    json.dump(out, f, indent=1, sort_keys=True)
    f.write('\n')
  print(f'{len(out)} cases written to {path}')


if __name__ == '__main__':
  main()
