"""Orbax checkpoint managers, the config fingerprints that guard a stage's workdir, and the
stage results (`result.json`) that mark it finished."""

import datetime
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from sre2l_jax import files


FINGERPRINT = 'fingerprint.json'
RESULT = 'result.json'


class ConfigMismatchError(ValueError):
  """A workdir holds state written under a different configuration."""


class PreemptedError(RuntimeError):
  """A preemption notice (SIGTERM under jax.distributed) stopped a stage after its save."""

  exit_code = 143  # 128 + SIGTERM, what a shell reports for a process that TERM ended


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
  return ocp.CheckpointManager(files.as_path(directory), options=options)  # gs:// too


def diff(a: Any, b: Any, prefix: str = '') -> list[str]:
  """'key: saved X, now Y' for every leaf where the nested dicts `a` and `b` differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for key in sorted(set(a) | set(b)):
      out += diff(a.get(key), b.get(key), f'{prefix}{key}.')
    return out
  return [] if a == b else [f'{prefix[:-1]}: saved {a!r}, now {b!r}']


def check_fingerprint(stage_dir: str, fingerprint: dict) -> None:
  """Refuses to reuse `stage_dir` if it was written under another fingerprint.

  The fingerprint holds what determines the shapes and meaning of the stage's state (model,
  dataset, sizes, seed). The first run writes it to `stage_dir/fingerprint.json`.
  """
  fingerprint = json.loads(json.dumps(fingerprint))  # normalise tuples, numpy scalars
  path = os.path.join(stage_dir, FINGERPRINT)
  if files.exists(path):
    differences = diff(files.read_json(path), fingerprint)
    if differences:
      raise ConfigMismatchError(
          f'{stage_dir} holds a run with a different configuration; refusing to resume into '
          f'it. Differences: {"; ".join(differences)}. Use a new --workdir, or restore the '
          f'original configuration.')
    return
  if jax.process_index() == 0:
    files.atomic_write(path, json.dumps(fingerprint, indent=1, sort_keys=True))


def finished_result(stage_dir: str) -> dict | None:
  """The result of the run that finished the stage in `stage_dir` (check its fingerprint
  first), or None. A finished stage that is run again returns it and changes nothing: the
  measurements (wall time, throughput) stay those of the run that did the work."""
  path = os.path.join(stage_dir, RESULT)
  return files.read_json(path) if files.exists(path) else None


def write_result(stage_dir: str, result: dict) -> dict:
  """Writes `stage_dir/result.json`, stamped with when it was measured; returns it."""
  result = dict(result, measured_at=datetime.datetime.now().isoformat(timespec='seconds'))
  files.write_json(os.path.join(stage_dir, RESULT), result)
  # As it reads back (tuples as lists): a re-run that returns the stored result returns the same.
  return files.normalised(result)
