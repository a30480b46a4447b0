"""Writing and reading distilled sets: TFDS ArrayRecord, ImageFolder PNGs, an image grid."""

import io
import os
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from sre2l_jax import files
from sre2l_jax.data import builders


def write_tfds(directory: str, images: np.ndarray, labels: np.ndarray,
               num_classes: int) -> str:
  """Writes uint8 images (N, H, W, C) + labels as a TFDS dataset; returns its data dir.

  Read back with `read_tfds(<returned dir>)` (or, when local,
  `tfds.builder_from_directory`). Built on the local disk (ArrayRecord's C++ writer opens
  files itself, so cannot write gs://), then moved into place (`files.replace_dir`: a
  rename, or an upload into a bucket).
  """
  if files.is_remote(directory):
    with tempfile.TemporaryDirectory(prefix='sre2l_tfds_', ignore_cleanup_errors=True) as tmp:
      _build_tfds(tmp, images, labels, num_classes)
      files.replace_dir(tmp, directory)
  else:
    tmp = files.absolute(directory) + '.tmp'
    files.rmtree(tmp)
    _build_tfds(tmp, images, labels, num_classes)
    files.replace_dir(tmp, directory)
  return tfds_dataset_dir(directory)


def _build_tfds(data_dir: str, images: np.ndarray, labels: np.ndarray,
                num_classes: int) -> None:
  builder = builders.DistilledImages(images=images, labels=labels, num_classes=num_classes,
                                     data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()


def tfds_dataset_dir(directory: str) -> str:
  """The dataset dir inside a folder written by `write_tfds`."""
  return os.path.join(directory, builders.DistilledImages.name, '1.0.0')


def read_tfds(dataset_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, H, W, C), labels int32 (N,)) of a dataset written by `write_tfds`,
  in the order they were written (class-major: class, then ipc index). A dataset in a
  bucket is read from a temporary local copy (ArrayRecord's reader needs local files)."""
  with files.local_copy(dataset_dir) as local:
    source = tfds.builder_from_directory(local).as_data_source(split='train')
    records = [source[i] for i in range(len(source))]
  images = np.stack([r['image'] for r in records])
  labels = np.asarray([r['label'] for r in records], np.int32)
  order = np.argsort([r['index'] for r in records])  # TFDS shuffles on write
  return images[order], labels[order]


def _to_pil(image: np.ndarray) -> Image.Image:
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def png_bytes(image) -> bytes:
  """A uint8 image (H, W, C) or a PIL image, as PNG file contents."""
  buffer = io.BytesIO()
  (image if isinstance(image, Image.Image) else _to_pil(image)).save(buffer, 'PNG')
  return buffer.getvalue()


def write_image_folder(directory: str, images: np.ndarray, labels=None,
                       ipc_indices=None) -> None:
  """Images as the reference's ImageFolder, `new{cls:03d}/class{cls:03d}_id{ipc:03d}.png`
  (lossless PNG instead of JPEG), each file atomically, all at once (`files.write_all`: into
  a bucket, parallel uploads); the other files of `directory` are kept (recover adds a
  round's groups at a time).

  images: uint8 (num_classes, ipc, H, W, C) class-major; or uint8 (N, H, W, C) with their
  classes `labels` (N,) and ipc indices `ipc_indices` (N,).
  """
  if labels is None:
    num_classes, ipc = images.shape[:2]
    images = images.reshape((-1,) + images.shape[2:])
    labels, ipc_indices = np.repeat(np.arange(num_classes), ipc), np.tile(np.arange(ipc),
                                                                          num_classes)
  files.write_all((os.path.join(directory, f'new{label:03d}', f'class{label:03d}_id{i:03d}.png'),
                   png_bytes(image)) for image, label, i in zip(images, labels, ipc_indices))


def _label_rows(image: Image.Image, names: list[str], row_height: int,
                top: int) -> Image.Image:
  """`image` behind a white left margin that names each row (right-aligned, centred)."""
  from PIL import ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top
  names = [n if len(n) <= 24 else n[:23] + '…' for n in names]
  try:  # Pillow >= 10.1 with FreeType: a scalable font sized to the rows
    font = ImageFont.load_default(size=max(10, min(40, row_height // 6)))
  except (TypeError, ImportError, OSError):
    font = ImageFont.load_default()
  white, black = (255, 0) if image.mode == 'L' else ((255,) * 3, (0,) * 3)
  boxes = [ImageDraw.Draw(image).textbbox((0, 0), n, font=font) for n in names]
  pad = max(4, row_height // 16)
  margin = max(b[2] - b[0] for b in boxes) + 2 * pad
  out = Image.new(image.mode, (image.width + margin, image.height), white)
  out.paste(image, (margin, 0))
  draw = ImageDraw.Draw(out)
  for r, (name, (left, upper, right, lower)) in enumerate(zip(names, boxes)):
    middle = top + r * row_height + row_height // 2
    draw.text((margin - pad - right, middle - (upper + lower) // 2), name, fill=black,
              font=font)
  return out


def write_grid(path: str, images: np.ndarray, max_classes: int = 100,
               max_ipc: int = 20, class_names: list[str] | None = None) -> None:
  """One PNG with a row per class and a column per ipc index (1 px gaps).

  images: uint8 (num_classes, ipc, H, W, C). class_names: one per class, written left of its
  row (e.g. `datasets.class_names(config.dataset)`); None leaves the rows unnamed.
  """
  images = images[:max_classes, :max_ipc]
  rows, cols, h, w, c = images.shape
  grid = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, np.uint8)
  for r in range(rows):
    for k in range(cols):
      grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = (
          images[r, k])
  scale = max(1, 256 // max(h, w))  # small images are hard to see at 1x
  pil = _to_pil(grid)
  pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  if class_names is not None:
    pil = _label_rows(pil, [str(n) for n in class_names[:rows]], (h + 1) * scale, scale)
  files.atomic_write(path, png_bytes(pil))  # local or gs://
