"""SRe2L dataset distillation (squeeze, recover, relabel, evaluate) in JAX/Flax.

The Python API (`sre2l_jax.api`, imported on first use so that `import sre2l_jax` stays
light): `distill(config, workdir)`, `load_distilled(workdir)`, `evaluate_set(config,
workdir)`.
"""

import importlib

__version__ = '0.1.0'
API = ('distill', 'load_distilled', 'evaluate_set')


def __getattr__(name):
  if name in API:
    # On first use (PEP 562): the package's modules import `sre2l_jax.<module>`, so the
    # package itself imports none of them when it loads.
    return getattr(importlib.import_module('sre2l_jax.api'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
