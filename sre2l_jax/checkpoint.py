"""Orbax checkpoint managers, the config fingerprints that guard a stage's workdir, the
stage results (`result.json`) that mark it finished, and the workdir's lock (one run at a
time)."""

import datetime
import json
import os
import socket
import threading
import time
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging

from sre2l_jax import files


FINGERPRINT = 'fingerprint.json'
RESULT = 'result.json'
LOCK = 'lock.json'
# The holder rewrites its lock this often (`keep_lock`); a lock whose holder cannot be asked
# (another host's, e.g. a pod resumed on new VMs) is stale once not rewritten for
# LOCK_STALE_SECONDS: what a killed or preempted run leaves.
LOCK_REFRESH_SECONDS = 60
LOCK_STALE_SECONDS = 600
# A lock file still unreadable after this long was left by a process killed while creating it.
LOCK_EMPTY_SECONDS = 60


class ConfigMismatchError(ValueError):
  """A workdir holds state written under a different configuration."""


class PreemptedError(RuntimeError):
  """A preemption notice (SIGTERM under jax.distributed) stopped a stage after its save."""

  exit_code = 143  # 128 + SIGTERM, what a shell reports for a process that TERM ended


class _Preemption:
  """This process's questions to JAX's preemption sync, counted over every stage's manager.

  JAX sets the sync point to the question after the last one it was asked
  (`multihost_utils.reached_preemption_sync_point(n)`: the point is the largest n any process
  passed, plus one). Asked with each loop's own step, a notice that came between two loops
  (a compile, the class statistics) got a point past the next loop's last step, and one that
  came just after an async save got a point the loop had passed: Orbax's finalize thread asks
  about the step it wrote (CI stop 41: the Slurm requeue test's TERM went unheeded). Here n
  counts the new steps the stages' managers were asked, in the same order on every process,
  and once reached the notice stays reached: the next loop to ask saves and stops.
  """

  def __init__(self):
    self.lock = threading.Lock()
    self.asked = 0
    self.reached = False

  def ask(self, manager: ocp.CheckpointManager) -> bool:
    """One more question (with `lock` held); True from the sync point on."""
    if not self.reached:
      self.asked += 1
      # Orbax's question (it answers False where the service is off).
      self.reached = ocp.CheckpointManager.reached_preemption(manager, self.asked)
    return self.reached


_PREEMPTION = _Preemption()


class _StageManager(ocp.CheckpointManager):
  """A CheckpointManager whose preemption question is counted by `_Preemption`: a step newer
  than any asked before is a new question; an older one (the finalize thread's) is not, and
  is answered by whether the notice was reached by then."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._newest_asked = -1  # steps count from 0
    self._preempted_from = None

  def reached_preemption(self, step: int) -> bool:
    with _PREEMPTION.lock:
      if step > self._newest_asked:
        self._newest_asked = step
        if self._preempted_from is None and _PREEMPTION.ask(self):
          self._preempted_from = step
      return self._preempted_from is not None and step >= self._preempted_from


def create_manager(directory: str, *, save_interval_steps: int = 1,
                   final_step: int | None = None,
                   max_to_keep: int = 2) -> ocp.CheckpointManager:
  """A CheckpointManager for one stage's resumable state (atomic saves, latest step).

  `manager.save(step, ...)` saves when `step` is a multiple of `save_interval_steps`, is
  `final_step`, or a preemption was signalled; the caller calls it every step.
  """
  policies = [ocp.checkpoint_managers.FixedIntervalPolicy(max(1, save_interval_steps)),
              ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if final_step is not None:
    policies.append(ocp.checkpoint_managers.SpecificStepsPolicy((final_step,)))
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True,
      save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies))
  return _StageManager(files.as_path(directory), options=options)  # gs:// too


def diff(a: Any, b: Any, prefix: str = '') -> list[str]:
  """'key: saved X, now Y' for every leaf where the nested dicts `a` and `b` differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += diff(a.get(key), b.get(key), f'{prefix}{key}.')
    return out
  return [] if a == b else [f'{prefix[:-1]}: saved {a!r}, now {b!r}']


def check_fingerprint(stage_dir: str, fingerprint: dict, *, write: bool = True,
                      name: str = FINGERPRINT, added: tuple[str, ...] = ()) -> None:
  """Refuses to reuse `stage_dir` if it was written under another fingerprint.

  The fingerprint holds what determines the shapes and meaning of the stage's state (model,
  dataset, sizes, seed). The first run writes it to `stage_dir/fingerprint.json` (with
  `write`: a stage checks first and claims the folder once all its checks passed; `name`:
  another file, for a key kept apart from the one a folder is named after). `added`: keys
  introduced after folders existed; one that a saved fingerprint lacks is not compared, and
  is recorded (with `write`, stated in a log line): from then on it is checked.
  """
  fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples, numpy scalars
  path = os.path.join(stage_dir, name)
  if files.exists(path):
    saved = files.read_json(path, remake=f'restore it, or remove {stage_dir} to start that '
                            f'work again')
    missing = [k for k in added if k not in saved]
    differences = diff(saved, {k: v for k, v in fingerprint.items() if k not in missing})
    if differences:
      raise ConfigMismatchError(
          f'{stage_dir} holds a run with a different configuration; refusing to resume into '
          f'it. Differences: {"; ".join(differences)}. Use a new --workdir, or restore the '
          f'original configuration.')
    if missing and write and jax.process_index() == 0:
      logging.info('%s predates %s: recorded this run\'s', path, ', '.join(missing))
      files.atomic_write(path, json.dumps(fingerprint, indent=1, sort_keys=True))
    return
  if write and jax.process_index() == 0:
    files.atomic_write(path, json.dumps(fingerprint, indent=1, sort_keys=True))


