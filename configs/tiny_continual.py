"""Tiny-ImageNet class-incremental, the SRe2L paper's continual setting (after DM): the 200
classes learned in 5 or 10 steps from a distilled set, ResNet-18 (3x3 stem) teacher and
student, online soft labels at T = 20.

`python -m sre2l_jax.main --config=configs/tiny_continual.py:steps=10 --workdir=W
--config.dataset.manual_dir=<folder with tiny-imagenet-200.zip>` runs squeeze, recover and
continual. Arguments: `steps=5|10`, `ipc=N` (default 50), `smoke` (tiny models and schedules;
the tests run it on tfds.testing.mock_data).
"""

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, steps=5, ipc=50)
  c = config_lib.base_config()
  c.stages = ('squeeze', 'recover', 'continual')
  c.dataset.name = 'tiny_imagenet'

  # Squeeze and recover: the paper's Tiny-ImageNet recipe.
  c.teacher.update(name='resnet18', stem='small', width=64)
  c.squeeze.update(epochs=50, batch_size=256, lr=0.2, momentum=0.9, nesterov=False,
                   weight_decay=1e-4, warmup_epochs=5)
  c.recover.update(ipc=arg.ipc, batch_size=100, iterations=4000, lr=0.1, r_bn=1.0,
                   first_bn_multiplier=10.0, jitter=4, min_scale=0.08)

  # Students: SGD lr 0.2, KD at T = 20 with the teacher run online.
  c.student.update(name='resnet18', stem='small', width=64, batch_size=256)
  c.relabel.update(mode='online', min_scale=0.08, mix='cutmix')
  c.evaluate.update(optimizer='sgd', lr=0.2, momentum=0.9, nesterov=False, weight_decay=1e-4,
                    temperature=20.0, seeds=1)
  c.continual.update(steps=arg.steps, epochs_per_step=100, sets=('distilled', 'random'))

  if arg.smoke:
    # The random baseline needs images of every class, and the train split is stored class
    # by class: no train_limit (on mock data the mock's size decides).
    config_lib.smoke(
        c, width=8, every=4, dataset=dict(train_limit=0, test_limit=400),
        teacher=dict(name='convnet', depth=3),
        student=dict(name='convnet', depth=3, batch_size=40, epochs=2),
        squeeze=dict(epochs=1, batch_size=64, eval_batch_size=200, warmup_epochs=0.0),
        recover=dict(ipc=1, iterations=4, checkpoint_every_steps=2, log_every_steps=2),
        relabel=dict(epochs_per_shard=1),
        evaluate=dict(eval_batch_size=200), continual=dict(epochs_per_step=1))
  return c
