"""File helpers every stage uses: paths local or in a bucket, atomic writes, JSON.

A path is a string or an `etils.epath.Path`; `gs://bucket/...` works wherever a local path
does. epath reaches GCS through gcsfs (fsspec), never through TensorFlow: importing this
module sets `EPATH_USE_TF=false` unless the environment says otherwise (with TensorFlow
installed epath would otherwise pick `tf.io.gfile` and import it). gcsfs's listings cache is
off: several processes write the same bucket, and a cached listing would hide their files.

Writes happen on process 0 only (the others see the same directory or bucket).

Atomic writes: a reader never sees half a file, and a kill never leaves one.
- Local: the file is written under a temporary name and moved into place (`os.replace`).
- GCS: written in place. An object becomes visible only when its upload completes (GCS
  object writes are atomic), while a rename there is a copy plus a delete, so a temporary
  name would add a second upload for nothing.
Folders (`replace_dir`) are renamed locally. A bucket has no folder rename: the finished
folder is copied file by file into its place, files in subfolders first and the JSON files
last (they are what readers look for: `teacher.json`, TFDS's `dataset_info.json`), so a
reader never takes a half-copied folder for a whole one; a stage killed meanwhile writes it
again when resumed, since its result is written after the folder.
"""

import concurrent.futures
import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Union

# Before etils decides which backend serves gs:// (it decides once, on first use).
os.environ.setdefault('EPATH_USE_TF', 'false')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from etils import epath  # pylint: disable=g-import-not-at-top,wrong-import-position

PathLike = Union[str, os.PathLike]


def _configure_gcsfs() -> None:
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:  # no fsspec: local paths only
    return
  fsspec.config.conf.setdefault('gcs', {}).setdefault('use_listings_cache', False)


