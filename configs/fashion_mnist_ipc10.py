"""Fashion-MNIST, ConvNet-BN teacher and student: the default demo (runs on a 2-core CPU).

Arguments: `smoke` (a few steps on a data subset), `ipc=N` (1, 10, 50, ...), `seeds=N`,
`full` (the longer student schedule behind the README's results table).
"""

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=10, seeds=1, full=False)
  c = config_lib.base_config()
  c.dataset.name = 'fashion_mnist'

  c.teacher.update(name='convnet', width=64, depth=3)
  # Flip only: over a 4-epoch schedule pad-and-crop costs more than it gives (measured:
  # 91.1% vs 90.1% (pad 2) test top-1 after 3 of 4 epochs).
  c.squeeze.update(epochs=4, batch_size=128, lr=0.1, warmup_epochs=0.5, weight_decay=5e-4,
                   augment='flip')

  # r_bn 1.0 (the paper's Tiny-ImageNet value) rather than ImageNet's 0.01: with 0.01 the
  # objective's BN term fell only 7.8x at IPC 1 (41.5 -> 5.3), with 1.0 it fell 15x (41.5 ->
  # 2.7), the teacher still classifying every image right.
  c.recover.update(ipc=arg.ipc, batch_size=10, iterations=1000, lr=0.25, r_bn=1.0,
                   first_bn_multiplier=10.0, jitter=4, min_scale=0.5, init='noise')

  c.student.update(name='convnet', width=64, depth=3)
  c.relabel.update(mode='online', batch_size=50, epochs=300, min_scale=0.25)
  c.evaluate.update(lr=2e-3, temperature=4.0, seeds=arg.seeds)

  if arg.smoke:
    config_lib.smoke(
        c, width=16, every=4, dataset=dict(train_limit=512, test_limit=256),
        squeeze=dict(epochs=2, batch_size=64, eval_batch_size=128),
        recover=dict(iterations=8),
        relabel=dict(epochs=4, batch_size=16, epochs_per_shard=2),
        evaluate=dict(eval_batch_size=128, seeds=1, checkpoint_every_epochs=2))
  return c
