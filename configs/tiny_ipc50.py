"""Tiny-ImageNet (64x64, 200 classes), ResNet-18 with the small stem, IPC 50.

Arguments: `smoke` (a few steps on a data subset), `ipc=N` (50, 100), `seeds=N`.
Data: `tiny-imagenet-200.zip` in `config.dataset.manual_dir` (see `data/builders.py`).
The reference's Tiny-ImageNet recipe: a 50-epoch teacher (longer-trained teachers recover
worse), recovery with r_bn 1.0, and students trained with online soft labels by SGD.
"""

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=50, seeds=1)
  c = config_lib.base_config()
  c.dataset.name = 'tiny_imagenet'

  c.teacher.update(name='resnet18', width=64, stem='small')
  c.squeeze.update(epochs=50, batch_size=256, optimizer='sgd', lr=0.2, momentum=0.9,
                   nesterov=False, weight_decay=1e-4, warmup_epochs=5, eval_batch_size=1024,
                   checkpoint_every_steps=1000, log_every_steps=100)

  # Groups of 100 classes sharing an ipc index: 2 groups per ipc index.
  c.recover.update(ipc=arg.ipc, batch_size=100, iterations=4000, lr=0.1, r_bn=1.0,
                   first_bn_multiplier=10.0, jitter=4, min_scale=0.08, max_scale=1.0,
                   crop='per_image', init='noise', checkpoint_every_steps=500,
                   log_every_steps=100)

  c.student.update(name='resnet18', width=64, stem='small', epochs=100, batch_size=256)
  c.relabel.update(mode='online', min_scale=0.08, max_scale=1.0,
                   mix='cutmix')
  # SGD students: create_optimizer('sgd') reads momentum and nesterov too.
  c.evaluate.update(optimizer='sgd', lr=0.2, momentum=0.9, nesterov=False, weight_decay=1e-4,
                    temperature=20.0, seeds=arg.seeds, eval_batch_size=1024,
                    checkpoint_every_epochs=10, log_every_steps=100)

  if arg.smoke:
    # ipc 1: 200 images in 8 groups of 25 (one per device on 8 devices). The first 512
    # training images hold a few classes only: no random-subset baseline.
    config_lib.smoke(
        c, width=8, every=4, dataset=dict(train_limit=512, test_limit=256),
        squeeze=dict(epochs=1, batch_size=64, warmup_epochs=0.5, eval_batch_size=128),
        recover=dict(ipc=1, batch_size=25, iterations=4, checkpoint_every_steps=2,
                     log_every_steps=2),
        student=dict(epochs=2, batch_size=40),
        evaluate=dict(eval_batch_size=128, baselines=()))
  return c
