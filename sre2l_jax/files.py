"""Small file helpers every stage uses: atomic writes and JSON.

Writes happen on process 0 only (the others see the same shared directory) and go through a
temporary name and `os.replace`, so a reader never sees half a file and a kill never leaves
one behind.
"""

import json
import os
import shutil

import jax


def atomic_write(path: str, data: bytes | str) -> None:
  """Writes `data` to `path` through a temporary file (any process; callers choose which)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as f:
    f.write(data)
  os.replace(tmp, path)


def replace_dir(tmp: str, directory: str) -> None:
  """Moves the finished folder `tmp` to `directory`, replacing what was there."""
  shutil.rmtree(directory, ignore_errors=True)
  os.replace(tmp, directory)


def write_json(path: str, data: dict) -> None:
  """Atomically writes `data` as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  atomic_write(path, json.dumps(data, indent=1, sort_keys=True, default=float))


def read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def normalised(data: dict) -> dict:
  """`data` as it reads back from JSON (tuples as lists, numpy scalars as floats)."""
  return json.loads(json.dumps(data, default=float))
