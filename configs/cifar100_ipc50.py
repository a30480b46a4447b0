"""CIFAR-100 (32x32, 100 classes), ResNet-18 with the small stem, IPC 50.

Arguments: `smoke` (a few steps on a data subset), `ipc=N` (10, 50, 100), `seeds=N`.
Data: `cifar-100-python.tar.gz` in `config.dataset.manual_dir` (see `data/builders.py`).
Teacher as the reference (SGD 0.1, wd 5e-4, batch 128, 200 epochs, cosine, pad-crop + flip);
recovery without the random crop (too destructive at 32x32), 1K iterations.
"""

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=50, seeds=1)
  c = config_lib.base_config()
  c.dataset.name = 'cifar100'

  c.teacher.update(name='resnet18', width=64, stem='small')
  c.squeeze.update(epochs=200, batch_size=128, optimizer='sgd', lr=0.1, momentum=0.9,
                   nesterov=False, weight_decay=5e-4, warmup_epochs=0, eval_batch_size=1000,
                   checkpoint_every_steps=1000, log_every_steps=100)

  # One group of all 100 classes per ipc index.
  c.recover.update(ipc=arg.ipc, batch_size=100, iterations=1000, lr=0.25, r_bn=0.01,
                   first_bn_multiplier=10.0, jitter=4, crop='none', init='noise',
                   checkpoint_every_steps=200, log_every_steps=100)

  c.student.update(name='resnet18', width=64, stem='small', epochs=300, batch_size=128)
  c.relabel.update(mode='online', min_scale=0.08, max_scale=1.0,
                   mix='cutmix')
  c.evaluate.update(optimizer='adamw', lr=1e-3, weight_decay=0.01, temperature=20.0,
                    seeds=arg.seeds, eval_batch_size=1000, checkpoint_every_epochs=50,
                    log_every_steps=100)

  if arg.smoke:
    config_lib.smoke(
        c, width=8, every=4, dataset=dict(train_limit=512, test_limit=256),
        squeeze=dict(epochs=1, batch_size=64, eval_batch_size=128),
        # ipc 1: 100 images in 4 groups of 25 (padded to 8 groups on 8 devices).
        recover=dict(ipc=1, batch_size=25, iterations=4, checkpoint_every_steps=2,
                     log_every_steps=2),
        student=dict(epochs=2, batch_size=40),
        # 512 training images need not hold every class: no random-subset baseline.
        evaluate=dict(eval_batch_size=128, baselines=()))
  return c