def finished_result(stage_dir: str) -> dict | None:
  """The result of the run that finished the stage in `stage_dir` (check its fingerprint
  first), or None. A finished stage that is run again returns it and changes nothing: the
  measurements (wall time, throughput) stay those of the run that did the work."""
  path = os.path.join(stage_dir, RESULT)
  if not files.exists(path):
    return None
  return files.read_json(path, remake='remove it and re-run the stage (what it finished is '
                         'kept: it writes the result again)')


def write_result(stage_dir: str, result: dict) -> dict:
  """Writes `stage_dir/result.json`, stamped with when it was measured; returns it."""
  result = dict(result, measured_at=datetime.datetime.now().isoformat(timespec='seconds'))
  files.write_json(os.path.join(stage_dir, RESULT), result)
  # As it reads back (tuples as lists): a re-run that returns the stored result returns the same.
  return files.normalised(result)


# ----------------------------------------------------------------------------- lock


class WorkdirBusyError(ValueError):
  """Another run holds the workdir's lock."""


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _lock_state(path: str) -> tuple[dict | None, str | None]:
  """(holder, why it is stale or None) of the lock at `path`."""
  try:
    holder = json.loads(files.read_text(path))
  except (ValueError, FileNotFoundError):
    holder = None
  if not isinstance(holder, dict) or not {'host', 'pid', 'updated'} <= set(holder):
    age = time.time() - files.as_path(path).stat().mtime
    return None, (f'unreadable and {age:.0f} s old' if age > LOCK_EMPTY_SECONDS else None)
  if holder['host'] == socket.gethostname():  # its process can be asked (local or bucket)
    return holder, None if _alive(int(holder['pid'])) else f'pid {holder["pid"]} has ended'
  age = time.time() - holder['updated']
  return holder, (f'not refreshed for {age:.0f} s' if age > LOCK_STALE_SECONDS else None)


def _describe(holder: dict | None) -> str:
  if holder is None:
    return 'a run that is creating it'
  return (f'{holder.get("command", "a run")!r} (host {holder["host"]}, pid {holder["pid"]}, '
          f'since {holder.get("started")})')


def take_lock(workdir: str, command: str) -> dict:
  """Takes `workdir/lock.json` for this process (call on process 0 only), before anything is
  written; returns the holder record for `keep_lock` / `release_lock`.

  Held by a live run: WorkdirBusyError with its host, pid, start and command. Stale (its pid
  ended on this host; another host's not refreshed for LOCK_STALE_SECONDS, see `keep_lock`):
  taken over, with a warning line. Locally the file is created exclusively (O_EXCL): of two runs
  starting together, one gets it. In a bucket there is no exclusive create: written when
  absent, then read back (the later writer wins, the other refuses).
  """
  path = os.path.join(workdir, LOCK)
  now = time.time()
  me = {'host': socket.gethostname(), 'pid': os.getpid(), 'command': command,
        'started': datetime.datetime.now().isoformat(timespec='seconds'), 'updated': now}
  text = json.dumps(me, indent=1)
  files.makedirs(workdir)
  for _ in range(3):
    if files.is_remote(path):
      if not files.exists(path):
        files.atomic_write(path, text)
        if json.loads(files.read_text(path)) == me:
          return me
    else:
      try:
        fd = os.open(files.absolute(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        pass
      else:
        with os.fdopen(fd, 'w') as f:
          f.write(text)
        return me
    try:
      holder, stale = _lock_state(path)
    except FileNotFoundError:  # released meanwhile
      continue
    if stale is None:
      raise WorkdirBusyError(
          f'{workdir} is in use by {_describe(holder)}: one run at a time per workdir. Wait '
          f'for it to end, or use another --workdir; if no such run exists any more, delete '
          f'{path}.')
    logging.warning('Taking over the stale lock %s of %s: %s.', path, _describe(holder), stale)
    files.rmtree(path)
  raise WorkdirBusyError(f'Could not take the lock {path}: other runs keep taking it.')


def keep_lock(workdir: str, lock: dict | None) -> Callable[[], None]:
  """Rewrites the lock every LOCK_REFRESH_SECONDS (its `updated` time) in a background
  thread; returns the function that stops it (and waits for a write in progress, so that
  `release_lock` after it leaves no lock). `lock` None (not the holder: a process other than
  0): nothing to keep."""
  stop = threading.Event()

  def refresh():
    while not stop.wait(LOCK_REFRESH_SECONDS):
      lock['updated'] = time.time()
      try:
        files.atomic_write(os.path.join(workdir, LOCK), json.dumps(lock, indent=1))
      except OSError as e:  # a transient write error: the next refresh tries again
        logging.warning('Could not refresh the lock of %s: %s', workdir, e)

  thread = threading.Thread(target=refresh, name='workdir-lock', daemon=True)
  if lock is not None:
    thread.start()

  def stopped() -> None:
    stop.set()
    if thread.is_alive():
      thread.join()
  return stopped


def release_lock(workdir: str, lock: dict | None) -> None:
  """Removes the lock if it is still this run's (`lock` from `take_lock`; None: nothing)."""
  if lock is None:
    return
  path = os.path.join(workdir, LOCK)
  try:
    held = json.loads(files.read_text(path))
  except (ValueError, FileNotFoundError):
    return
  if isinstance(held, dict) and {k: held.get(k) for k in ('host', 'pid', 'started')} == {
      k: lock[k] for k in ('host', 'pid', 'started')}:
    files.rmtree(path)
