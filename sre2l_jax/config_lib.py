"""Shared defaults of every experiment config, the stage registry, and config-file loading.

A file in `configs/` builds on `base_config()` and overrides a few keys; an argument string
after the file name (`configs/fashion_mnist_ipc10.py:smoke,ipc=1`) selects variants:
  smoke      shrink everything to a few steps on a data subset (tests, laptops; `smoke()`);
  ipc=N      images per class;
  seeds=N    number of student seeds in evaluate.
Every key exists in `base_config()` with its default and a comment; lists are tuples.
"""

import copy
import difflib
import importlib.util
import os

import ml_collections
import numpy as np

# The stages in the order they run; each is a module `sre2l_jax.<name>` with
# `run(config, workdir) -> result` writing only under `workdir/<name>/`.
STAGES = ('squeeze', 'recover', 'relabel', 'evaluate', 'continual')
DEFAULT_STAGES = ('squeeze', 'recover', 'relabel', 'evaluate')


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'smoke,ipc=10' -> ConfigDict(smoke=True, ipc=10); values are cast like the defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, _, value = item.partition('=')
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r}; valid: {sorted(defaults)}.')
    default = defaults[key]
    if not value:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    else:
      try:
        out[key] = type(default)(value)
      except ValueError:
        raise ValueError(f'Config argument {key}={value!r} is not a valid '
                         f'{type(default).__name__}.') from None
  return out


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Where configs are found by name: installed with the package (setup.py ships configs/ as
# sre2l_jax/configs), else the checkout's configs/ beside the package.
CONFIG_DIRS = (os.path.join(_PACKAGE_DIR, 'configs'),
               os.path.join(os.path.dirname(_PACKAGE_DIR), 'configs'))


def shipped_configs() -> list[str]:
  """The names of the configs that come with the package (`config_path` finds them)."""
  return sorted({os.path.splitext(f)[0] for d in CONFIG_DIRS if os.path.isdir(d)
                 for f in os.listdir(d) if f.endswith('.py') and not f.startswith('_')})


def config_path(config: str) -> str:
  """The file of `--config`'s value (without ':arg'): a path ('configs/x.py', anything with a
  '/' or ending in '.py') as it is; a bare name ('fashion_mnist_ipc10') is a shipped config.

  Raises ValueError for a name no shipped config has.
  """
  if os.sep in config or '/' in config or config.endswith('.py'):
    return config
  for directory in CONFIG_DIRS:
    path = os.path.join(directory, f'{config}.py')
    if os.path.isfile(path):
      return path
  raise ValueError(f'no config named {config!r}; shipped configs: '
                   f'{", ".join(shipped_configs())}; or give the path of a config file.')


def load_config_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, or of the shipped config named `path`
  (`config_path`; configs/ is not a package)."""
  path = config_path(path)
  name = os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(f'sre2l_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def smoke(c: ml_collections.ConfigDict, *, width: int = 8, every: int = 4,
          **sections: dict) -> ml_collections.ConfigDict:
  """Shrinks `c` for tests and laptops: teacher and student of `width`, logs and checkpoints
  every `every` steps (students: every epoch), then the per-section overrides, e.g.
  `smoke(c, recover=dict(ipc=1, iterations=4))`."""
  c.teacher.width = c.student.width = width
  c.squeeze.update(checkpoint_every_steps=every, log_every_steps=every)
  c.recover.update(checkpoint_every_steps=every, log_every_steps=every)
  c.recover.update(min_bn_reduction=0.0, min_teacher_top1=0.0)  # a few steps prove nothing
  c.evaluate.update(log_every_steps=every, checkpoint_every_epochs=1)
  for section, values in sections.items():
    c[section].update(values)
  return c


def _model(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name='convnet',  # convnet | resnet18 | resnet50 | resnet101
      width=128,  # channels (ConvNet) / first-stage width (ResNet, torchvision: 64)
      depth=3,  # ConvNet blocks
      pooling='avg',  # ConvNet pooling: avg | max
      stem='imagenet',  # ResNet stem: imagenet (7x7/2 + max pool) | small (3x3/1)
      dtype='float32',  # compute dtype: float32 | bfloat16
  ) | kw)


def _dataset() -> ml_collections.ConfigDict:
  """The dataset and its limits; a user dataset's files and normalisation."""
  return ml_collections.ConfigDict(dict(
      name='fashion_mnist',  # see data/datasets.py; your own: image_folder | arrays | tfds:NAME
      data_dir='',  # TFDS data dir for the prepared ArrayRecord files ('' ~/tensorflow_datasets)
      source_dir='',  # where the raw files are (dataset-specific default)
      manual_dir='',  # TFDS manual dir (ImageNet, Tiny-ImageNet, CIFAR archives)
      train_limit=0,  # >0: use only the first N training images (smoke runs)
      test_limit=0,  # >0: use only the first N test images
      # Your own data (data/user_data.py). image_folder: one sub-folder per class in each.
      train_dir='',
      test_dir='',
      image_size=0,  # image_folder: images resized (shorter side) and centre-cropped square
      channels=3,  # image_folder: 1 (grey) or 3 (RGB); other modes are converted
      arrays_file='',  # arrays: .npz with x_train, y_train, x_test, y_test [, class_names]
      # Normalisation of a user dataset, one value per channel; () the training images'.
      mean=(),
      std=(),
  ))


def _squeeze() -> ml_collections.ConfigDict:
  """Squeeze: teacher training."""
  return ml_collections.ConfigDict(dict(
      epochs=5,  # may be fractional
      batch_size=128,  # global batch, a multiple of the device count
      optimizer='sgd',  # sgd | adamw
      lr=0.1,  # peak learning rate (linear warm-up, then cosine to 0)
      momentum=0.9,  # sgd
      nesterov=True,  # sgd
      weight_decay=5e-4,  # coupled for sgd, decoupled for adamw
      decay_all=False,  # sgd: decay every parameter (the reference), not kernels only
      warmup_epochs=0.5,
      label_smoothing=0.0,
      eval_batch_size=1000,  # test-set batch, a multiple of the device count
      augment='',  # '' the dataset's; or 'pad_crop_flip' (with pad), 'flip', ...
      pad=0,  # pad of 'pad_crop_flip' (0: the dataset's)
      checkpoint_every_steps=200,
      log_every_steps=100,
      teacher_dir='',  # '' -> workdir/squeeze/teacher; or a teacher imported from PyTorch
  ))


def _recover() -> ml_collections.ConfigDict:
  """Recover: image synthesis from the frozen teacher. Names follow the paper/reference."""
  return ml_collections.ConfigDict(dict(
      method='sre2l',  # synthesis method (see synthesis/)
      ipc=10,  # images per class
      batch_size=100,  # group size: images of different classes, same ipc index
      iterations=1000,  # Adam steps per image
      lr=0.25,  # Adam learning rate (cosine decay to 0)
      r_bn=0.01,  # weight of the BN-statistics term
      # weight of the cross-entropy to the target class (1: SRe2L's and EDC's objective; 0:
      # BN statistics only: at Fashion-MNIST IPC 50 softer labels and weaker students)
      r_ce=1.0,
      # With teacher.extra_teachers: 'all' recovers against every teacher (their losses
      # summed; the methods that take several); 'main' against config.teacher alone, any
      # method, while relabel and evaluate still average all the teachers' soft labels.
      # Without extra teachers the two are the same (recorded as 'all').
      teachers='all',
      first_bn_multiplier=10.0,  # extra weight of the first BN layer's term
      adam_b1=0.5,
      adam_b2=0.9,
      jitter=4,  # random roll of up to this many pixels
      min_scale=0.08,  # random-resized-crop scale range
      max_scale=1.0,
      crop='per_image',  # 'per_image' | 'per_group' (the reference: one crop per batch) | 'none'
      flip=True,  # random horizontal flip
      curriculum=False,  # CDA: min crop scale from max_scale down to min_scale (cosine)
      # 'noise' | 'real' (random images of the class) | 'scored' (selection.py) | 'coreset'
      # (the k-means coreset baseline's own images, `image_sets.coreset`: a refined set and
      # that baseline then differ by the refinement alone, not by a k-means draw)
      init='noise',
      # init 'scored' (synthesis/selection.py): per class, `candidates` random images (0: all
      # of the class), each scored on its best of `crops` crops (1: the whole image); then the
      # best of each of ipc k-means clusters (`coverage`; False: the top ipc, pick 'score'
      # only), best being the best-scored (`pick` 'score'), the one nearest the cluster's mean
      # ('centre') or the lowest-scored ('hardest'); or 'herding' (no clusters: herding toward
      # the class's mean feature, no random draw). `iterations`: k-means's Lloyd iterations at
      # most (the coreset baseline runs 100).
      scored=ml_collections.ConfigDict(dict(candidates=300, crops=1, coverage=True,
                                            pick='score', iterations=20)),
      # Group layout: 'ipc_index' (B classes at one ipc index, B dividing the classes; or
      # every class at B / classes ipc indices, B a multiple of the classes) or 'class' (B
      # images of one class; B divides ipc): what per-group statistics mean.
      group_by='ipc_index',
      # method 'edc' (synthesis/edc.py): `class_bn_weight`, the weight of the class's own
      # BN-input statistics (class_stats.py) in each layer's term, the global running
      # statistics getting 1 - weight (EDC's soft matching: 0.5); `class_term`, in a group
      # of several classes: 'group' (the group against its classes' mean statistics, EDC's
      # code) or 'per_class' (each class's images against their class's); `class_var`: the
      # class's variance over all its images ('pooled') or that of as many of its real
      # images as the group holds ('expected').
      edc=ml_collections.ConfigDict(dict(class_bn_weight=0.5, class_term='group',
                                         class_var='pooled')),
      # Diversity: 'none' | 'early_late' (DELT: a class's images start optimising at
      # early_late.stages staggered steps, so they get different numbers of iterations).
      diversity='none',
      early_late=ml_collections.ConfigDict(dict(stages=4)),
      # The share of each class's images optimised (synthesis/diversity.py): the last
      # ceil(f * ipc) ipc indices (with init 'scored' the lowest-scored; 'coreset': the last
      # centroids); the others stay as they start. 1: all.
      refine_fraction=1.0,
      # method 'rded' (synthesis/rded.py, no optimisation): per class, `candidates` random
      # real images (RDED's mipc), each scored on its best of `crops` square crops
      # (min/max_scale), and `factor` x `factor` of the best stitched into one image (1: whole
      # crops).
      rded=ml_collections.ConfigDict(dict(candidates=300, crops=5, factor=2)),
      num_classes=0,  # recover classes 0..N-1 only (0: all; smoke runs on 1000 classes)
      dtype='float32',  # teacher compute dtype ('bfloat16': loss stays float32)
      remat='none',  # 'none' | 'teacher' | 'blocks' (ResNets): recompute in the backward
      parallel_groups=1,  # groups a device computes at once (1: one by one, least memory; 0: all)
      # Rounds: groups are optimised a round at a time (all iterations each), so that a round
      # fits the devices; the images do not depend on the round size.
      groups_per_round=0,  # a multiple of the devices; 0: the most that fit (one round on CPU)
      device_memory_gb=0.0,  # GiB per device to plan for; 0: the device's own limit
      memory_margin=0.9,  # a round may plan this fraction of the memory (XLA's estimate)
      checkpoint_every_steps=200,
      log_every_steps=100,
      # A finished run is refused (nothing exported) unless the BN term fell at least this
      # many times (0: off)...
      min_bn_reduction=1.0,
      # ...and the teacher recognises at least this fraction of the images (0: off).
      min_teacher_top1=0.5,
  ))


def _relabel() -> ml_collections.ConfigDict:
  """Relabel: FKD-style soft labels for every crop of every epoch."""
  return ml_collections.ConfigDict(dict(
      mode='online',  # 'online' (teacher runs in the student step) | 'stored'
      storage='float16',  # stored mode: 'float32' | 'float16' | 'topk'
      topk=1,  # classes kept per view with storage 'topk'
      min_scale=0.08,  # random-resized-crop scale range of the views
      max_scale=1.0,
      mix='cutmix',  # 'cutmix' | 'mixup' | 'none'
      cutmix_alpha=1.0,
      mixup_alpha=0.8,
      mix_prob=1.0,  # probability that a batch is mixed
      epochs_per_shard=50,  # stored mode: epochs per label file
  ))


# The student's schedule: what `config.student` holds besides its model. Evaluate and
# continual train by it; relabel labels the views of every one of its epochs and batches.
STUDENT_SCHEDULE_KEYS = ('epochs', 'batch_size')


def _student() -> ml_collections.ConfigDict:
  """The student (evaluate's and continual's): its model and its schedule."""
  c = _model()
  c.epochs = 300  # student epochs (relabel labels the views of every epoch)
  c.batch_size = 50  # student batch, a multiple of the device count
  return c


def student_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The student's model config: `config.student` without its schedule."""
  return ml_collections.ConfigDict({k: v for k, v in config.student.to_dict().items()
                                    if k not in STUDENT_SCHEDULE_KEYS})


# Keys that moved ('old.path': 'new.path'). Set under the old name (a config file, a
# --config flag) they are refused with the new one (`check_moved`); a workdir's config.json
# written before the move is read with them moved (`upgrade`).
MOVED = {'relabel.epochs': 'student.epochs', 'relabel.batch_size': 'student.batch_size',
         # recover's keys grouped by the method or option that reads them
         'recover.init_candidates': 'recover.scored.candidates',
         'recover.init_crops': 'recover.scored.crops',
         'recover.init_coverage': 'recover.scored.coverage',
         'recover.init_pick': 'recover.scored.pick',
         'recover.class_bn_weight': 'recover.edc.class_bn_weight',
         'recover.early_late_stages': 'recover.early_late.stages',
         'recover.rded_candidates': 'recover.rded.candidates',
         'recover.rded_crops': 'recover.rded.crops',
         'recover.rded_factor': 'recover.rded.factor'}


def find(tree, path: str):
  """(parent, key) of the dotted `path` in a nested dict/ConfigDict, or None if absent."""
  *parents, key = path.split('.')
  node = tree
  for part in parents:
    if not hasattr(node, 'keys') or part not in node:
      return None
    node = node[part]
  return (node, key) if hasattr(node, 'keys') and key in node else None


def check_moved(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the new key of every moved key `config` sets (`MOVED`)."""
  found = [(old, new) for old, new in MOVED.items() if find(config, old) is not None]
  if found:
    raise ValueError('; '.join(f'{old} is now {new}' for old, new in found) +
                     ': set the new keys instead (the config file or the --config flags).')


def _paths(tree, prefix: str = '') -> set[str]:
  """The dotted paths of every leaf of a nested dict/ConfigDict."""
  out = set()
  for key, value in tree.items():
    if hasattr(value, 'items'):
      out |= _paths(value, f'{prefix}{key}.')
    else:
      out.add(f'{prefix}{key}')
  return out


def check_complete(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the keys of `base_config()` that `config` lacks: a group
  replaced by a dict of some of its keys (`c.recover.rded = dict(factor=1)`) drops the
  others, which the code then fails to read deep inside a stage."""
  missing = sorted(_paths(base_config()) - _paths(config))
  if missing:
    groups = sorted({m.rsplit('.', 1)[0] for m in missing})
    raise ValueError(f'the config lacks {", ".join(missing)}: set single keys '
                     f'(c.{groups[0]}.update(key=value) or --config.{missing[0]}=...) '
                     f'rather than replacing {", ".join(groups)} with a dict.')


def check_known(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the keys `config` sets that `base_config()` lacks, with the
  nearest known key: a ConfigDict is unlocked, so a config file's typo
  (`c.recover.iteration = 500`) adds a key no code reads and the run goes on at the default.
  Moved keys are `check_moved`'s (it names their new place); call it first."""
  known = _paths(base_config())
  unknown = sorted(_paths(config) - known)
  if not unknown:
    return
  def hint(path):  # the nearest key of the same group
    group, _, key = path.rpartition('.')
    siblings = [k.rpartition('.')[2] for k in known if k.rpartition('.')[0] == group]
    near = difflib.get_close_matches(key, siblings, n=1, cutoff=0.75)
    return f'{path} (did you mean {near[0]}?)' if near else path
  raise ValueError(f'the config sets {", ".join(hint(p) for p in unknown)}, which no stage '
                   f'reads: fix the name in the config file (see config_lib.base_config() '
                   f'for every key).')


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Every key check of `config` before any work: moved, missing, unknown keys."""
  check_moved(config)
  check_complete(config)
  check_known(config)


def upgrade(tree: dict) -> dict:
  """A config dict written before keys moved (an old workdir's config.json) with every key
  of `MOVED` at its new place; a new dict, `tree` left as it is."""
  out = copy.deepcopy(tree)
  for old, new in MOVED.items():
    found = find(out, old)
    if found is None:
      continue
    parent, key = found
    value = parent.pop(key)
    *sections, new_key = new.split('.')
    node = out
    for part in sections:
      node = node.setdefault(part, {})
    node.setdefault(new_key, value)
  return out


def _evaluate() -> ml_collections.ConfigDict:
  """Evaluate: fresh students on the distilled set (and the same-protocol baselines)."""
  return ml_collections.ConfigDict(dict(
      optimizer='adamw',  # sgd | adamw
      lr=1e-3,  # peak learning rate (cosine to 0)
      # The cosine runs over lr_zeta times the schedule: lr (1 + cos(pi t / (zeta T))) / 2;
      # 1: to 0 at the last step (SRe2L), 2: EDC's smoothed schedule, ending at half the peak.
      lr_zeta=1.0,
      # > 0: test (and save) the students' parameters averaged over the steps with this
      # decay (EDC: 0.99; train_lib.param_ema); 0: the last step's parameters.
      ema_decay=0.0,
      momentum=0.9,  # sgd
      nesterov=False,  # sgd
      weight_decay=0.01,
      decay_all=False,  # sgd: decay every parameter, not kernels only
      temperature=20.0,  # soft-label temperature T
      # The students' loss on soft labels: 'kl' (KL divergence at temperature T, SRe2L) or
      # 'mse_ce' (EDC: mean squared error to the teacher's logits + ce_weight x cross-entropy
      # to the views' one-hot labels, mixed as the views are; T unused).
      loss='kl',
      ce_weight=0.025,  # 'mse_ce' only (EDC's)
      seeds=3,  # students per variant
      eval_batch_size=1000,  # test-set batch, a multiple of the device count
      # any of: 'random' (real subset), 'coreset' (k-means in the teacher's features, one
      # real image per cluster; image_sets.coreset), 'hard_label', 'full_data' (a student
      # on the whole training split with hard labels: DD-Ranking's HLR / LRS in the report)
      baselines=('random',),
      # Where the full-data students live ('' workdir/evaluate): a folder shared by runs
      # trains them once per dataset, student and protocol.
      full_data_dir='',
      # A distilled set made elsewhere, evaluated instead of the workdir's (with the same
      # labels, baselines and report): an image folder, one sub-folder of recover.ipc
      # images per class, sub-folders in class order (the reference repos' layout
      # new000/class000_id000.jpg included); image_sets.external_set.
      images_dir='',
      checkpoint_every_epochs=50,
      log_every_steps=100,
      # Test top-1 of every student written to its metrics this often (and at the end);
      # 0: at the end only. Each is a pass over the test split for all students at once.
      eval_every_epochs=50,
      # Student architectures (models/): each trains its own students and gets a row of
      # the report's cross-architecture table; () or '': config.student only. A listed
      # name replaces config.student.name, the other student keys applying to it; a spec
      # 'name:key=value,...' sets its own keys too (e.g. 'resnet18_small:width=16').
      students=(),
      # Students trained together in one compiled step (all seeds, and the distilled and
      # baseline sets of the same size; the teacher's labels shared): at most this many at
      # once; 0: no cap, 1: one by one. Results equal up to float rounding either way.
      stack_students=0,
      # How a stack's students run inside the step: 'unrolled' (written out one after
      # another), 'vmap' (batched: each convolution one grouped convolution of all of
      # them), 'auto' (vmap on GPU/TPU, unrolled on CPU, where grouped ones are slow).
      stack_mode='auto',
  ))


def _continual() -> ml_collections.ConfigDict:
  """Continual: class-incremental evaluation (`--stages=continual`); the student uses
  config.student, the evaluate optimiser and temperature, and the relabel views."""
  return ml_collections.ConfigDict(dict(
      steps=5,  # class groups learned one after another; must divide the number of classes
      class_order_seed=0,  # the class order is a permutation drawn from this seed...
      class_order=(),  # ...unless given here: every class id once
      epochs_per_step=100,  # student epochs over the images of the seen classes, per step
      sets=('distilled', 'random'),  # compared image sets: distilled, random (real subset)
  ))


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default; experiment files override a few."""
  c = ml_collections.ConfigDict()
  c.seed = 0  # seeds every random stream (see rngs.py)
  c.stages = DEFAULT_STAGES  # stages `main` runs when --stages is not given
  c.mesh_shape = -1  # devices on the 'data' axis; -1: all
  # On a CPU host: the devices JAX makes of its cores (multihost.set_cpu_devices; 0: JAX's
  # default, one). Set by main before JAX starts; XLA_FLAGS' device count wins over it.
  c.cpu_devices = 0
  # squeeze and evaluate check before training that one step fits this many GiB per device
  # (XLA's analysis of the compiled step); 0: the device's own limit (a CPU states none).
  c.device_memory_gb = 0.0
  c.overwrite = False  # replace a teacher or stored labels that exist (main's --overwrite)

  c.dataset = _dataset()
  c.teacher = _model()
  # Several teachers (G-VBSM, EDC): more teachers beside config.teacher, as model specs
  # 'name:key=value,...' over config.teacher's keys (e.g. 'convnet:width=64,depth=2').
  # squeeze trains each in workdir/squeeze/teachers/<spec>/ (read from beside
  # squeeze.teacher_dir when that is given); recover sums the teachers'
  # losses; relabel/evaluate average their soft labels at evaluate.temperature (teacher.py).
  c.teacher.extra_teachers = ()
  c.squeeze = _squeeze()
  c.recover = _recover()
  c.relabel = _relabel()
  c.student = _student()  # evaluate's and continual's students: model and schedule
  c.evaluate = _evaluate()
  c.continual = _continual()
  return c


# ----------------------------------------------------------------------------- number checks

# What the numbers of each config section must satisfy, checked before any work: a negative
# lr trains "fine" to chance accuracy, and NaN passes every `x <= 0` test. Batch sizes are
# checked against the device count elsewhere (`batching.check_batch_size`).
#   '>0' positive, '>=0' non-negative, 'int' positive integer, 'int>=0', or a range '[0,1)'.
NUMBER_RULES = {
    'squeeze': dict(epochs='>0', lr='>0', momentum='[0,1)', weight_decay='>=0',
                    warmup_epochs='>=0', label_smoothing='[0,1)', pad='int>=0',
                    checkpoint_every_steps='int', log_every_steps='int'),
    'recover': dict(ipc='int', iterations='int', lr='>0', r_bn='>=0', r_ce='>=0',
                    first_bn_multiplier='>=0', adam_b1='[0,1)', adam_b2='[0,1)',
                    jitter='int>=0', min_scale='(0,1]', max_scale='(0,1]',
                    num_classes='int>=0', checkpoint_every_steps='int', log_every_steps='int',
                    min_bn_reduction='>=0', min_teacher_top1='[0,1]'),
    'student': dict(epochs='int', batch_size='int'),
    'relabel': dict(topk='int', min_scale='(0,1]', max_scale='(0,1]',
                    cutmix_alpha='>0', mixup_alpha='>0', mix_prob='[0,1]',
                    epochs_per_shard='int'),
    'evaluate': dict(lr='>0', lr_zeta='[1,inf)', ema_decay='[0,1)', ce_weight='>=0',
                     momentum='[0,1)', weight_decay='>=0', temperature='>0',
                     seeds='int', checkpoint_every_epochs='int>=0', log_every_steps='int'),
    'continual': dict(epochs_per_step='int', class_order_seed='int>=0'),
}
_RULE_TEXT = {'>0': 'positive', '>=0': '>= 0', 'int': 'a positive integer',
              'int>=0': 'an integer >= 0'}


def _satisfies(value, rule: str) -> bool:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    return False
  value = float(value)
  if not np.isfinite(value):
    return False
  if rule.startswith('int') and not value.is_integer():
    return False
  if rule in ('>0', 'int'):
    return value > 0
  if rule in ('>=0', 'int>=0'):
    return value >= 0
  low, high = (float(x) for x in rule[1:-1].split(','))
  return ((low <= value if rule[0] == '[' else low < value) and
          (value <= high if rule[-1] == ']' else value < high))


def validate_numbers(config: ml_collections.ConfigDict, sections) -> None:
  """Raises ValueError naming the first number of `sections` (e.g. ('squeeze',)) that is
  not finite or outside its range (`NUMBER_RULES`); keys a section lacks are skipped."""
  for section in sections:
    for key, rule in NUMBER_RULES[section].items():
      if key in config[section] and not _satisfies(config[section][key], rule):
        raise ValueError(f'{section}.{key}={config[section][key]!r} must be '
                         f'{_RULE_TEXT.get(rule, "in " + rule.replace(",", ", "))}.')
