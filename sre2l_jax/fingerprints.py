"""What each stage's result depends on, in one table, and the one rule that reads it.

A record (a stage's `fingerprint.json`, the settings a folder of stored labels or students is
named after by `digest`) is built by `record(kind, config, **inputs)` from `TABLE[kind]`.

Policy: an allow-list. A record holds the config paths its table entry names and nothing
else, so a key added to the config is in no record until it is listed here. A table entry
maps a record key to
  'section.key'            that value;
  'section'                the whole section (the models, teacher and student: every key of
                           a model config shapes the model);
  ('section', (keys...))   a dict of those keys of the section;
  a function of config     a value derived from the config (e.g. the dataset's identity);
  {key: entry}             a nested record.
What is not the config (a teacher's digest, the images' digest, a set's name) comes in as
`inputs`. A key listed after workdirs existed is in `ADDED_WITH_DEFAULT` with the value
that does what the code did before: at that value it is left out, so the records of those
workdirs (and whether they are finished) stay the same bytes.
"""

import hashlib
import json

from sre2l_jax import config_lib
from sre2l_jax import views
from sre2l_jax.data import datasets

# The teacher's keys that fix its own weights (extra teachers are squeezed in folders of
# their own, `teacher.extra_configs`).
TEACHER_KEYS = ('depth', 'dtype', 'name', 'pooling', 'stem', 'width')
# The student's optimiser (its schedule: config.student's epochs and batch size).
OPTIMIZER_KEYS = ('optimizer', 'lr', 'momentum', 'nesterov', 'weight_decay', 'decay_all')


def _dataset(config):
  return datasets.identity(config.dataset)


def _label_topk(config):
  return config.relabel.topk if config.relabel.storage == 'topk' else None


def _label_temperature(config):
  # Top-k probabilities, and several teachers' Ensemble logits, are taken at T.
  relabel = config.relabel
  if relabel.storage == 'topk' or config.teacher.extra_teachers:
    return config.evaluate.temperature
  return None


def _student_model(config):
  return config_lib.student_model(config).to_dict()


def _train_limit(config):
  # An int, 0 for none: what class statistics have recorded since they were first stored.
  return int(config.dataset.train_limit or 0)


_STUDENT = {  # a student trained on hard labels; `student` comes in (one of several models)
    'dataset': _dataset, 'test_limit': 'dataset.test_limit', 'seed': 'seed',
    'optimizer': ('evaluate', OPTIMIZER_KEYS),
    'schedule': {'batch_size': 'student.batch_size', 'epochs': 'student.epochs',
                 'lr_zeta': 'evaluate.lr_zeta'},
    'view': ('relabel', views.VIEW_KEYS), 'ema_decay': 'evaluate.ema_decay'}

