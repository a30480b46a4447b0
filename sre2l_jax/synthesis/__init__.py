"""Synthesis methods: the objectives recover optimises images with.

A method is a module with `group_loss(images, labels, uids, key, min_scale, *, model,
teacher, cfg) -> (loss, metrics)` for one group of images; `optimize` runs any of them
(groups vmapped and sharded, Adam on the images). A second method is a new module here and
an entry in `METHODS`, not an edit of the recover stage.

Methods: `sre2l` (SRe2L's BN matching), `edc` (EDC's soft category-aware matching against the
per-class statistics of `class_stats.py`; set NEEDS_CLASS_STATS). Shared by every method:
`selection` (teacher-scored real starting images, recover.init='scored') and `diversity`
(DELT's early-late schedule, recover.diversity).
"""

from sre2l_jax.synthesis import edc
from sre2l_jax.synthesis import rded
from sre2l_jax.synthesis import sre2l

METHODS = {'sre2l': sre2l, 'edc': edc, 'rded': rded}


def get_method(name: str):
  if name not in METHODS:
    raise ValueError(f'Unknown synthesis method {name!r}; valid: {sorted(METHODS)}.')
  return METHODS[name]
