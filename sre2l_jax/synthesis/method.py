"""A synthesis method as a declared object, and the registry recover reads it from.

recover does not probe a method's module for what it has: the method says what kind it is
and what it needs, and recover (and `optimize`) call what it declares.
"""

import dataclasses
from typing import Callable

KINDS = ('optimised', 'direct')


def _no_settings(cfg, spec) -> None:
  del cfg, spec


def _no_draws(cfg) -> dict:
  del cfg
  return {}


@dataclasses.dataclass(frozen=True)
class Method:
  """A synthesis method.

  kind: 'optimised' (recover runs Adam on the pixels with `group_loss(images, labels, uids,
  key, min_scale, *, model, teacher, cfg) -> (loss, metrics)` per group, measures with
  `unaugmented_bn_loss(images, *, model, teacher, cfg) -> (bn, logits)` and draws the crops'
  minimum scale from `min_scale_at(step, cfg)`) or 'direct' (`synthesize(config, spec, *,
  model, teacher, train, num_classes, mesh) -> uint8 (num_classes, ipc, H, W, C)` makes the
  images in one pass). needs_class_stats: the teacher pytree carries the per-class BN
  statistics (`class_stats.KEY`). several_teachers: takes `teacher.extra_teachers` (their
  losses summed). selects: a direct method that exports recover.init='scored''s choice
  (its candidates are checked like an optimised method's). validate(cfg, spec): raises
  ValueError for the method's own settings (cfg: config.recover), run before any stage.
  draws(cfg): {setting: real images per class} the method draws from the training split,
  checked against the split before any stage.
  """
  name: str
  kind: str
  group_loss: Callable | None = None
  unaugmented_bn_loss: Callable | None = None
  min_scale_at: Callable | None = None
  synthesize: Callable | None = None
  needs_class_stats: bool = False
  several_teachers: bool = False
  selects: bool = False
  validate: Callable = _no_settings
  draws: Callable = _no_draws

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f'Method {self.name!r}: kind={self.kind!r}; valid: {KINDS}.')
    needed = (('group_loss', 'unaugmented_bn_loss', 'min_scale_at') if self.kind == 'optimised'
              else ('synthesize',))
    missing = [n for n in needed if getattr(self, n) is None]
    if missing:
      raise ValueError(f'Method {self.name!r} ({self.kind}) lacks {", ".join(missing)}.')

  @property
  def optimised(self) -> bool:
    return self.kind == 'optimised'


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to `METHODS` under its name (recover.method selects it); returns it."""
  if method.name in METHODS and METHODS[method.name] is not method:
    raise ValueError(f'A synthesis method named {method.name!r} is registered already.')
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise ValueError(f'Unknown synthesis method {name!r}; valid: {sorted(METHODS)}.')
  return METHODS[name]