TABLE = {
    'squeeze': {
        'dataset': _dataset, 'train_limit': 'dataset.train_limit', 'seed': 'seed',
        'teacher': ('teacher', TEACHER_KEYS),
        'squeeze': ('squeeze', (
            'augment', 'batch_size', 'decay_all', 'epochs', 'label_smoothing', 'lr',
            'momentum', 'nesterov', 'optimizer', 'pad', 'teacher_dir', 'warmup_epochs',
            'weight_decay'))},
    # inputs: teacher_sha256 (`teacher.digest`), when known.
    'recover': {
        'dataset': _dataset, 'teacher': 'teacher', 'teacher_dir': 'squeeze.teacher_dir',
        'seed': 'seed',
        'recover': {
            **{k: f'recover.{k}' for k in (
                'adam_b1', 'adam_b2', 'batch_size', 'crop', 'curriculum', 'diversity', 'dtype',
                'first_bn_multiplier', 'flip', 'group_by', 'init', 'ipc', 'iterations', 'jitter',
                'lr', 'max_scale', 'method', 'min_scale', 'num_classes', 'r_bn', 'r_ce',
                'refine_fraction', 'teachers')},
            # the keys grouped by method since, recorded under their names of before
            **{old.split('.')[1]: new for old, new in config_lib.MOVED.items()
               if old.startswith('recover.')},
            'edc_class_term': 'recover.edc.class_term',
            'edc_class_var': 'recover.edc.class_var',
            'init_kmeans_iterations': 'recover.scored.iterations'}},
    # inputs: teacher_weights_sha256, num_classes.
    'class_stats': {'dataset': _dataset, 'train_limit': _train_limit},
    # Stored labels, besides the images (named by `digest`, checked by their manifest).
    'labels': {
        'storage': 'relabel.storage', 'topk': _label_topk, 'temperature': _label_temperature,
        'batch_size': 'student.batch_size', 'epochs': 'student.epochs', 'seed': 'seed',
        'view': ('relabel', views.VIEW_KEYS), 'teacher': 'teacher',
        'teacher_dir': 'squeeze.teacher_dir'},
    # inputs: student (its model config), images_sha256, labels ('hard', 'online', ...).
    'student_hard': _STUDENT,
    'student': {**_STUDENT, 'loss': 'evaluate.loss', 'ce_weight': 'evaluate.ce_weight',
                'temperature': 'evaluate.temperature', 'teacher': 'teacher',
                'teacher_dir': 'squeeze.teacher_dir'},
    # inputs: set, class_order, images_sha256.
    'continual': {
        'dataset': _dataset, 'test_limit': 'dataset.test_limit', 'student': _student_model,
        'teacher': 'teacher', 'seed': 'seed',
        'continual': ('continual', ('class_order', 'class_order_seed', 'epochs_per_step',
                                    'steps')),
        'evaluate': ('evaluate', ('decay_all', 'full_data_dir', 'images_dir', 'lr', 'lr_zeta',
                                  'momentum', 'nesterov', 'optimizer', 'stack_mode',
                                  'temperature', 'weight_decay')),
        # (the student's batch size was relabel.batch_size: recorded here under that name)
        'relabel': {'batch_size': 'student.batch_size',
                    **{k: f'relabel.{k}' for k in ('cutmix_alpha', 'max_scale', 'min_scale',
                                                   'mix', 'mix_prob', 'mixup_alpha')}}},
}

# Keys listed after workdirs existed ('record.path': the value that does what the code did
# before): left out of the record at that value.
ADDED_WITH_DEFAULT = {
    'recover': {'recover.init_pick': 'score', 'recover.refine_fraction': 1.0,
                'recover.r_ce': 1.0, 'recover.edc_class_term': 'group',
                'recover.edc_class_var': 'pooled', 'recover.init_kmeans_iterations': 20,
                'recover.teachers': 'all'},
    'student_hard': {'schedule.lr_zeta': 1.0, 'ema_decay': 0.0},
    'student': {'schedule.lr_zeta': 1.0, 'ema_decay': 0.0, 'loss': 'kl'},
    'continual': {'evaluate.lr_zeta': 1.0},
}
# Keys recorded only beside another ('key': the other): left out with it.
RECORDED_WITH = {'student': {'ce_weight': 'loss'}}


def _value(entry, config):
  if callable(entry):
    return entry(config)
  if isinstance(entry, dict):
    return {k: _value(e, config) for k, e in entry.items()}
  if isinstance(entry, tuple):
    section, keys = entry
    return {k: config[section][k] for k in keys}
  node = config
  for part in entry.split('.'):
    node = node[part]
  return node.to_dict() if hasattr(node, 'to_dict') else node


def record(kind: str, config, **inputs) -> dict:
  """The record of `kind` (a key of `TABLE`) for `config`, with `inputs` added."""
  out = {k: _value(e, config) for k, e in TABLE[kind].items()}
  for path, default in ADDED_WITH_DEFAULT.get(kind, {}).items():
    *parents, key = path.split('.')
    node = out
    for part in parents:
      node = node[part]
    if node[key] == default:
      del node[key]
  for key, other in RECORDED_WITH.get(kind, {}).items():
    if other not in out:
      del out[key]
  return dict(out, **inputs)


def digest(settings: dict, length: int = 8) -> str:
  """A short stable hash of a JSON-able dict (names folders after their settings)."""
  text = json.dumps(settings, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:length]
