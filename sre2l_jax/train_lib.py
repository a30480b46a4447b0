"""Pieces shared by every stage that trains something: optimisers, the train state, the
evaluation step, writers, and `run_loop`, the one training loop (restore-or-init, periodic
log and save, the divergence guard) that squeeze, recover, evaluate and continual all use.
"""

import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state

from sre2l_jax import checkpoint
from sre2l_jax import metric_writers
from sre2l_jax import multihost
from sre2l_jax.data import augment
from sre2l_jax.data import batching
from sre2l_jax.data import datasets


class TrainState(train_state.TrainState):
  batch_stats: Any


def warmup_cosine(lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1), 0.0)


def student_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """The students' learning rate (`evaluate.lr`, `evaluate.lr_zeta`): cosine from the peak,
  lr(t) = lr (1 + cos(pi t / (zeta T))) / 2 over T = `total_steps`; zeta 1 decays to 0 at
  the last step (SRe2L), EDC's smoothed schedule zeta 2 only to half the peak."""
  zeta = cfg.lr_zeta
  if zeta == 1.0:
    return warmup_cosine(cfg.lr, total_steps)
  return optax.cosine_decay_schedule(cfg.lr, max(int(round(zeta * total_steps)), 1))


class ParamEmaState(NamedTuple):
  params_ema: Any


def param_ema(decay: float) -> optax.GradientTransformation:
  """Keeps an exponential moving average of the parameters in the optimiser state: chained
  last, after each update ema <- decay * ema + (1 - decay) * new params (from the initial
  parameters, no bias correction: EDC's student EMA). The updates pass unchanged; read the
  average with `eval_params`."""

  def init(params):
    return ParamEmaState(jax.tree_util.tree_map(jnp.asarray, params))

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    return updates, ParamEmaState(jax.tree_util.tree_map(
        lambda e, p: decay * e + (1.0 - decay) * p, state.params_ema, new))

  return optax.GradientTransformation(init, update)


def eval_params(state: TrainState):
  """The parameters to evaluate: their moving average when the optimiser keeps one
  (`param_ema`), else the parameters."""
  found = optax.tree_utils.tree_get(state.opt_state, 'params_ema')
  return state.params if found is None else found


