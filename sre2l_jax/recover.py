"""Recover: synthesise images whose BatchNorm-input statistics match the frozen teacher's.

The objective is a synthesis method (`recover.method`, see `synthesis/`; SRe2L's by default);
`synthesis.optimize` lays the images out in groups, vmaps and shards them over the mesh and
runs Adam on them. This stage orchestrates: teacher, round plan, layout, state (restored or
initialised), the loop, measurements at start and end, and the exports (TFDS dataset, PNG
tree, grid).

Rounds: the groups are optimised a round at a time, each round all its iterations, so that a
round's step fits the devices' memory. The round size comes from XLA's memory analysis of the
compiled step (`memory`; `recover.device_memory_gb`, `recover.memory_margin`) or from
`recover.groups_per_round`. Groups are independent (per-group statistics, per-image keys), so
the images do not depend on the round size. A finished round's images are written at once
(`recover/rounds/`, `recover/images/`); the checkpoint holds the round in progress.
"""

import dataclasses
import functools
import io
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from sre2l_jax import checkpoint
from sre2l_jax import config_lib
from sre2l_jax import class_stats
from sre2l_jax import context
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import memory
from sre2l_jax import models
from sre2l_jax import multihost
from sre2l_jax import rngs
from sre2l_jax import synthesis
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.synthesis import diversity
from sre2l_jax.synthesis import optimize
from sre2l_jax.synthesis import selection
from sre2l_jax.synthesis import sre2l

CROPS = ('per_image', 'per_group', 'none')
# recover.init: noise, random real images, the teacher-scored choice (synthesis/selection.py)
# or the k-means coreset baseline's images (image_sets.coreset).
INITS = ('noise', 'real', 'scored', 'coreset')


def validate(config, ctx: context.Context) -> None:
  """Every check before recover's work, none of them writing: the settings (the method's own
  included) and the real images per class it will draw."""
  check_settings(config, ctx.spec)
  check_draws(config, ctx.spec)


def check_settings(config, spec) -> None:
  """recover's settings and its method's (`Method.validate`); reads no data."""
  config = teacher_lib.for_recover(config)  # recover.teachers='main': config.teacher alone
  cfg = config.recover
  method = synthesis.get_method(cfg.method)
  if config.teacher.get('extra_teachers') and not method.several_teachers:
    several = ' and '.join(m.name for m in synthesis.METHODS.values() if m.several_teachers)
    raise ValueError(f'Several teachers (teacher.extra_teachers) are summed by the {several} '
                     f'objectives only; recover.method={cfg.method!r} takes one teacher. Set '
                     f"recover.teachers='main' to recover against config.teacher alone and "
                     f'label with every teacher.')
  if cfg.ipc <= 0:
    raise ValueError(f'recover.ipc={cfg.ipc} must be a positive number of images per class.')
  num_classes = image_sets.recovered_classes(cfg, spec)
  if not 0 < num_classes <= spec.num_classes:
    raise ValueError(f'recover.num_classes={num_classes}; {spec.name} has '
                     f'{spec.num_classes} classes (0: all).')
  if cfg.group_by not in ('ipc_index', 'class'):
    raise ValueError(f"recover.group_by={cfg.group_by!r}; valid: 'ipc_index', 'class'.")
  if cfg.group_by == 'class' and (cfg.batch_size <= 0 or cfg.ipc % cfg.batch_size):
    raise ValueError(
        f'recover.batch_size={cfg.batch_size} is the group size; with '
        f"recover.group_by='class' (groups of one class) it must divide ipc={cfg.ipc}.")
  if cfg.group_by == 'ipc_index' and not mixed_group_size_fits(cfg.batch_size, num_classes,
                                                               cfg.ipc):
    raise ValueError(
        f'recover.batch_size={cfg.batch_size} is the group size (images of different classes '
        f'sharing an ipc index); it must divide the {num_classes} classes of '
        f'{spec.name}' + (' recovered' if num_classes < spec.num_classes else '') +
        f', or be {num_classes} x m with m dividing ipc={cfg.ipc} (every class at m ipc '
        f'indices).')
  if cfg.iterations <= 0 or cfg.lr <= 0 or cfg.r_bn < 0:
    raise ValueError(f'recover needs iterations > 0, lr > 0, r_bn >= 0; got '
                     f'{cfg.iterations}, {cfg.lr}, {cfg.r_bn}.')
  if not cfg.r_ce >= 0 or cfg.r_ce + cfg.r_bn <= 0:
    raise ValueError(f'recover.r_ce={cfg.r_ce} (with r_bn={cfg.r_bn}): the cross-entropy weight '
                     f'must be >= 0, and r_ce + r_bn > 0 (else nothing is optimised).')
  if cfg.crop not in CROPS:
    raise ValueError(f'recover.crop={cfg.crop!r}; valid: {", ".join(map(repr, CROPS))}.')
  if cfg.remat not in sre2l.REMAT:
    raise ValueError(f'recover.remat={cfg.remat!r}; valid: {", ".join(map(repr, sre2l.REMAT))}.')
  if cfg.parallel_groups < 0:
    raise ValueError(f'recover.parallel_groups={cfg.parallel_groups} must be >= 0 (0: all).')
  if cfg.groups_per_round < 0 or not cfg.device_memory_gb >= 0 or not 0 < cfg.memory_margin <= 1:
    raise ValueError(f'recover needs groups_per_round >= 0 (0: planned), device_memory_gb >= 0 '
                     f'(0: the device\'s own), 0 < memory_margin <= 1; got '
                     f'{cfg.groups_per_round}, {cfg.device_memory_gb}, {cfg.memory_margin}.')
  if cfg.init not in INITS:
    raise ValueError(f"recover.init={cfg.init!r}; valid: {', '.join(map(repr, INITS))}.")
  selection.check_pick(cfg.scored.pick)
  if cfg.init == 'scored' and not cfg.scored.coverage and cfg.scored.pick != 'score':
    raise ValueError(
        f"recover.scored.pick={cfg.scored.pick!r} takes effect only with scored.coverage=True; "
        f"with coverage=False the start is the ipc best-scored images of each class. Set "
        f"scored.coverage=True, or pick='score'.")
  if not spec.in_memory and (cfg.init == 'real' or (cfg.init == 'scored' and
                                                    cfg.scored.candidates == 0)):
    what = "init='real'" if cfg.init == 'real' else "init='scored' with scored.candidates=0"
    raise ValueError(
        f'recover.{what} needs the whole training split in host memory; {spec.name} is '
        f'streamed. Use init=\'scored\' with scored.candidates > 0 (candidates are scored as '
        f'they are read) or init=\'noise\'.')
  if cfg.init == 'scored' and (cfg.scored.candidates < 0 or cfg.scored.crops < 1
                               or cfg.scored.iterations < 1):
    raise ValueError(f'recover.scored.candidates={cfg.scored.candidates} (>= 0, 0: all), '
                     f'scored.crops={cfg.scored.crops} (>= 1) and scored.iterations='
                     f'{cfg.scored.iterations} (>= 1) must all be in range.')
  if not 0 <= cfg.edc.class_bn_weight <= 1:
    raise ValueError(f'recover.edc.class_bn_weight={cfg.edc.class_bn_weight} must be in [0, 1].')
  if not method.optimised:
    moot = [f'{k}={cfg[k]!r}' for k, default in (('refine_fraction', 1.0), ('r_ce', 1.0),
                                                 ('diversity', 'none')) if cfg[k] != default]
    if moot:
      raise ValueError(f'recover.method={cfg.method!r} optimises nothing, so recover.'
                       f'{", recover.".join(moot)} would do nothing: leave them at their '
                       f'defaults, or pick an optimising method (sre2l, edc).')
  diversity.validate(cfg)
  selection.check_candidates(cfg)
  method.validate(cfg, spec)
  if not 0 < cfg.min_scale <= cfg.max_scale <= 1:
    raise ValueError(f'recover needs 0 < min_scale <= max_scale <= 1; got {cfg.min_scale}, '
                     f'{cfg.max_scale}.')
  config_lib.validate_numbers(config, ('recover',))


