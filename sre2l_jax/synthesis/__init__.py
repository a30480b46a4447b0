"""Synthesis methods: how recover makes the images.

A method is a `Method` (synthesis/method.py): its kind ('optimised': per-group losses that
`optimize` runs Adam on, groups vmapped and sharded; 'direct': it makes the images itself),
what it needs and its own validation. A new method is a module here declaring one and a
`register` call, not an edit of the recover stage.

Methods: `sre2l` (SRe2L's BN matching), `edc` (EDC's soft category-aware matching against the
per-class statistics of `class_stats.py`), `rded` (RDED's scored, stitched real patches),
`select` (the teacher's scored choice of real images, unoptimised: at Fashion-MNIST IPC 50
the coreset's choice).
Shared by the optimised methods: `selection` (teacher-scored real starting images,
recover.init='scored') and `diversity` (DELT's early-late schedule, recover.diversity);
`candidates` (candidate scoring and k-means) by selection, rded and the coreset baseline.
"""

from sre2l_jax.synthesis import edc
from sre2l_jax.synthesis import rded
from sre2l_jax.synthesis import select
from sre2l_jax.synthesis import sre2l
from sre2l_jax.synthesis.method import METHODS
from sre2l_jax.synthesis.method import Method
from sre2l_jax.synthesis.method import get_method
from sre2l_jax.synthesis.method import register

for _method in (sre2l.METHOD, edc.METHOD, rded.METHOD, select.METHOD):
  register(_method)
