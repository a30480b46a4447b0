"""ImageNet input throughput on this host: decoded, randomly resized and cropped images/s.

  python -m benchmarks.input_pipeline --images=768 --batch=128 --batches=4 --json=out.json
  python -m benchmarks.input_pipeline --threads=4,2,1   (the same in the other order: on a
      shared machine the load changes while it runs, and the order shows how much)

Writes a small ImageNet in the real format first (ILSVRC2012_img_train.tar as TFDS's
`imagenet2012` builder reads it: per-class tars of JPEGs at ImageNet-like sizes, 500x375 and
the like, ~110 KB each at quality 90, the average of ImageNet's training JPEGs), prepares it
into ArrayRecord files with the package's own `datasets.prepare`, then times the training
input exactly as the stages run it (`streaming.StreamingSplit.train_batches`: random-access
read, JPEG decode, RandomResizedCrop to 224x224, batch put on the device) with 1 thread, one
per core and `streaming.decode_threads()` (the default). Per core = images per CPU second of
the process (its CPU time, all threads), which other programs on the machine do not change;
images/s (wall) and the cores' worth of CPU the process got are printed beside it, with the
machine's load average before and after.
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import streaming

# Common ImageNet training-image sizes (width, height): most are 500 on the long side.
SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (640, 480), (400, 300))


def natural_jpeg(rng: np.random.Generator, size: tuple[int, int]) -> bytes:
  """A JPEG (quality 90) whose size in bytes is near a natural photo's of that size: smooth
  colour fields plus fine texture (pure noise would be several times larger)."""
  width, height = size
  coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
  texture = rng.normal(0, 14, (height, width, 1)).astype(np.float32)
  image = np.clip(base + texture, 0, 255).astype(np.uint8)
  out = io.BytesIO()
  Image.fromarray(image).save(out, format='JPEG', quality=90)
  return out.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_imagenet(folder: str, images: int, classes: int = 8, seed: int = 0) -> float:
  """ILSVRC2012_img_train.tar and a one-image val tar in `folder`; returns mean JPEG KB."""
  rng = np.random.default_rng(seed)
  names = tfds.features.ClassLabel(
      names_file=tfds.core.tfds_path('datasets/imagenet2012/labels.txt')).names
  sizes = []
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_train.tar'), 'w') as outer:
    for c in range(classes):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as tar:
        for i in range(images // classes):
          data = natural_jpeg(rng, SIZES[int(rng.integers(len(SIZES)))])
          sizes.append(len(data))
          _add(tar, f'{names[c]}_{i}.JPEG', data)
      _add(outer, f'{names[c]}.tar', inner.getvalue())
  with tarfile.open(os.path.join(folder, 'ILSVRC2012_img_val.tar'), 'w') as tar:
    _add(tar, 'ILSVRC2012_val_00000001.JPEG', natural_jpeg(rng, SIZES[0]))
  return float(np.mean(sizes)) / 1024


def measure(split: streaming.StreamingSplit, batch: int, batches: int) -> dict:
  """`batches` training batches after one warm-up batch: images per wall second, images per
  CPU second of this process (all its threads: what one core decodes, whatever else the
  machine runs) and the cores' worth of CPU the process got (CPU seconds / wall seconds)."""
  sharding = batching.data_sharding(batching.create_mesh())
  stream = split.train_batches(batch, seed=0, start_step=0, sharding=sharding)
  jax.block_until_ready(next(stream))
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    jax.block_until_ready(next(stream))
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  images = batch * batches
  return {'images_per_s': images / wall, 'images_per_cpu_s': images / cpu,
          'cores_used': cpu / wall}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--images', type=int, default=768, help='training images written')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--batches', type=int, default=4, help='timed batches per setting')
  parser.add_argument('--threads', default='',
                      help='comma-separated thread counts, in this order (default: 1, one '
                           'per core, decode_threads())')
  parser.add_argument('--json', default='', help='also write the results here')
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory(prefix='sre2l_input_') as root:
    manual = os.path.join(root, 'manual')
    os.makedirs(manual)
    jpeg_kb = write_imagenet(manual, args.images)
    config = ml_collections.ConfigDict(dict(
        name='imagenet2012', data_dir=os.path.join(root, 'tfds'), manual_dir=manual,
        train_limit=0, test_limit=0))
    spec = datasets.get_spec('imagenet2012')
    load_before = os.getloadavg()
    results = []
    settings = ([int(t) for t in args.threads.split(',')] if args.threads else
                sorted({1, cores, streaming.decode_threads()}))
    for threads in settings:
      split = streaming.StreamingSplit.create(config, spec, 'train', num_threads=threads)
      result = measure(split, args.batch, args.batches)
      results.append({'threads': threads, **result})
      print(f'{threads:3d} threads: {result["images_per_s"]:7.1f} images/s, '
            f'{result["images_per_cpu_s"]:6.1f} per CPU second, '
            f'{result["cores_used"]:.2f} cores used', flush=True)
    load_after = os.getloadavg()
  out = {'cores': cores, 'mean_jpeg_kb': jpeg_kb, 'image_shape': list(spec.image_shape),
         'batch': args.batch, 'batches': args.batches, 'results': results,
         'loadavg_before': load_before, 'loadavg_after': load_after}
  print(f'{cores} core(s), mean JPEG {jpeg_kb:.0f} KB; load average before '
        f'{load_before[0]:.2f}, after {load_after[0]:.2f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)


if __name__ == '__main__':
  main()