_configure_gcsfs()


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store (gs://, s3://...) rather than the local disk."""
  return '://' in os.fspath(path)


def check_reachable(path: PathLike) -> None:
  """Raises ValueError, with the fix, for a gs:// path without gcsfs installed (before a
  stage starts, rather than an ImportError from its first write)."""
  if not os.fspath(path).startswith('gs://'):
    return
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ValueError(f'{os.fspath(path)}: gs:// paths are reached through gcsfs, which is not '
                     f'installed: pip install -e ".[gcs]" (or pip install gcsfs).') from e


def absolute(path: PathLike) -> str:
  """`path` with `~` expanded and made absolute when local; a URL as it is."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(os.path.expanduser(path))


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path` (absolute when local), e.g. for Orbax."""
  return epath.Path(absolute(path))


def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def isdir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def makedirs(path: PathLike) -> None:
  """Creates a local folder and its parents (nothing to do in a bucket: no folders)."""
  if not is_remote(path):
    os.makedirs(absolute(path), exist_ok=True)


def rmtree(path: PathLike) -> None:
  """Deletes a folder (or file) and everything under it; nothing if it is not there."""
  if not is_remote(path):
    if os.path.isdir(absolute(path)):
      shutil.rmtree(absolute(path), ignore_errors=True)
    elif os.path.lexists(absolute(path)):
      os.remove(absolute(path))
    return
  p = as_path(path)
  if p.exists():
    if p.is_dir():
      p.rmtree()
    else:
      p.unlink()


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text()


def open_file(path: PathLike, mode: str = 'rb'):
  """A file object of `path` ('r', 'rb', 'w', 'wb'); a bucket's objects are streamed."""
  return as_path(path).open(mode)


def size(path: PathLike) -> int:
  """Bytes in the file `path`."""
  return as_path(path).stat().length


def atomic_write(path: PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that no reader sees half of it (module docstring; any
  process; callers choose which)."""
  binary = isinstance(data, bytes)
  if is_remote(path):
    p = as_path(path)
    p.write_bytes(data) if binary else p.write_text(data)  # pylint: disable=expression-not-assigned
    return
  path = absolute(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'wb' if binary else 'w') as f:
    f.write(data)
  os.replace(tmp, path)


def write_all(items: Iterable[tuple[PathLike, bytes | str]], threads: int = 16) -> None:
  """`atomic_write(path, data)` of every (path, data) in `items`; into a bucket `threads`
  at a time (each upload is a round trip: 50,000 PNGs one after another would take most
  of an hour on GCS)."""
  items = list(items)
  if not any(is_remote(path) for path, _ in items):
    for path, data in items:
      atomic_write(path, data)
    return
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for _ in pool.map(lambda item: atomic_write(*item), items):  # raises the first error
      pass


def files_in_copy_order(root: epath.Path) -> list[epath.Path]:
  """The files under `root`: in subfolders first, then the others, JSON files last."""
  # One listing per folder: epath refuses rglob('**') on GCS, and its walk() there yields
  # folders without the gs:// prefix (etils 1.15).
  found, folders = [], [root]
  while folders:
    for p in folders.pop().iterdir():
      (folders if p.is_dir() else found).append(p)
  return sorted(found, key=lambda p: (p.suffix == '.json', -len(p.relative_to(root).parts),
                                      os.fspath(p)))


def copy_tree(source: PathLike, target: PathLike, threads: int = 1) -> None:
  """Copies every file under the folder `source` to the same place under `target`
  (either may be local or in a bucket), in `files_in_copy_order`; with `threads` > 1 the
  files are copied that many at a time, JSON files still last."""
  source, target = as_path(source), as_path(target)

  def copy(p):
    out = target / os.fspath(p.relative_to(source))
    makedirs(out.parent)
    with p.open('rb') as src, out.open('wb') as dst:
      shutil.copyfileobj(src, dst, 1 << 24)

  ordered = files_in_copy_order(source)
  if threads > 1:
    data = [p for p in ordered if p.suffix != '.json']
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      for _ in pool.map(copy, data):  # raises the first error
        pass
    ordered = [p for p in ordered if p.suffix == '.json']
  for p in ordered:
    copy(p)


def replace_dir(tmp: PathLike, directory: PathLike) -> None:
  """Moves the finished folder `tmp` to `directory`, replacing what was there.

  Local to local: a rename. Into a bucket (or from a local `tmp` into one): what was there
  is deleted, `tmp` copied in (`copy_tree`, see the module docstring) and deleted.
  """
  rmtree(directory)
  if not is_remote(tmp) and not is_remote(directory):
    os.replace(absolute(tmp), absolute(directory))
    return
  copy_tree(tmp, directory)
  rmtree(tmp)


@contextlib.contextmanager
def local_copy(directory: PathLike) -> Iterator[str]:
  """A local folder holding what `directory` holds, for readers that open files themselves
  (ArrayRecord's C++ reader): `directory` itself when local, else a temporary download that
  is deleted afterwards."""
  if not is_remote(directory):
    yield absolute(directory)
    return
  with tempfile.TemporaryDirectory(prefix='sre2l_') as tmp:
    copy_tree(directory, tmp)
    yield tmp


def save_npy(path: PathLike, array: np.ndarray) -> None:
  """Writes `array` as a .npy file, atomically."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  atomic_write(path, buffer.getvalue())


def load_npy(path: PathLike) -> np.ndarray:
  """A .npy file: memory-mapped when local (read as needed), downloaded whole otherwise."""
  if not is_remote(path):
    return np.load(absolute(path), mmap_mode='r')
  return np.load(io.BytesIO(read_bytes(path)))


def write_json(path: PathLike, data: dict) -> None:
  """Atomically writes `data` as JSON (process 0 only)."""
  if jax.process_index() != 0:
    return
  atomic_write(path, json.dumps(data, indent=1, sort_keys=True, default=float))


class DamagedFileError(ValueError):
  """A file is there but cannot be read as what it should be (truncated, overwritten)."""


def read_json(path: PathLike, remake: str = 'remove it and re-run the stage that wrote it') -> dict:
  """The JSON object in `path`; a damaged file raises DamagedFileError naming it, what was
  expected and `remake` (how to make it again)."""
  try:
    data = json.loads(read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DamagedFileError(f'{os.fspath(path)} is damaged: expected a JSON object, got '
                           f'{type(e).__name__} ({e}); {remake}.') from e
  if not isinstance(data, dict):
    raise DamagedFileError(f'{os.fspath(path)} is damaged: expected a JSON object, got a '
                           f'{type(data).__name__}; {remake}.')
  return data


def normalised(data: dict) -> dict:
  """`data` as it reads back from JSON (tuples as lists, numpy scalars as floats)."""
  return json.loads(json.dumps(data, default=float))
