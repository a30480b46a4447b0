"""Metric writers without TensorFlow, and the console progress line.

`create_writer(logdir)` returns a writer with clu's `MetricWriter` methods (write_scalars,
write_hparams, write_images, write_texts, write_histograms, flush, close) that writes, on
process 0 only:
  logdir/events.out.tfevents.*  TensorBoard event files (protos from tensorboardX, framed
                                here, so nothing imports TensorFlow or torch);
  logdir/metrics.jsonl          one JSON object per write_scalars call:
                                {"step": int, "<name>": float, ...} (plots read this; a
                                resumed run appends, so a step may appear twice: the later
                                line wins, see `read_metrics`);
  logdir/hparams.json           the last write_hparams dict (a stage's resolved config; the
                                event files also name the stage's final metrics beside it).
Nothing goes to the console: `Progress` prints the progress lines.

`backend='clu'` (or main's --metric_writer=clu) writes the event files with clu's TensorFlow
writer instead (`pip install -e .[tensorflow]`); metrics.jsonl is written either way.
Local files are appended to; remote ones (gs://) are rewritten whole on flush (object stores
cannot append), at most every `REMOTE_FLUSH_SECONDS` between explicit flushes.
"""

import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from etils import epath

BACKENDS = ('tensorboardx', 'clu')
_backend = 'tensorboardx'  # set by main's --metric_writer
REMOTE_FLUSH_SECONDS = 60.0


def set_default_backend(backend: str) -> None:
  """The event-file backend of later `create_writer` calls: 'tensorboardx' or 'clu'."""
  global _backend
  if backend not in BACKENDS:
    raise ValueError(f'--metric_writer={backend!r}; valid: {", ".join(BACKENDS)}.')
  _backend = backend


def create_writer(logdir, backend: str | None = None):
  """A clu-compatible writer of TensorBoard events + metrics.jsonl in `logdir` on process 0;
  one that writes nothing on the other processes."""
  if jax.process_index() > 0:
    return MultiWriter([])
  backend = backend or _backend
  if backend not in BACKENDS:
    raise ValueError(f'metric writer backend {backend!r}; valid: {", ".join(BACKENDS)}.')
  logdir = epath.Path(logdir)
  logdir.mkdir(parents=True, exist_ok=True)
  events = EventWriter(logdir) if backend == 'tensorboardx' else _clu_writer(logdir)
  return MultiWriter([JsonlWriter(logdir), events])