def decay_mask(params):
  """True for weights that get weight decay: kernels, not biases or BatchNorm parameters."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule):
  """SGD with momentum (teacher, like the reference) or AdamW (students), keeping a moving
  average of the parameters when `cfg.ema_decay` > 0 (`param_ema`)."""
  tx = _base_optimizer(cfg, schedule)
  ema = cfg.get('ema_decay', 0.0)  # squeeze's section has no moving average
  return optax.chain(tx, param_ema(ema)) if ema else tx


def _base_optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule):
  if cfg.optimizer == 'sgd':
    # Coupled (PyTorch-style) weight decay; on kernels only unless decay_all is set (the
    # reference's SGD decays every parameter, BatchNorm scales included).
    mask = None if cfg.decay_all else decay_mask
    return optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask=mask),
                       optax.sgd(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov))
  if cfg.optimizer == 'adamw':
    return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=decay_mask)
  raise ValueError(f'Unknown optimizer {cfg.optimizer!r}; valid: sgd, adamw.')


def create_train_state(model, tx, image_shape, rng, mesh) -> TrainState:
  """Initialises parameters directly replicated on the mesh."""
  return jax.jit(_train_state_init(model, tx, image_shape),
                 out_shardings=batching.replicated(mesh))(rng)


def abstract_train_state(model, tx, image_shape, mesh) -> TrainState:
  """The `create_train_state` state as shardings-annotated shapes (a restore target)."""
  shapes = jax.eval_shape(_train_state_init(model, tx, image_shape), jax.random.key(0))
  return with_sharding(shapes, batching.replicated(mesh))


def _train_state_init(model, tx, image_shape):
  def init(rng):
    variables = model.init(rng, jnp.zeros((1,) + tuple(image_shape)), train=False)
    return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                             batch_stats=variables.get('batch_stats', {}))  # {}: no BN
  return init


def with_sharding(shapes, shardings):
  """`jax.ShapeDtypeStruct`s of `shapes` carrying `shardings` (one, or a matching tree)."""
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), shapes)


def augment_batch(rng, images, spec: datasets.DatasetSpec):
  """uint8 batch -> normalised, augmented float batch; one key per image."""
  x = datasets.normalise(images, spec)
  keys = jax.random.split(rng, x.shape[0])
  return jax.vmap(lambda k, im: augment.train_augment(k, im, spec.train_augment, spec.pad))(
      keys, x)


def cross_entropy(logits, labels, num_classes: int, smoothing: float = 0.0):
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
  return optax.softmax_cross_entropy(logits, targets).mean()


def mask_logits(logits, class_mask):
  """Logits (..., C) with the classes outside `class_mask` (bool (C,)) set to -inf, so a
  softmax gives them exactly zero probability; `class_mask=None` keeps every class."""
  return logits if class_mask is None else jnp.where(class_mask, logits, -jnp.inf)


def create_eval_step(model, spec, mesh):
  """Jitted (variables, batch, class_mask=None) -> (correct, count) on normalised,
  un-augmented images, predicting among the classes of `class_mask` (None: all)."""
  def eval_step(variables, batch, class_mask=None):
    logits = model.apply(variables, datasets.normalise(batch['image'], spec), train=False)
    correct = (jnp.argmax(mask_logits(logits, class_mask), -1) == batch['label'])
    return (correct * batch['mask']).sum(), batch['mask'].sum()
  replicated = batching.replicated(mesh)
  return jax.jit(eval_step, in_shardings=(replicated, batching.data_sharding(mesh),
                                          replicated))


def top1(eval_step, variables, split, batch_size: int, mesh, class_mask=None) -> float:
  """Top-1 accuracy (fraction in [0, 1]) of `variables` on a whole split."""
  correct, count = 0.0, 0.0
  for batch in split.eval_batches(batch_size, batching.data_sharding(mesh)):
    c, n = eval_step(variables, batch, class_mask)
    correct, count = correct + c, count + n
  return float(correct) / max(float(count), 1.0)


def create_writer(logdir):
  """A clu `MetricWriter`-compatible writer of TensorBoard events and `metrics.jsonl` in
  `logdir` on process 0 (no TensorFlow; see `metric_writers`); nothing on the others."""
  return metric_writers.create_writer(logdir)


def create_progress(name: str, total_steps: int, start_step: int = 0, *, lines: int = 4,
                    show=('loss', 'accuracy')) -> metric_writers.Progress:
  """The console progress line of a loop (step/total, `show` metrics, steps/s, ETA), about
  `lines` times over its steps."""
  return metric_writers.Progress(name, total_steps, start_step, lines=lines, show=show)


class Throughput:
  """Counts examples per second of wall time, excluding the first (compiling) call."""

  def __init__(self):
    self.start, self.examples = None, 0

  def tick(self, examples: int):
    if self.start is None:
      self.start = time.perf_counter()
    else:
      self.examples += examples

  def rate(self) -> float:
    if self.start is None or self.examples == 0:
      return 0.0
    return self.examples / (time.perf_counter() - self.start)


# ----------------------------------------------------------------------------- the loop


class DivergedError(FloatingPointError):
  """A training loop's loss, metrics or state stopped being finite."""


@jax.jit
def _finite(tree):
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def all_finite(tree) -> bool:
  """Whether every floating-point array of `tree` (a state, variables) is finite; one small
  reduction on the devices, one scalar fetched."""
  arrays = [x for x in jax.tree_util.tree_leaves(tree) if hasattr(x, 'dtype')]
  return bool(jax.device_get(_finite(arrays)))


