"""Shared defaults of every experiment config, and the `arg` parser of `configs/*.py`.

A file in `configs/` calls `experiment(...)` with its dataset and overrides; an argument
string after the file name (`configs/fashion_mnist_ipc10.py:smoke,ipc=1`) selects variants:
  smoke      shrink everything to a few steps on a data subset (tests, laptops);
  ipc=N      images per class;
  seeds=N    number of student seeds in evaluate.
"""

import ml_collections

STAGES = ('squeeze', 'recover', 'relabel', 'evaluate')


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
      out[key] = type(default)(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Every knob with its default; experiment files override a few."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ','.join(STAGES)
  c.mesh_shape = -1  # devices on the 'data' axis; -1: all

  c.dataset = ml_collections.ConfigDict(dict(
      name='fashion_mnist',
      data_dir='',  # TFDS data dir for the prepared ArrayRecord files ('' ~/tensorflow_datasets)
      source_dir='',  # where the raw files are (dataset-specific default)
      manual_dir='',  # TFDS manual dir (ImageNet, Tiny-ImageNet, CIFAR archives)
      train_limit=0,  # >0: use only the first N training images (smoke runs)
      test_limit=0,
  ))

  # Squeeze: teacher training.
  c.teacher = ml_collections.ConfigDict(dict(name='convnet', width=128, depth=3,
                                             pooling='avg', stem='imagenet', dtype='float32'))
  c.squeeze = ml_collections.ConfigDict(dict(
      epochs=5, batch_size=128, optimizer='sgd', lr=0.1, momentum=0.9, nesterov=True,
      weight_decay=5e-4, warmup_epochs=0.5, label_smoothing=0.0, eval_batch_size=1000,
      augment='',  # '' the dataset's; or 'pad_crop_flip' (with pad), 'flip', ...
      pad=0,
      checkpoint_every_steps=200, log_every_steps=100,
      teacher_dir='',  # '' -> workdir/squeeze/teacher; or a teacher imported from PyTorch
  ))

  # Recover: image synthesis from the frozen teacher. Names follow the paper/reference.
  c.recover = ml_collections.ConfigDict(dict(
      ipc=10, batch_size=100,  # group size: images of different classes, same ipc index
      iterations=1000, lr=0.25, r_bn=0.01, first_bn_multiplier=10.0,
      adam_b1=0.5, adam_b2=0.9, jitter=4, min_scale=0.08, max_scale=1.0,
      crop='per_image',  # 'per_image' | 'per_group' (the reference: one crop per batch) | 'none'
      flip=True, curriculum=False,  # CDA: min crop scale from 1.0 down to min_scale (cosine)
      init='noise',  # 'noise' | 'real'
      num_classes=0,  # recover classes 0..N-1 only (0: all; smoke runs on 1000 classes)
      dtype='float32',  # teacher compute dtype ('bfloat16': loss stays float32)
      checkpoint_every_steps=200, log_every_steps=100,
  ))

  # Relabel: FKD-style soft labels for every crop of every epoch.
  c.relabel = ml_collections.ConfigDict(dict(
      mode='online',  # 'online' (teacher runs in the student step) | 'stored'
      storage='float16',  # stored mode: 'float32' | 'float16' | 'topk'
      topk=1, epochs=300, batch_size=50, min_scale=0.08, max_scale=1.0,
      mix='cutmix',  # 'cutmix' | 'mixup' | 'none'
      cutmix_alpha=1.0, mixup_alpha=0.8, mix_prob=1.0, epochs_per_shard=50,
  ))

  # Evaluate: fresh students on the distilled set (and the same-protocol baselines).
  c.student = ml_collections.ConfigDict(dict(name='convnet', width=128, depth=3,
                                             pooling='avg', stem='imagenet', dtype='float32'))
  c.evaluate = ml_collections.ConfigDict(dict(
      optimizer='adamw', lr=1e-3, weight_decay=0.01, temperature=20.0, seeds=3,
      eval_batch_size=1000, baselines='random',  # ',' list of: random, hard_label
      checkpoint_every_epochs=50, log_every_steps=100,
  ))

  # Continual: class-incremental evaluation (`--stages=continual`); the student uses
  # config.student, the evaluate optimiser and temperature, and the relabel views.
  c.continual = ml_collections.ConfigDict(dict(
      steps=5,  # class groups learned one after another; must divide the number of classes
      class_order_seed=0,  # the class order is a permutation drawn from this seed...
      class_order='',  # ...unless given here: every class once, comma-separated
      epochs_per_step=100,  # student epochs over the images of the seen classes, per step
      sets='distilled,random',  # compared image sets: distilled, random (real subset)
  ))
  return c