def flatten(tree: Mapping, prefix: str = '') -> dict:
  """A nested dict (a config) as {'a.b': value}; lists and None as text (TensorBoard's
  hparams take numbers, booleans and strings only)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, Mapping):
      out |= flatten(value, name + '.')
    elif isinstance(value, (bool, int, float, str)):
      out[name] = value
    elif isinstance(value, (np.integer, np.floating, np.bool_)):
      out[name] = value.item()
    else:
      out[name] = str(value)
  return out


def hparams(config, **extra) -> dict:
  """A resolved config (a ConfigDict) flattened to {'section.key': scalar} (`flatten`), plus
  `extra` (TensorBoard's hparams take scalars only)."""
  return {**flatten(config.to_dict()), **extra}


def _float(value) -> float:
  return float(np.asarray(value).reshape(()))


# ----------------------------------------------------------------------------- files


def is_remote(path: epath.Path) -> bool:
  return '://' in os.fspath(path)


class AppendFile:
  """A file that grows by appending: appended to where local; elsewhere (gs://) its whole
  content is kept in memory and uploaded on `flush` (it starts from what is there, so a
  resumed run adds to it)."""

  def __init__(self, path: epath.Path):
    self.path = path
    self.remote = is_remote(path)
    if self.remote:
      self.content = bytearray(path.read_bytes() if path.exists() else b'')
      self.dirty, self.uploaded_at = False, time.time()
    else:
      self.file = open(path, 'ab')  # pylint: disable=consider-using-with

  def write(self, data: bytes) -> None:
    if self.remote:
      self.content += data
      self.dirty = True
      if time.time() - self.uploaded_at > REMOTE_FLUSH_SECONDS:
        self.flush()
    else:
      self.file.write(data)

  def flush(self) -> None:
    if self.remote:
      if self.dirty:
        self.path.write_bytes(bytes(self.content))
        self.dirty, self.uploaded_at = False, time.time()
    else:
      self.file.flush()

  def close(self) -> None:
    self.flush()
    if not self.remote:
      self.file.close()


# ----------------------------------------------------------------------------- writers


class MultiWriter:
  """Every call goes to each writer (none: a writer that writes nothing)."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars as they are; a vector metric (no names given, `train_lib.Loop.vector_names`)
    as <name>_00, <name>_01, ... (files and TensorBoard hold scalars only)."""
    named = {}
    for key, value in scalars.items():
      if np.ndim(value):
        named |= {f'{key}_{i:02d}': float(v) for i, v in enumerate(np.ravel(value))}
      else:
        named[key] = value
    for writer in self.writers:
      writer.write_scalars(step, named)

  def __getattr__(self, name):
    if not name.startswith('write_') and name not in ('flush', 'close'):
      raise AttributeError(name)

    def call(*args, **kwargs):
      for writer in self.writers:
        getattr(writer, name)(*args, **kwargs)
    return call


class JsonlWriter:
  """metrics.jsonl (scalars) and hparams.json; other kinds of data are not written here."""

  def __init__(self, logdir: epath.Path):
    self.logdir = logdir
    self.file = AppendFile(logdir / 'metrics.jsonl')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    record = {'step': int(step)} | {k: _float(v) for k, v in scalars.items()}
    self.file.write((json.dumps(record) + '\n').encode())

  def write_hparams(self, hparams: Mapping[str, Any], metrics: tuple[str, ...] = ()) -> None:
    del metrics  # the scalars are in metrics.jsonl
    text = json.dumps(hparams, indent=2, sort_keys=True, default=str)
    (self.logdir / 'hparams.json').write_text(text + '\n')

  def write_images(self, step, images) -> None:
    del step, images

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def flush(self) -> None:
    self.file.flush()

  def close(self) -> None:
    self.file.close()


class StudentWriters:
  """One metric writer per stacked student behind the writer interface `train_lib.run_loop`
  uses: a metric with a leading student axis (shape (M,), e.g. the loss of a stacked step)
  goes entry i to student i's writer under its own name; a scalar (lr, throughput) goes to
  every writer. `writers[i].write_scalars` writes to one student alone."""

  def __init__(self, writers, step_offset: int = 0):
    self.writers = list(writers)
    self.step_offset = step_offset  # added to every step (continual: earlier class steps)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    step += self.step_offset
    shared = {k: v for k, v in scalars.items() if not np.ndim(v)}
    for i, writer in enumerate(self.writers):
      own = {k: float(np.asarray(v)[i]) for k, v in scalars.items() if np.ndim(v)}
      writer.write_scalars(step, {**shared, **own})

  def __getattr__(self, name):
    """write_hparams, write_texts, flush, close, ...: every writer's, in turn."""
    def call(*args, **kwargs):
      for writer in self.writers:
        getattr(writer, name)(*args, **kwargs)
    return call


def _tensorboardx():
  """tensorboardX's summary and event protos, without torch: its package imports its
  writer module, which imports torch whenever torch is installed (seconds, and a torch in
  every stage); a None in sys.modules makes that optional import fail as if absent."""
  if 'tensorboardX.summary' not in sys.modules and 'torch' not in sys.modules:
    sys.modules['torch'] = None
    try:
      import tensorboardX.summary  # pylint: disable=g-import-not-at-top,unused-import
    finally:
      del sys.modules['torch']
  from tensorboardX import summary  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  return summary, event_pb2, record_writer.masked_crc32c


class EventWriter:
  """TensorBoard event file (`events.out.tfevents.<time>.<host>.<pid>`) in `logdir`: the
  record framing of TFRecord (length, masked CRC-32C of it, data, masked CRC-32C of data)
  around tensorboardX's Event protos. TensorBoard reads every events file of a folder, so a
  resumed run writes a new file beside the old ones."""

  def __init__(self, logdir: epath.Path):
    self.summary, self.event_pb2, self.crc = _tensorboardx()
    name = f'events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}'
    self.file = AppendFile(logdir / name)
    self._write(self.event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def _write(self, event) -> None:
    data = event.SerializeToString()
    header = struct.pack('<Q', len(data))
    self.file.write(header + struct.pack('<I', self.crc(header)) + data +
                    struct.pack('<I', self.crc(data)))

  def _summary(self, step: int, summaries) -> None:
    for s in summaries:
      self._write(self.event_pb2.Event(wall_time=time.time(), step=int(step), summary=s))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._summary(step, [self.summary.scalar(k, _float(v)) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """images: name -> (H, W, C) or (N, H, W, C), uint8 or float in [0, 1]."""
    out = []
    for key, value in images.items():
      value = np.asarray(value)
      batch = value if value.ndim == 4 else value[None]
      for i, image in enumerate(batch):
        tag = key if len(batch) == 1 else f'{key}/{i}'
        out.append(self.summary.image(tag, image, dataformats='HWC'))
    self._summary(step, out)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    self._summary(step, [self.summary.text(k, str(v)) for k, v in texts.items()])

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets=None) -> None:
    self._summary(step, [self.summary.histogram(k, np.asarray(v, np.float64).ravel(),
                                                num_buckets or 'tensorflow')
                         for k, v in arrays.items()])

  def write_hparams(self, hparams: Mapping[str, Any], metrics: tuple[str, ...] = ()) -> None:
    """`hparams` (nested: a config dict) in TensorBoard's HParams tab, keys 'a.b', beside
    the scalar tags `metrics` (e.g. 'test_top1'): the tab shows each one's last value per
    run, so runs compare by them. Without them the tab lists the runs but no metric."""
    self._summary(0, self.summary.hparams(flatten(hparams), dict.fromkeys(metrics, 0.0)))

  def flush(self) -> None:
    self.file.flush()

  def close(self) -> None:
    self.file.close()


def _clu_writer(logdir: epath.Path):
  """clu's TensorFlow summary writer (the `tensorflow` extra), hparams flattened."""
  try:
    from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'--metric_writer=clu needs clu and TensorFlow: pip install -e '
                      f'".[tensorflow]" ({e}).') from e

  class Writer(summary_writer.SummaryWriter):
    def write_hparams(self, hparams, metrics=()):
      del metrics  # TensorFlow's HParams summary takes every scalar of the run as a metric
      super().write_hparams(flatten(hparams))
  return Writer(os.fspath(logdir))


# ----------------------------------------------------------------------------- console


def format_seconds(seconds: float) -> str:
  """3725 -> '1:02:05'; 65 -> '1:05'."""
  if not math.isfinite(seconds):
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


class Progress:
  """The console's progress line of one loop, about `lines` times over its steps (and at
  least every `every_seconds`), on process 0 (`lines=0`: never, for loops that say their
  own summary line):

    squeeze: step 250/1000 (25%) loss 0.4213 accuracy 0.8512 | 11.3 steps/s | ETA 1:06

  `update(step, scalars)` is called where the loop has its metrics on the host; the first
  `start(step)` marks the time after the first (compiling) step, from which steps/s and
  the ETA are measured.
  """

  def __init__(self, name: str, total_steps: int, start_step: int = 0, *, lines: int = 4,
               every_seconds: float = 600.0, show=('loss', 'accuracy')):
    self.name, self.total, self.show = name, total_steps, tuple(show)
    self.every = max(1.0, (total_steps - start_step) / max(lines, 1))
    self.next = start_step + self.every
    self.every_seconds = every_seconds
    self.t0 = self.s0 = None
    self.last_line = time.time()
    self.enabled = jax.process_index() == 0 and lines > 0

  def start(self, step: int) -> None:
    if self.t0 is None:
      self.t0, self.s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    """Steps per second since `start` (nan before two points)."""
    if self.t0 is None or step <= self.s0:
      return math.nan
    return (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)

  def line(self, step: int, scalars: Mapping[str, float]) -> str:
    rate = self.rate(step)
    values = ' '.join(f'{k} {" ".join(f"{v:.4g}" for v in np.ravel(scalars[k]))}'
                      for k in self.show if k in scalars)  # a stack's metric: one per student
    speed = f'{rate:.3g} steps/s' if math.isfinite(rate) else '? steps/s'
    return (f'{self.name}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)'
            f'{" " + values if values else ""} | {speed} | ETA '
            f'{format_seconds((self.total - step) / rate) if rate > 0 else "?"}')

  def update(self, step: int, scalars: Mapping[str, float]) -> bool:
    """Prints the line if one is due at `step`; returns whether it printed."""
    due = (step >= self.next or step == self.total or
           time.time() - self.last_line >= self.every_seconds)
    if not (due and self.enabled):
      return False
    while self.next <= step:
      self.next += self.every
    self.last_line = time.time()
    logging.info('%s', self.line(step, scalars))
    return True


def read_metrics(path) -> list[dict]:
  """The rows of one `metrics.jsonl` (one `{"step": int, "<name>": float, ...}` per line),
  for plots and tests.

  Returns one dict per step, in step order. Rows of the same step are merged, later ones
  winning (a resumed run writes its steps again); a line cut short by a kill is skipped.
  """
  rows = {}
  for line in epath.Path(path).read_text().splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and 'step' in row:
      rows.setdefault(int(row['step']), {}).update(row)
  return [rows[step] for step in sorted(rows)]