@dataclasses.dataclass
class Loop:
  """What one training loop needs besides its step.

  name: the stage (and run) it belongs to, e.g. 'squeeze' or 'evaluate distilled seed 0'.
  total_steps: the loop runs steps start+1 .. total_steps (1-based).
  log_every: metrics are fetched, checked and written every this many steps (and last).
  manager: saves the state when its policy says so (`checkpoint.create_manager`), or None.
  writer: a clu metric writer (`create_writer`), or None (nothing written; the progress
    line is printed either way).
  examples_per_step: for the throughput scalar `<throughput_name>`.
  knobs: what to lower when the loop diverges, e.g. 'squeeze.lr (now 0.1)'.
  rerun: how to run again with the lowered knob (a stage that fingerprints it: a new
    --workdir).
  schedule: the learning-rate schedule, written as 'lr' when given.
  prefix: prepended to the metric names in the writer.
  vector_names: names of the entries of vector metrics, e.g. {'bn_loss_per_layer':
    ('bn/bn0', 'bn/bn1')}: written under those names (others as <name>_00, <name>_01, ...).
  show: the metrics of the console progress line (those the step returns), besides
    step/total, steps/s and the ETA.
  progress_lines: about how many progress lines the loop prints (a fraction of its steps
    apart; at least one every 10 minutes); 0: none (e.g. many short loops).
  per_device: the step's metrics have one row per device, each its own share's (recover,
    whose step has no collective): gathered and averaged over devices when fetched.
  """
  name: str
  total_steps: int
  log_every: int
  manager: ocp.CheckpointManager | None = None
  writer: Any = None
  examples_per_step: int = 0
  throughput_name: str = 'examples_per_second'
  knobs: str = 'the learning rate'
  rerun: str = 're-run with a new --workdir'
  schedule: Callable | None = None
  prefix: str = ''
  vector_names: dict = dataclasses.field(default_factory=dict)
  show: tuple = ('loss', 'accuracy')
  progress_lines: int = 4
  per_device: bool = False


@dataclasses.dataclass
class LoopResult:
  """What a finished loop measured: per-metric means over every step it ran, throughput."""
  means: dict
  examples_per_second: float
  wall_seconds: float
  resumed_from_step: int


class CheckpointError(RuntimeError):
  """No checkpoint of a stage's folder can be read back."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
  """The first line of an error's text (TensorStore and Orbax errors span dozens)."""
  text = str(error).strip().splitlines()
  line = text[0].split(' See full TensorStore details')[0] if text else type(error).__name__
  return line if len(line) <= limit else line[:limit] + '...'


def restore_or_init(manager: ocp.CheckpointManager | None, abstract_state, init_fn):
  """(state, start step): the manager's latest state restored straight into the shardings
  of `abstract_state` (nothing else is allocated), or `init_fn()` and 0 when there is none.

  A checkpoint that cannot be read (a truncated or damaged file, a kill during a save that
  left a partial step) or holds non-finite values is deleted with a warning and the one
  before it is tried (managers keep two); if none is readable, `CheckpointError` names the
  folder to delete.
  """
  steps = sorted(manager.all_steps(), reverse=True) if manager is not None else []
  if not steps:
    return init_fn(), 0
  damaged = []
  for step in steps:
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
      problem = None if all_finite(state) else 'it holds non-finite values'
    except Exception as e:  # pylint: disable=broad-except  # Orbax/TensorStore raise many
      problem = one_line(e)
    if problem is None:
      for bad, why in damaged:
        logging.warning('checkpoint step %d in %s is unreadable (%s): deleted; resuming '
                        'from step %d instead.', bad, manager.directory, why, step)
        manager.delete(bad)
      logging.info('resumed from step %d (%s)', step, manager.directory)
      return state, step
    damaged.append((step, problem))
  raise CheckpointError(
      f'No checkpoint in {manager.directory} can be read (steps '
      f'{", ".join(str(s) for s, _ in damaged)}: {damaged[0][1]}). Delete '
      f'{manager.directory} to run this stage again from its start.')


def _scalars(history: list[dict], prefix: str, vector_names: dict | None = None) -> dict:
  """Host metric history -> {name: mean}; the entries of a vector metric take their names
  from `vector_names[key]` when it names them all, else it stays one array (a stacked
  step's, one entry per student: `metric_writers.StudentWriters`)."""
  out = {}
  for key in history[0]:
    if key == 'finite':
      continue
    mean = np.mean([np.asarray(m[key], np.float64) for m in history], axis=0)
    names = (vector_names or {}).get(key)
    if np.ndim(mean) and names is not None and len(names) == np.size(mean):
      out |= {f'{prefix}{n}': float(v) for n, v in zip(names, np.ravel(mean))}
    elif np.ndim(mean):  # per member of a stack: the writer splits it
      out[f'{prefix}{key}'] = mean
    else:
      out[f'{prefix}{key}'] = float(mean)
  return out


def _all_finite(history: list[dict]) -> bool:
  for metrics in history:
    for key, value in metrics.items():
      value = np.asarray(value)
      if key == 'finite' and not value.all():
        return False
      if value.dtype.kind == 'f' and not np.isfinite(value).all():
        return False
  return True