def check_draws(config, spec) -> None:
  """The real images per class recover draws from the training split (its method's `draws`;
  an optimised method's init='scored' candidates), against a split held in memory, before
  any stage works (a streamed split is checked as it is read)."""
  cfg = config.recover
  method = synthesis.get_method(cfg.method)
  draws = dict(method.draws(cfg))
  scored = (method.optimised or method.selects) and cfg.init == 'scored'
  if scored and cfg.scored.candidates:
    draws['recover.scored.candidates'] = cfg.scored.candidates
  # The coreset, like scored.candidates=0, clusters all of each class's images.
  whole_classes = (scored and not cfg.scored.candidates) or (
      method.optimised and cfg.init == 'coreset')
  if not spec.in_memory or not (draws or whole_classes):
    return
  num_classes = image_sets.recovered_classes(cfg, spec)
  counts, total = _class_counts(config.dataset, num_classes)
  if whole_classes:
    selection.check_class_sizes(cfg, int(counts.min()), config.dataset.train_limit)
  for setting, count in draws.items():
    short = np.flatnonzero(counts < count).tolist()
    if short:
      raise ValueError(f'{setting}: {batching.too_few_per_class(count, short, total)} '
                       f'Lower {setting}.')


_CLASS_COUNTS = {}  # dataset settings -> (images per class, images): read once per process


def _class_counts(dataset, num_classes: int) -> tuple[np.ndarray, int]:
  """(training images of each class (num_classes,), training images) of an in-memory split;
  kept for the process (validating several configs of one dataset reads it once)."""
  key = (json.dumps(dataset.to_dict(), sort_keys=True, default=str), num_classes)
  if key not in _CLASS_COUNTS:
    _, labels = pipeline.load_split(dataset, 'train').arrays()
    _CLASS_COUNTS[key] = np.bincount(labels, minlength=num_classes)[:num_classes], len(labels)
  return _CLASS_COUNTS[key]


# ----------------------------------------------------------------------------- plan


@dataclasses.dataclass
class RoundPlan:
  """How the groups are split into rounds, and what XLA says one round's step needs.

  groups: real groups; groups_per_round: groups optimised at once (a multiple of the
  devices; the last rounds may hold padding groups); report: XLA's analysis of one round's
  step (per device); budget_bytes: what a round may use per device (None: no limit known);
  how: why this round size.
  """
  groups: int
  groups_per_round: int
  rounds: int
  devices: int
  report: memory.MemoryReport
  budget_bytes: int | None
  how: str
  fixed_bytes: float | None = None
  bytes_per_group: float | None = None
  largest_groups_per_round: int | None = None  # planned from memory: the most that fit
  # XLA's FLOPs of one group's step, from the step compiled for one group per device (XLA
  # counts a loop's body once, whatever its trip count).
  flops_per_group_step: float | None = None
  measure: memory.MemoryReport | None = None  # the measure pass over one round

  @property
  def peak_bytes(self) -> int:
    """The round's peak per device: its step's or its measure pass's."""
    return max(self.report.peak_bytes, self.measure.peak_bytes if self.measure else 0)

  def to_dict(self) -> dict:
    return {'groups': self.groups, 'groups_per_round': self.groups_per_round,
            'largest_groups_per_round': self.largest_groups_per_round,
            'rounds': self.rounds, 'devices': self.devices, 'how': self.how,
            'budget_bytes': self.budget_bytes, 'fixed_bytes': self.fixed_bytes,
            'bytes_per_group': self.bytes_per_group,
            'flops_per_group_step': self.flops_per_group_step, 'step': self.report.to_dict(),
            'measure': self.measure.to_dict() if self.measure else None,
            'peak_bytes': self.peak_bytes}


def memory_budget(cfg, device_memory_gb: float | None = None) -> int | None:
  """Bytes a round may use per device: `memory_margin` of the stated or the device's own
  memory (None where neither is known: a CPU)."""
  limit = memory.device_memory_bytes(cfg.device_memory_gb if device_memory_gb is None
                                     else device_memory_gb)
  return None if limit is None else int(limit * cfg.memory_margin)


