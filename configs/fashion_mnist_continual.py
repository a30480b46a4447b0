"""Fashion-MNIST class-incremental: the IPC10 distilled set learned in 5 steps of 2 classes.

`python -m sre2l_jax.main --config=configs/fashion_mnist_continual.py --workdir=W` runs
squeeze, recover and continual. Arguments: `smoke`, `ipc=N`, `method=NAME` (as
fashion_mnist_ipc10.py: its default per IPC) and `steps=N` (a divisor of the 10 classes).
"""

import os

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=10, method='', steps=5)
  c = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fashion_mnist_ipc10.py'),
      ','.join((['smoke'] if arg.smoke else []) + [f'ipc={arg.ipc}'] +
               ([f'method={arg.method}'] if arg.method else [])))
  c.stages = ('squeeze', 'recover', 'continual')
  c.continual.update(steps=arg.steps, epochs_per_step=100, sets=('distilled', 'random'))
  if arg.smoke:
    c.continual.epochs_per_step = 2
  return c