def fetch_metrics(pending: list, per_device: bool) -> list[dict]:
  """The pending metrics on the host; per-device rows (`Loop.per_device`) gathered from
  every process and averaged, 'finite' true only if it is on every device."""
  if not per_device:
    return jax.device_get(pending)
  return [{k: (v.all() if k == 'finite' else v.astype(np.float64).mean(axis=0))
           for k, v in rows.items()} for rows in multihost.tree_to_host(pending)]


def run_loop(loop: Loop, state, start_step: int, step_fn: Callable,
             after_step: Callable | None = None):
  """Runs `state, metrics = step_fn(state, step)` for step = start_step+1 .. total_steps.

  Every `loop.log_every` steps and before every save the metrics are fetched (one transfer)
  and checked: a non-finite loss or metric (or a False 'finite' metric, which a step sets
  for its own state) raises `DivergedError` naming `loop.knobs` and the last good
  checkpoint, and nothing non-finite is ever saved. `after_step(state, step)` runs after each
  step (e.g. a per-epoch evaluation). The writer is flushed and pending saves finished on
  the way out, also on error. Returns (state, LoopResult).
  """
  progress = create_progress(loop.name, loop.total_steps, start_step,
                             lines=loop.progress_lines, show=loop.show)
  throughput = Throughput()
  start_time, pending = time.time(), []
  sums, count = {}, 0
  last_saved = start_step
  try:
    for step in range(start_step + 1, loop.total_steps + 1):
      state, metrics = step_fn(state, step)
      pending.append(metrics)
      if step == start_step + 1:
        jax.block_until_ready(state)  # the first step compiles: not counted in throughput
        progress.start(step)
      throughput.tick(loop.examples_per_step)
      is_log = step % loop.log_every == 0 or step == loop.total_steps
      is_save = loop.manager is not None and loop.manager.should_save(step)
      if is_log or is_save:
        host = fetch_metrics(pending, loop.per_device)
        pending = []
        if not _all_finite(host):
          _diverged(loop, step, last_saved)
        scalars = _scalars(host, loop.prefix, loop.vector_names)
        plain = _scalars(host, '', loop.vector_names)
        for key, value in plain.items():
          sums[key] = sums.get(key, 0.0) + value * len(host)
        count += len(host)
        if loop.schedule is not None:
          scalars['lr'] = float(loop.schedule(step))
        scalars[loop.throughput_name] = throughput.rate()
        if loop.writer is not None:
          loop.writer.write_scalars(step, scalars)
        progress.update(step, plain)
      if is_save:
        if not all_finite(state):  # e.g. a parameter overflowed while the loss did not yet
          _diverged(loop, step, last_saved)
        loop.manager.save(step, args=ocp.args.StandardSave(state))
        last_saved = step
        if loop.manager.reached_preemption(step):  # every process saved this same step
          loop.manager.wait_until_finished()
          raise checkpoint.PreemptedError(
              f'{loop.name}: stopped by a preemption notice (SIGTERM) after saving step '
              f'{step} in {loop.manager.directory}; the same command resumes from it.')
      if after_step is not None:
        after_step(state, step)
  except BaseException:
    # Finish (or clean up) a pending async save and stop the writer's and the manager's
    # threads now: left to interpreter shutdown they bury the error under hundreds of lines
    # and can leave a *.orbax-checkpoint-tmp folder.
    if loop.manager is not None:
      loop.manager.close()
    if loop.writer is not None:
      loop.writer.close()
    raise
  if loop.manager is not None:
    loop.manager.wait_until_finished()
  if loop.writer is not None:
    loop.writer.flush()
  means = {k: v / count for k, v in sums.items()} if count else {}
  return state, LoopResult(means, throughput.rate(), time.time() - start_time, start_step)


def _diverged(loop: Loop, step: int, last_saved: int):
  if loop.manager is not None:
    loop.manager.wait_until_finished()
    kept = (f'The last good checkpoint (step {last_saved}) is kept in '
            f'{loop.manager.directory}.' if last_saved else 'No checkpoint had been saved yet.')
  else:
    kept = ''
  raise DivergedError(
      f'{loop.name} diverged (a loss, metric or the state stopped being finite) by step '
      f'{step}. Lower {loop.knobs} and {loop.rerun}. {kept}'.strip())


class NotConvergedError(RuntimeError):
  """Recover ended without doing what it is for (BN statistics matched, images recognised)."""