def plan_rounds(cfg, real_groups: int, devices: int, compile_at, budget: int | None,
                stored: int = 0, measure_at=None) -> RoundPlan:
  """Chooses the groups per round and returns the plan.

  compile_at(g): the step compiled for g groups (cached by the caller). measure_at(g): XLA's
  analysis of the measure pass over g groups (`optimize.measure`, run at a round's start and
  end on the whole round; None: not planned). A round must fit both. stored: the round size
  of an earlier start of this run (0: none), which a resumed run must keep.
  Raises MemoryError (before any training) when the chosen round does not fit `budget`,
  naming the knob and a value that fits.
  """
  one_round = math.ceil(real_groups / devices) * devices
  fixed = per_group = largest = None
  requested = cfg.groups_per_round

  def round_report(groups: int) -> memory.MemoryReport:
    step = memory.analyse(compile_at(groups))
    return step if measure_at is None else memory.heavier(step, measure_at(groups))

  if requested and requested % devices:
    raise ValueError(f'recover.groups_per_round={requested} must be a multiple of the '
                     f'{devices} devices (groups are sharded over them).')
  if stored:
    if stored % devices:
      raise ValueError(f'This run was started with {stored} groups per round, not a multiple '
                       f'of the {devices} devices now: resume on a mesh whose size divides '
                       f'{stored}, or use a new --workdir.')
    if requested and requested != stored:
      raise ValueError(f'This run was started with {stored} groups per round; '
                       f'recover.groups_per_round={requested} would change the rounds. Drop '
                       f'the override (or set it to {stored}) to resume, or use a new '
                       f'--workdir.')
    _, per_round = memory.balanced_rounds(real_groups, stored, devices)
    how = 'kept from the run\'s first start'
  elif requested:
    _, per_round = memory.balanced_rounds(real_groups, min(requested, one_round), devices)
    how = f'recover.groups_per_round={requested}'
  elif budget is None:
    per_round, how = one_round, 'one round: no device memory limit known'
  else:
    try:
      unit = memory.plan_units(lambda k: round_report(k * devices), budget,
                               max_units=one_round // devices)
    except MemoryError:
      raise MemoryError(_one_group_refusal(cfg, round_report(devices), budget)) from None
    fixed, per_group, largest = unit.fixed_bytes, unit.bytes_per_unit, unit.units * devices
    _, per_round = memory.balanced_rounds(real_groups, largest, devices)
    how = f'the most that fit {memory.format_bytes(budget)} per device'
  rounds = math.ceil(real_groups / per_round)
  step_report = memory.analyse(compile_at(per_round))
  measure_report = None if measure_at is None else measure_at(per_round)
  report = round_report(per_round)
  if budget is not None and report.peak_bytes > budget:
    program = 'step' if report.peak_bytes == step_report.peak_bytes else 'measure pass'
    what = (f'A round of {per_round} groups ({per_round // devices} per device, {how}) does '
            f'not fit: XLA plans {memory.describe(report)} for its {program}, over the '
            f'{memory.format_bytes(budget)} available per device')
    if stored:
      raise MemoryError(f'{what}. This run keeps its round size: resume with '
                        f'{_memory_that_fits(cfg, report)}, or use a new --workdir.')
    try:
      fits = memory.plan_units(lambda k: round_report(k * devices), budget,
                               max_units=per_round // devices).units * devices
    except MemoryError:
      raise MemoryError(f'{what}. {_one_group_refusal(cfg, round_report(devices), budget)}'
                        ) from None
    raise MemoryError(f'{what}. Set recover.groups_per_round={fits} (the most that fit; 0 '
                      f'plans it), or {_memory_that_fits(cfg, report)}.')
  # One group per device: one device's program is one group's step.
  flops = memory.analyse(compile_at(devices)).flops
  return RoundPlan(real_groups, per_round, rounds, devices, step_report, budget, how, fixed,
                   per_group, largest, flops, measure_report)


def _memory_that_fits(cfg, report: memory.MemoryReport) -> str:
  """'recover.device_memory_gb=X' that holds `report`'s peak at recover.memory_margin."""
  needed = report.peak_bytes / cfg.memory_margin / memory.GIB
  return (f'recover.device_memory_gb={math.ceil(needed * 1000) / 1000:g} (at memory_margin='
          f'{cfg.memory_margin:g}; a device with that much memory)')


def _one_group_refusal(cfg, report: memory.MemoryReport, budget: int) -> str:
  return (f'Even one group per device (recover.batch_size={cfg.batch_size} images) needs '
          f'{memory.format_bytes(report.peak_bytes)} per device by XLA\'s plan, over the '
          f'{memory.format_bytes(budget)} available: set {_memory_that_fits(cfg, report)}, or '
          f'make a group cheaper: recover.remat (now {cfg.remat!r}), a smaller '
          f'recover.batch_size, recover.dtype=bfloat16.')


def projection(plan: RoundPlan, cfg, device_kind: str) -> str:
  """The projected time of all rounds on this device (or an H100 where the presets do not
  know it), from XLA's FLOPs at `memory.PROJECTED_UTILISATION` of the datasheet peak."""
  if not plan.flops_per_group_step:
    return 'no projected time (this backend counts no FLOPs)'
  name = memory.preset_for(device_kind) or 'h100'
  device = memory.DEVICES[name]
  dtype = 'bfloat16' if cfg.dtype == 'bfloat16' else 'float32'
  peak = device.peak_tflops[dtype]
  per_device = plan.flops_per_group_step * plan.groups_per_round / plan.devices
  seconds = memory.projected_seconds(per_device, cfg.iterations * plan.rounds, plan.devices,
                                     peak, memory.PROJECTED_UTILISATION)
  per_image = plan.flops_per_group_step / cfg.batch_size
  where = '' if memory.preset_for(device_kind) else f' (this is {device_kind})'
  return (f'projected {memory.format_seconds(seconds)} on {plan.devices} x {device.name}'
          f'{where} at {100 * memory.PROJECTED_UTILISATION:.0f}% of its {peak:g} TFLOP/s '
          f'{dtype} peak, from XLA\'s {per_image / 1e9:.2f} GFLOP per image-iteration: a '
          f'projection, not a measurement')


def describe_plan(plan: RoundPlan, cfg) -> str:
  budget = ('' if plan.budget_bytes is None else
            f' of {memory.format_bytes(plan.budget_bytes)} allowed')
  line = (f'{plan.groups} groups of {cfg.batch_size} images in {plan.rounds} round(s) of '
          f'{plan.groups_per_round} groups on {plan.devices} device(s) ({plan.how}); XLA: '
          f'peak {memory.format_bytes(plan.peak_bytes)} per device{budget} (step '
          f'{memory.format_bytes(plan.report.peak_bytes)}, measure pass '
          f'{memory.format_bytes(plan.measure.peak_bytes) if plan.measure else "not planned"})')
  if plan.bytes_per_group:
    line += (f', {memory.format_bytes(plan.bytes_per_group)} per group + '
             f'{memory.format_bytes(plan.fixed_bytes)}')
  return line + f'; {cfg.dtype}, remat {cfg.remat}'


def host_plan(cfg, plan: RoundPlan, spec: datasets.DatasetSpec, num_classes: int,
              backend: str | None = None) -> memory.HostPlan:
  """This process's host memory over recover (`memory.HostPlan`): the process now, the
  devices' plan where they are host memory, and the host-side passes: a checkpoint save of
  its share of the state (the images and Adam's two moments, float32), a round's end (the
  round's images copied off the devices in float32, as uint8 and as PNGs) and, on process 0,
  the export (the whole set as uint8: the rounds joined, put in class order, serialised into
  TFDS; a round's float32 images read back)."""
  pixels = math.prod(spec.image_shape)
  round_images = plan.groups_per_round * cfg.batch_size * pixels
  processes = jax.process_count()
  passes = {
      'checkpoint save': memory.CHECKPOINT_HOST_FACTOR * 3 * 4 * round_images / processes,
      'round end': round_images * (4 + 1 + 1),
  }
  if jax.process_index() == 0:
    passes['export'] = 3 * num_classes * cfg.ipc * pixels + 4 * round_images
  return memory.host_plan(plan.peak_bytes, passes, backend)


def mixed_group_size_fits(size: int, num_classes: int, ipc: int) -> bool:
  """Whether groups of `size` images of different classes tile the set (group_by
  'ipc_index'): size divides the classes, or is the classes times a divisor of ipc."""
  if size <= 0:
    return False
  if size <= num_classes:
    return num_classes % size == 0
  return size % num_classes == 0 and ipc % (size // num_classes) == 0


def real_group_count(cfg, num_classes: int) -> int:
  """Groups holding real images (`optimize.group_layout`)."""
  if cfg.group_by == 'class':
    return num_classes * (cfg.ipc // cfg.batch_size)
  return cfg.ipc * num_classes // cfg.batch_size


def create_measure_fn(config, spec, mesh, method, model):
  """The measure pass (`optimize.measure` on the round's images as they are): jitted
  (images, labels, uids, teacher) -> (BN term, un-augmented BN loss, hits), replicated."""
  cfg = config.recover
  measure_key = rngs.stream_key(config.seed, 'recover_measure')
  # Global arrays are passed as arguments: closing over them fails on several processes.
  return jax.jit(lambda images, labels, uids, teacher: optimize.measure(
      images, labels, uids, measure_key, method=method, model=model, teacher=teacher,
      cfg=cfg, mesh=mesh), out_shardings=batching.replicated(mesh))


def _step_factory(config, spec, mesh, teacher, rng):
  """(compile_at, measure_at, tx): g -> the recover step compiled for g groups (cached); g ->
  XLA's analysis of the measure pass over g groups (cached); Adam."""
  cfg = config.recover
  method = synthesis.get_method(cfg.method)
  model = create_teacher_model(config, spec)
  tx = optimize.create_optimizer(cfg)
  shardings = optimize.state_shardings(tx, (mesh.size, cfg.batch_size) + spec.image_shape,
                                       mesh)
  step = optimize.create_recover_step(
      optimize.Recovery(method, model, cfg, tx, optimize.pixel_bounds(spec), mesh,
                        num_classes=image_sets.recovered_classes(cfg, spec)), shardings)

  @functools.lru_cache(maxsize=None)
  def compile_at(groups):
    start = time.time()
    compiled = optimize.compile_recover_step(step, tx, groups, cfg.batch_size,
                                             spec.image_shape, mesh, teacher, rng)
    logging.info('recover: step for %d groups compiled in %.0f s', groups, time.time() - start)
    return compiled

  measure_fn = create_measure_fn(config, spec, mesh, method, model)

  @functools.lru_cache(maxsize=None)
  def measure_at(groups):
    state, labels, uids, _, abstract_teacher = optimize.abstract_step_args(
        tx, groups, cfg.batch_size, spec.image_shape, mesh, teacher, rng)
    return memory.compile_abstract(measure_fn, state['images'], labels, uids, abstract_teacher)
  return compile_at, measure_at, tx


def bn_layer_names(model, teacher, image_shape) -> list[str]:
  """The teacher's BatchNorm layers in call order (the order of the per-layer BN terms), as
  'bn0' or 'layer1_0/bn1'; nothing is computed (the names are read while tracing)."""
  names = []

  def forward(teacher):
    _, state = model.apply(teacher, jnp.zeros((1,) + tuple(image_shape)), train=False,
                           mutable=[models.BN_INPUTS])
    names.extend('/'.join(path)[:-len('_input')]
                 for path, _ in models.iter_in_call_order(state[models.BN_INPUTS]))
    return 0

  jax.eval_shape(forward, teacher)
  return names


def adam_lr(cfg, step: int) -> float:
  """The learning rate of the loop's `step` (1-based, counted over rounds): Adam's cosine
  decay from recover.lr over each round's iterations (`optimize.create_optimizer`)."""
  k = (step - 1) % cfg.iterations
  return 0.5 * cfg.lr * (1 + math.cos(math.pi * k / cfg.iterations))


def create_teacher_model(config, spec):
  return teacher_lib.create_model(  # several teachers: their Ensemble (the losses summed)
      config, spec.num_classes, dtype=None if config.recover.dtype == 'float32' else jnp.bfloat16)


def plan(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Dry run: the round plan at the real shapes, nothing allocated, no data, no teacher file.

  The real step is compiled for this backend at abstract shapes (the teacher's from the
  model). With `recover.device_memory_gb` (or a device that states its limit) one plan is
  printed; on a CPU without a stated memory, one per known device (`memory.DEVICES`).
  Returns {'plans': {device: plan dict}, 'fits': whether every plan fits, ...}.
  """
  del workdir  # nothing is read or written
  config = teacher_lib.for_recover(config)
  cfg, spec, mesh = config.recover, ctx.spec, ctx.mesh
  check_settings(config, spec)  # no data read
  teacher = models.abstract_variables(create_teacher_model(config, spec), spec.image_shape)
  if synthesis.get_method(cfg.method).needs_class_stats:
    teacher[class_stats.KEY] = class_stats.abstract(teacher['batch_stats'], spec.num_classes)
  rng = jax.random.split(rngs.stream_key(config.seed, 'recover'))[1]
  compile_at, measure_at, _ = _step_factory(config, spec, mesh, teacher, rng)
  real_groups = real_group_count(cfg, image_sets.recovered_classes(cfg, spec))
  kind = jax.devices()[0].device_kind
  budgets = {'this device': memory_budget(cfg)}
  if budgets['this device'] is None and not cfg.groups_per_round:
    budgets = {name: int(d.memory_gib * memory.GIB * cfg.memory_margin)
               for name, d in memory.DEVICES.items()}
  out = {'backend': jax.default_backend(), 'devices': mesh.size, 'plans': {}, 'fits': True}
  print(f'recover plan (dry run: compiled for {jax.default_backend()} at abstract shapes, '
        f'nothing allocated): {spec.name}, {config.teacher.name}, '
        f'{spec.image_shape[0]}x{spec.image_shape[1]}, {cfg.iterations} iterations')
  for name, budget in budgets.items():
    try:
      p = plan_rounds(cfg, real_groups, mesh.size, compile_at, budget,
                      measure_at=measure_at)
    except MemoryError as e:
      print(f'  {name}: does not fit: {e}')
      out['plans'][name] = {'error': str(e)}
      out['fits'] = False
      continue
    device_kind = memory.DEVICES[name].name if name in memory.DEVICES else kind
    # The host: this machine's devices are its memory only on the CPU backend.
    host = host_plan(cfg, p, spec, image_sets.recovered_classes(cfg, spec),
                     jax.default_backend() if name == 'this device' else 'accelerator')
    print(f'  {name}: {describe_plan(p, cfg)}')
    print(f'  {" " * len(name)}  {projection(p, cfg, device_kind)}')
    print(f'  {" " * len(name)}  {host.describe()}')
    out['plans'][name] = p.to_dict() | {'projection': projection(p, cfg, device_kind),
                                        'host': host.to_dict()}
  return out


# ----------------------------------------------------------------------------- rounds


def _round_path(stage_dir: str, r: int, suffix: str) -> str:
  return os.path.join(stage_dir, 'rounds', f'round_{r:05d}{suffix}')


def _round_done(stage_dir: str, r: int) -> bool:
  return files.exists(_round_path(stage_dir, r, '.json'))


def _write_round(stage_dir: str, r: int, images: np.ndarray, summary: dict) -> None:
  """The round's final images (real groups, B, H, W, C) float32 normalised, then its summary
  (written last: it marks the round finished)."""
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.save(buffer, images)
    files.atomic_write(_round_path(stage_dir, r, '.npy'), buffer.getvalue())
  files.write_json(_round_path(stage_dir, r, '.json'), summary)


def _write_pngs(directory: str, images: np.ndarray, labels: np.ndarray, uids: np.ndarray,
                num_classes: int) -> None:
  """PNGs of some groups (uint8 (G, B, H, W, C)) into the image folder
  (`export.write_image_folder`), a group's files at once."""
  for group_images, group_labels, group_uids in zip(images, labels, uids):
    export.write_image_folder(directory, group_images, group_labels,
                              np.asarray(group_uids) // num_classes)


def check_recovery(initial_bn: float, final_bn: float, teacher_top1: float,
                   cfg: ml_collections.ConfigDict) -> None:
  """Refuses a finished recover whose images are not what recover promises.

  initial_bn, final_bn: the objective's BN term at the start and the end (same views).
  teacher_top1: the teacher's top-1 (fraction) on the final images. cfg: the recover config;
  `cfg.min_bn_reduction` (the BN term must end at most initial / this; 0: off; not asked of
  a cross-entropy-only run, r_bn = 0, which does not optimise the BN term) and
  `cfg.min_teacher_top1` (0: off) are the thresholds. A diverging lr can leave every loss
  finite: the BN term then rises and the teacher no longer recognises the images.
  """
  problems = []
  bn_fell = final_bn * cfg.min_bn_reduction <= initial_bn
  if cfg.min_bn_reduction > 0 and cfg.r_bn > 0 and not bn_fell:
    problems.append(f'the BN term went {initial_bn:.4g} -> {final_bn:.4g} (it must fall by a '
                    f'factor of at least recover.min_bn_reduction={cfg.min_bn_reduction:g}: '
                    f'lower recover.lr, now {cfg.lr})')
  if cfg.min_teacher_top1 > 0 and not teacher_top1 >= cfg.min_teacher_top1:
    problems.append(f'the teacher recognises {100 * teacher_top1:.1f}% of the images (at '
                    f'least {100 * cfg.min_teacher_top1:.0f}% expected: lower recover.lr, now '
                    f'{cfg.lr}, or recover.r_bn, now {cfg.r_bn})')
  if problems:
    raise train_lib.NotConvergedError(
        f'recover did not converge: {"; ".join(problems)}. Nothing was exported. Re-run with '
        f'the lowered knob and a new --workdir, or accept these images with '
        f'--config.recover.min_bn_reduction=0 --config.recover.min_teacher_top1=0 (on this '
        f'workdir: the finished work is kept).')


# ----------------------------------------------------------------------------- run


def finished(workdir: str, config: ml_collections.ConfigDict) -> dict | None:
  """recover/result.json if this workdir's recover finished (its fingerprint, which `run`
  checks against `config` and the teacher first, and its distilled set are there); else
  None (a result.json from elsewhere is not finished)."""
  del config  # the fingerprint, which needs the teacher's digest, is run's to check
  stage_dir = os.path.join(workdir, 'recover')
  result = checkpoint.finished_result(stage_dir)
  if result is None or not all(map(files.exists, (
      os.path.join(stage_dir, checkpoint.FINGERPRINT), image_sets.distilled_dir(workdir)))):
    return None
  return result


def run(config: ml_collections.ConfigDict, workdir: str, ctx: context.Context) -> dict:
  """Recovers `ipc` images per class with recover.method: an optimised method a round of
  groups at a time, resuming from `workdir/recover/checkpoints` (the round in progress) and
  `workdir/recover/rounds` (the finished rounds' images); a direct one in one pass. With
  recover.teachers='main' all of it, its record included, sees config.teacher alone."""
  validate(config, ctx)
  config = teacher_lib.for_recover(config)
  method = synthesis.get_method(config.recover.method)
  _, teacher = teacher_lib.load(config, workdir, ctx.mesh)  # fails early if missing/unfit
  model = create_teacher_model(config, ctx.spec)
  done = _finished_or_claim(config, workdir, ctx.mesh)
  if done is not None:
    return done
  if not method.optimised:  # no optimisation (rded): the images in one pass
    return run_direct(config, workdir, method, ctx, model, teacher)
  return run_optimised(config, workdir, method, ctx, model, teacher)


def _finished_or_claim(config, workdir: str, mesh) -> dict | None:
  """recover's result when it finished in `workdir` under this config (`finished`, its
  fingerprint checked); else None, the workdir claimed for it (its fingerprint written; a
  conflicting one refused)."""
  stage_dir = os.path.join(workdir, 'recover')
  key = fingerprints.record('recover', config, **{
      image_sets.TEACHER_KEY: teacher_lib.digest(config, workdir, mesh)})
  # A workdir recovered before teacher digests: this teacher's recorded (stated) when claimed.
  added = (image_sets.TEACHER_KEY,)
  checkpoint.check_fingerprint(stage_dir, key, write=False, added=added)
  done = finished(workdir, config)
  if done is not None:
    checkpoint.check_fingerprint(stage_dir, key, added=added)  # records what it lacks
    logging.info('recover: finished already (%s); nothing to do.', done.get('measured_at'))
    return image_sets.with_images_digest(workdir, done)
  # Every check passed: only now is the workdir claimed (a fingerprint written by a refused
  # config would refuse its corrected version).
  checkpoint.check_fingerprint(stage_dir, key, added=added)
  return None


def _teacher_top1(model, teacher, spec, images, labels) -> float:
  """The teacher's top-1 (fraction) on uint8 images (N, H, W, C), 256 at a time."""
  logits_fn = jax.jit(lambda t, x: model.apply(t, datasets.normalise(x, spec), train=False))
  predicted = np.concatenate([np.argmax(jax.device_get(logits_fn(teacher, images[i:i + 256])),
                                        -1) for i in range(0, len(images), 256)])
  return float(np.mean(predicted == labels))


def _export(config, workdir: str, spec, images: np.ndarray, **grid) -> np.ndarray:
  """The distilled set (uint8 (num_classes, ipc, H, W, C) class-major) as a TFDS dataset and
  a grid (process 0); returns it flat (N, H, W, C)."""
  flat = images.reshape((-1,) + spec.image_shape)
  if jax.process_index() == 0:
    labels = np.repeat(np.arange(images.shape[0]), config.recover.ipc)
    export.write_tfds(image_sets.distilled_dir(workdir), flat, labels, spec.num_classes)
    export.write_grid(os.path.join(workdir, 'recover', 'grid.png'), images, **grid)
  return flat


def run_direct(config, workdir: str, method, ctx: context.Context, model, teacher) -> dict:
  """A direct method (`Method.synthesize`, e.g. rded): its images, exported like recovered
  ones. Nothing to resume: a killed run starts again (deterministic)."""
  cfg, spec, mesh = config.recover, ctx.spec, ctx.mesh
  stage_dir = os.path.join(workdir, 'recover')
  num_classes = image_sets.recovered_classes(cfg, spec)
  start = time.time()
  images = method.synthesize(config, spec, model=model, teacher=teacher,
                             train=pipeline.load_split(config.dataset, 'train'),
                             num_classes=num_classes, mesh=mesh)  # uint8 (C, ipc, H, W, ch)
  flat = _export(config, workdir, spec, images)
  labels = np.repeat(np.arange(num_classes), cfg.ipc)
  if jax.process_index() == 0:
    uids = np.arange(cfg.ipc)[None, :] * num_classes + np.arange(num_classes)[:, None]
    _write_pngs(os.path.join(stage_dir, 'images'), images, labels.reshape(uids.shape), uids,
                num_classes)
  result = {'stage': 'recover', 'method': cfg.method, 'dataset': spec.name, 'ipc': cfg.ipc,
            'images': int(num_classes * cfg.ipc), 'classes': num_classes,
            'teacher_top1_on_synthetic': _teacher_top1(model, teacher, spec, flat, labels),
            'teacher_top1_unit': 'fraction', 'images_sha256': label_store.images_digest(flat),
            'wall_seconds': time.time() - start, 'devices': mesh.size,
            'outputs': {'tfds': image_sets.distilled_dir(workdir),
                        'png': os.path.join(stage_dir, 'images'),
                        'grid': os.path.join(stage_dir, 'grid.png')}}
  files.write_json(os.path.join(stage_dir, 'result.json'), result)
  return result


@dataclasses.dataclass(frozen=True)
class Recovery:
  """What every round of an optimised method's run shares (`_prepare` makes it).

  teacher: the variables the step reads (with the class statistics where the method needs
  them); plain_teacher: without them (the starting images' scores). labels, uids: the group
  layout (`optimize.group_layout`) of every round; round r holds groups [r * groups_per_round,
  (r + 1) * groups_per_round). step: the step compiled for a round.
  """
  config: ml_collections.ConfigDict
  spec: datasets.DatasetSpec
  mesh: jax.sharding.Mesh
  method: synthesis.Method
  model: Any
  teacher: dict
  plain_teacher: dict
  stage_dir: str
  plan: RoundPlan
  num_classes: int
  labels: np.ndarray
  uids: np.ndarray
  tx: Any
  step: Any
  measure_fn: Any
  init_rng: jax.Array
  step_rng: jax.Array

  @property
  def cfg(self) -> ml_collections.ConfigDict:
    return self.config.recover

  @property
  def images_shape(self) -> tuple[int, ...]:
    return (self.plan.groups_per_round, self.cfg.batch_size) + self.spec.image_shape


@dataclasses.dataclass(frozen=True)
class Round:
  """Round r's groups: real of them hold images (the rest pad); labels, uids on the host and
  placed on the mesh."""
  index: int
  real: int
  labels: np.ndarray
  uids: np.ndarray
  labels_dev: jax.Array
  uids_dev: jax.Array


def run_optimised(config, workdir: str, method, ctx: context.Context, model, teacher) -> dict:
  """An optimised method's run: plan, every unfinished round, then the distilled set."""
  stage_dir = os.path.join(workdir, 'recover')
  rec = _prepare(config, workdir, method, ctx, model, teacher)
  manager = checkpoint.create_manager(os.path.join(stage_dir, 'checkpoints'),
                                      save_interval_steps=rec.cfg.checkpoint_every_steps,
                                      final_step=rec.plan.rounds * rec.cfg.iterations)
  writer = train_lib.create_writer(os.path.join(stage_dir, 'logs'))
  writer.write_hparams(config.to_dict(), metrics=('bn_loss_final', 'teacher_top1_on_synthetic'))
  start_time = time.time()
  rates, start_step = _run_rounds(rec, manager, writer)
  return _finish(rec, workdir, writer, rates, time.time() - start_time, start_step)


def _prepare(config, workdir: str, method, ctx: context.Context, model, teacher) -> Recovery:
  """The run's shared pieces: the teacher (with class statistics where needed), the keys,
  the round plan (from XLA's analysis of the compiled step, before any training; written to
  recover/plan.json) and the group layout."""
  cfg, spec, mesh = config.recover, ctx.spec, ctx.mesh
  stage_dir = os.path.join(workdir, 'recover')
  plain_teacher = teacher
  if method.needs_class_stats:  # per-class BN statistics (edc)
    stats = class_stats.load_or_compute(
        config, teacher, lambda: pipeline.load_split(config.dataset, 'train'),
        ctx.teacher_dir, stage_dir, mesh)
    teacher = dict(teacher, **{class_stats.KEY: jax.device_put(stats,
                                                               batching.replicated(mesh))})
  init_rng, _ = jax.random.split(rngs.stream_key(config.seed, 'recover'))
  # The step key as a global replicated array, made inside jit so that it also exists when
  # the mesh spans several processes (device_put cannot place a host value on devices of
  # other processes).
  step_rng = jax.jit(lambda: jax.random.split(rngs.stream_key(config.seed, 'recover'))[1],
                     out_shardings=batching.replicated(mesh))()
  num_classes = image_sets.recovered_classes(cfg, spec)
  plan_path = os.path.join(stage_dir, 'plan.json')
  stored = files.read_json(plan_path)['groups_per_round'] if files.exists(plan_path) else 0
  compile_at, measure_at, tx = _step_factory(config, spec, mesh, teacher, step_rng)
  round_plan = plan_rounds(cfg, real_group_count(cfg, num_classes), mesh.size, compile_at,
                           memory_budget(cfg), stored, measure_at)
  host = host_plan(cfg, round_plan, spec, num_classes)
  files.write_json(plan_path, round_plan.to_dict() | {'host': host.to_dict()})
  logging.info('recover plan: %s', describe_plan(round_plan, cfg))
  logging.info('recover plan: %s', host.describe())
  if warning := memory.check_host_fits(host, 'recover'):
    logging.warning('%s', warning)
  logging.info('recover plan: %s', projection(round_plan, cfg, jax.devices()[0].device_kind))
  labels, uids, _ = optimize.group_layout(num_classes, cfg.ipc, cfg.batch_size,
                                          round_plan.groups_per_round,
                                          by_class=cfg.group_by == 'class')
  return Recovery(config, spec, mesh, method, model, teacher, plain_teacher, stage_dir,
                  round_plan, num_classes, labels, uids, tx,
                  compile_at(round_plan.groups_per_round),
                  create_measure_fn(config, spec, mesh, method, model), init_rng, step_rng)


def _run_rounds(rec: Recovery, manager, writer) -> tuple[list[float], int]:
  """Runs every unfinished round, the checkpoint's round from its step; returns (each run
  round's image-iterations per second, the Orbax step resumed from (0: none))."""
  cfg, per_round = rec.cfg, rec.plan.groups_per_round
  # The checkpoint holds the round in progress; its Orbax step is round * iterations + step.
  state, saved_step = train_lib.restore_or_init(
      manager, optimize.abstract_state(rec.tx, rec.images_shape, rec.mesh), lambda: None)
  resumed = None
  if state is not None:
    resumed = (saved_step - int(state['step'])) // cfg.iterations, int(state['step'])
  # init 'scored' or 'coreset': the starting images, chosen once for the whole set when a
  # round first needs them.
  chosen = functools.cache(lambda: _chosen_start(rec))
  sharded = batching.data_sharding(rec.mesh)
  real_groups = rec.plan.groups
  rates, start_step = [], 0
  for r in range(rec.plan.rounds):
    if _round_done(rec.stage_dir, r):
      continue
    groups = slice(r * per_round, (r + 1) * per_round)
    this = Round(r, min(per_round, max(0, real_groups - r * per_round)), rec.labels[groups],
                 rec.uids[groups], jax.device_put(rec.labels[groups], sharded),
                 jax.device_put(rec.uids[groups], sharded))
    if resumed is not None and resumed[0] == r:
      round_step, start_step = resumed[1], saved_step
    else:
      state, round_step = _initial_state(rec, this, chosen), 0
    rates.append(_run_round(rec, this, state, round_step, manager, writer))
  return rates, start_step


def _chosen_start(rec: Recovery) -> np.ndarray:
  """init 'scored''s or 'coreset''s starting images of the whole set (num_classes, ipc, H, W,
  C), normalised float32 on the host. The coreset's are `image_sets.coreset`'s, the
  baseline's own (config.teacher's features, its k-means draw), in its centroid order."""
  if rec.cfg.init == 'scored':
    return selection.scored_images(
        rec.config, rec.model, rec.plain_teacher,
        pipeline.load_split(rec.config.dataset, 'train'), rec.num_classes, rec.mesh)
  images, _ = image_sets.coreset(rec.config, os.path.dirname(rec.stage_dir), rec.cfg.ipc)
  return np.asarray(datasets.normalise(images, rec.spec)).reshape(
      (rec.num_classes, rec.cfg.ipc) + tuple(rec.spec.image_shape))


def _initial_state(rec: Recovery, this: Round, chosen) -> dict:
  """The round's starting images (recover.init) in a fresh optimiser state, sharded.
  chosen(): init 'scored''s or 'coreset''s images of the whole set (`_chosen_start`)."""
  cfg = rec.cfg
  if cfg.init in ('scored', 'coreset'):  # (class, ipc index) of each image
    images = chosen()[this.labels, (this.uids // rec.num_classes) % cfg.ipc]
  else:
    train = pipeline.load_split(rec.config.dataset, 'train') if cfg.init == 'real' else None
    # Real images take the host uids (their ipc index); noise is made where it lives.
    images = optimize.initial_images(cfg, rec.spec, this.labels,
                                     this.uids if train else this.uids_dev, rec.init_rng,
                                     rec.num_classes, train)
  shardings = optimize.state_shardings(rec.tx, rec.images_shape, rec.mesh)
  return jax.jit(lambda x: optimize.create_state(x, rec.tx), out_shardings=shardings)(
      jax.device_put(images, batching.data_sharding(rec.mesh)))


def _measured_sums(rec: Recovery, images, this: Round) -> dict:
  """Sums over the round's real groups: BN term, un-augmented BN loss, hits."""
  bn, plain, correct = jax.device_get(rec.measure_fn(images, this.labels_dev, this.uids_dev,
                                                     rec.teacher))
  real = this.real
  return {'bn_loss': float(bn[:real].sum()), 'bn_loss_unaugmented': float(plain[:real].sum()),
          'teacher_correct': float(correct[:real].sum())}


def _run_round(rec: Recovery, this: Round, state, round_step: int, manager, writer) -> float:
  """Round `this` from `round_step` to its end, measured at start and end; writes its PNGs,
  images and summary (last: the mark of a finished round). Returns its image-iterations
  per second."""
  cfg, r, rounds = rec.cfg, this.index, rec.plan.rounds
  initial_path = _round_path(rec.stage_dir, r, '.initial.json')
  if round_step == 0 or not files.exists(initial_path):
    # Not read back from the file: only process 0 writes it.
    initial = _measured_sums(rec, state['images'], this)
    files.write_json(initial_path, initial)
  else:
    initial = files.read_json(initial_path)
  # The step's per-layer BN terms (bn_loss_per_layer) are written as bn/<layer>.
  per_layer = {'bn_loss_per_layer': tuple(
      f'bn/{name}' for name in bn_layer_names(rec.model, rec.teacher, rec.spec.image_shape))}
  loop = train_lib.Loop(
      name=f'recover round {r + 1}/{rounds}', total_steps=(r + 1) * cfg.iterations,
      log_every=cfg.log_every_steps, manager=manager, writer=writer,
      examples_per_step=this.real * cfg.batch_size,
      throughput_name='image_iterations_per_second', vector_names=per_layer,
      show=('loss', 'bn_loss', 'ce'), schedule=lambda s: adam_lr(cfg, s),
      knobs=f'recover.lr (now {cfg.lr}) or recover.r_bn (now {cfg.r_bn})', per_device=True)
  state, done = train_lib.run_loop(
      loop, state, r * cfg.iterations + round_step,
      lambda state, _: rec.step(state, this.labels_dev, this.uids_dev, rec.step_rng,
                                rec.teacher))
  final = _measured_sums(rec, state['images'], this)
  images = multihost.to_host(state['images'])[:this.real]  # sharded over processes
  if jax.process_index() == 0:
    _write_pngs(os.path.join(rec.stage_dir, 'images'), datasets.denormalise(images, rec.spec),
                this.labels[:this.real], this.uids[:this.real], rec.num_classes)
  _write_round(rec.stage_dir, r, images.astype(np.float32), {
      'round': r, 'first_group': r * rec.plan.groups_per_round, 'real_groups': this.real,
      'initial': initial, 'final': final,
      'image_iterations_per_second': done.examples_per_second})
  multihost.sync(f'recover round {r} written')
  logging.info('recover: round %d/%d done (%d groups)', r + 1, rounds, this.real)
  return done.examples_per_second


def _finish(rec: Recovery, workdir: str, writer, rates: list[float], wall: float,
            start_step: int) -> dict:
  """All rounds: the checks on the measures averaged over every real group, then the
  distilled set exported and recover/result.json."""
  cfg, spec, stage_dir = rec.cfg, rec.spec, rec.stage_dir
  rounds, real_groups = rec.plan.rounds, rec.plan.groups
  summaries = [files.read_json(_round_path(stage_dir, r, '.json')) for r in range(rounds)]
  total = lambda when, key: sum(s[when][key] for s in summaries)
  mean = lambda when, key: total(when, key) / real_groups
  bn_initial, bn_final = mean('initial', 'bn_loss'), mean('final', 'bn_loss')
  teacher_top1 = total('final', 'teacher_correct') / (real_groups * cfg.batch_size)
  check_recovery(bn_initial, bn_final, teacher_top1, cfg)
  # uint8 a round at a time: the float images of every round (30 GB for ImageNet-1K IPC 50)
  # are never in memory together.
  images = np.concatenate([
      datasets.denormalise(files.load_npy(_round_path(stage_dir, r, '.npy')), spec)
      for r in range(rounds)])
  images = optimize.to_class_major(images, rec.num_classes, cfg.ipc,
                                   by_class=cfg.group_by == 'class')
  images_flat = _export(rec.config, workdir, spec, images,
                        class_names=datasets.class_names(rec.config.dataset))
  writer.write_scalars(rounds * cfg.iterations, {'bn_loss_final': bn_final,
                                                 'teacher_top1_on_synthetic': teacher_top1})
  writer.flush()
  result = {
      'stage': 'recover', 'method': cfg.method, 'dataset': spec.name, 'ipc': cfg.ipc,
      'iterations': cfg.iterations, 'group_size': cfg.batch_size, 'groups': real_groups,
      'images': real_groups * cfg.batch_size, 'classes': rec.num_classes,
      'rounds': rounds, 'groups_per_round': rec.plan.groups_per_round,
      'peak_bytes_per_device_planned': rec.plan.report.peak_bytes,
      'bn_loss_initial': bn_initial, 'bn_loss_final': bn_final,
      'bn_loss_unaugmented_initial': mean('initial', 'bn_loss_unaugmented'),
      'bn_loss_unaugmented_final': mean('final', 'bn_loss_unaugmented'),
      'bn_loss_note': ('sum over BN layers of w_l (|mean - running mean| + |var - running var|)'
                       ', mean over groups; bn_loss_*: the objective\'s BN term on one fixed '
                       'draw of the training augmentation, the same views at start and end; '
                       'bn_loss_unaugmented_*: on the images as they are'),
      'teacher_top1_on_synthetic': teacher_top1, 'teacher_top1_unit': 'fraction',
      'images_sha256': label_store.images_digest(images_flat),
      'image_iterations_per_second': float(np.mean(rates)) if rates else None,
      'wall_seconds': wall, 'resumed_from_step': start_step, 'devices': rec.mesh.size,
      'outputs': {'tfds': image_sets.distilled_dir(workdir),
                  'png': os.path.join(stage_dir, 'images'),
                  'grid': os.path.join(stage_dir, 'grid.png'),
                  'rounds': os.path.join(stage_dir, 'rounds')},
  }
  files.write_json(os.path.join(stage_dir, 'result.json'), result)
  logging.info('recover: BN loss %.4g -> %.4g (un-augmented %.4g -> %.4g), teacher top-1 '
               'on synthetic %.4f', bn_initial, bn_final,
               result['bn_loss_unaugmented_initial'], result['bn_loss_unaugmented_final'],
               teacher_top1)
  return result
