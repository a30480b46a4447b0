"""Soft labels in the FKD / SRe2L format, for PyTorch training code that reads them.

  python -m sre2l_jax.fkd_export --workdir=runs/fm --out=runs/fm/fkd [--float16]

The views are the run's own (`views`: the schedule's batches, crops, flips and mixing of
student.epochs epochs), the labels the teacher's logits on them. Layout, as SRe2L's
relabel/generate_soft_label.py writes it (github.com/VILA-Lab/SRe2L): `out/epoch_{e}/
batch_{b}.tar`, each `torch.save([coords, flip_status, mix_index, mix_lam, mix_bbox,
soft_label])`:
  coords (B, 4) float32   the RandomResizedCrop box (top / H, left / W, h / H, w / W);
  flip_status (B,) bool   horizontal flip after the crop;
  mix_index (B,) int64    view i takes its mixed part from view mix_index[i];
  mix_lam float           the weight of view i's own image (1.0: not mixed);
  mix_bbox                CutMix: [bbx1, bby1, bbx2, bby2] in SRe2L's convention, bbx over
                          rows and bby over columns of NCHW images: x[:, :, bbx1:bbx2,
                          bby1:bby2] = x[mix_index, :, bbx1:bbx2, bby1:bby2] (all 0: not
                          mixed); MixUp and no mixing: None;
  soft_label (B, K)       the teacher's logits (float32; float16 with --float16).
SRe2L's loader re-derives which images form a batch from a seeded torch sampler, which a
JAX run cannot reproduce: `out/batches.json` lists them ({'batches': [epoch][batch] ->
image indices}, indices into the distilled set in class-major order, the order of the
exported ImageFolder `recover/images/new{c:03d}/class{c:03d}_id{i:03d}.png`).

Crops are resampled bilinearly from the whole normalised image, pixel centres at +0.5, edges
clamped (torch: `grid_sample(align_corners=False, padding_mode='border')` over the image);
torchvision's `resized_crop` antialiases and differs by interpolation noise.
"""

import argparse
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from sre2l_jax import config_lib
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

BATCHES = 'batches.json'


def batch_record(params: dict, logits, height: int, width: int, mix: str) -> list:
  """One batch's `[coords, flip_status, mix_index, mix_lam, mix_bbox, soft_label]` as numpy
  (`views.view_params` of the batch and the teacher's logits on its views)."""
  crop = np.asarray(params['crop'], np.float64)
  coords = (crop / np.asarray([height, width, height, width])).astype(np.float32)
  box = [int(v) for v in np.asarray(params['box'])]  # (y0, x0, y1, x1) = SRe2L's bbx/bby
  return [coords, np.asarray(params['flip'], bool),
          np.asarray(params['partner'], np.int64), float(params['lam']),
          box if mix == 'cutmix' else None, np.asarray(logits)]


def write_fkd(out: str, images: np.ndarray, schedule: views.Schedule, cfg, spec,
              teacher_logits, mesh, *, float16: bool = False) -> dict:
  """Writes every batch of `schedule` over `images` (uint8 (N, H, W, C)) under `out` (see
  the module docstring). cfg: the relabel config; teacher_logits: jitted views -> logits
  (`label_store.create_teacher_logits`). Returns batches.json's content."""
  import torch  # pylint: disable=g-import-not-at-top  # optional dependency

  height, width = images.shape[1:3]
  views_fn = views.create_batch_views(cfg, spec, mesh)
  params_fn = jax.jit(lambda key: views.view_params(key, schedule.batch_size, height, width,
                                                    cfg=cfg))
  sharded = batching.data_sharding(mesh)
  index = {'images': int(len(images)), 'batch_size': schedule.batch_size,
           'epochs': schedule.epochs, 'batches': []}
  for epoch in range(schedule.epochs):
    folder = os.path.join(out, f'epoch_{epoch}')
    os.makedirs(folder, exist_ok=True)
    epoch_ids = []
    for b in range(schedule.steps_per_epoch):
      ids = schedule.batch_indices(epoch, b)
      key = schedule.view_key(epoch, b)
      batch_views, _, _ = views_fn(key, jax.device_put(images[ids], sharded))
      logits = np.asarray(teacher_logits(batch_views), np.float32)
      record = batch_record(jax.device_get(params_fn(key)), logits.astype(
          np.float16 if float16 else np.float32), height, width, cfg.mix)
      torch.save([torch.from_numpy(np.array(x, order='C')) if isinstance(x, np.ndarray)
                  else x for x in record], os.path.join(folder, f'batch_{b}.tar'))
      epoch_ids.append([int(i) for i in ids])
    index['batches'].append(epoch_ids)
  files.atomic_write(os.path.join(out, BATCHES), json.dumps(index))
  return index


def export(workdir: str, out: str, *, float16: bool = False) -> dict:
  """The FKD export of `workdir`'s distilled set (evaluate.images_dir's when set) with its
  teacher and relabel settings, from the run's `config.json`."""
  config = ml_collections.ConfigDict(config_lib.upgrade(
      files.read_json(os.path.join(workdir, 'config.json'))))
  spec = datasets.spec_of(config.dataset)
  mesh = batching.create_mesh(config.mesh_shape)
  images, _ = image_sets.distilled(config, workdir)
  schedule = views.create_schedule(config, len(images))
  batching.check_batch_size(schedule.batch_size, mesh, 'student.batch_size')
  model, teacher = teacher_lib.load(config, workdir, mesh)
  return write_fkd(out, images, schedule, config.relabel, spec,
                   label_store.create_teacher_logits(model, teacher, mesh), mesh, float16=float16)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='a run with a teacher and a set')
  parser.add_argument('--out', required=True, help='folder for epoch_*/batch_*.tar')
  parser.add_argument('--float16', action='store_true', help='store logits as float16')
  args = parser.parse_args(argv)
  index = export(args.workdir, args.out, float16=args.float16)
  print(f'Wrote {index["epochs"]} epochs x {len(index["batches"][0])} batches to {args.out}')


if __name__ == '__main__':
  try:
    main()
  except (ValueError, OSError) as e:
    sys.exit(f'fkd_export: {e}')
