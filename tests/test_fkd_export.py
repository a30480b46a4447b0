"""The FKD / SRe2L soft-label export (fkd_export.py) read back by a small PyTorch loader: the
crops, flips and CutMix it describes, applied in torch to the distilled images, give views on
which the teacher's PyTorch twin reproduces the exported logits."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import fkd_export
from sre2l_jax import image_sets
from sre2l_jax.data import datasets
import testlib

from benchmarks import torch_reference

SPEC = datasets.get_spec('fashion_mnist')
IPC = 2
# Relative error (norm of the difference / norm) of the logits: the views are resampled by
# torch's grid_sample and by JAX's scale_and_translate, both float32 bilinear weights
# (~1e-7 relative per pixel), then a float32 ConvNet in each framework's summation order;
# ~1e-6 is expected, 1e-4 is test_torch_import's bound for the same twins.
RTOL = 1e-4


def crop(image, coords, size):
  """One view's crop: (C, H, W) -> (C, size, size), bilinear from the whole image at pixel
  centres, edges clamped (the export's documented resampling)."""
  _, height, width = image.shape
  top, left, h, w = (coords * torch.tensor([height, width, height, width])).tolist()
  ys = top + (torch.arange(size) + 0.5) * h / size  # sample positions in pixels
  xs = left + (torch.arange(size) + 0.5) * w / size
  grid = torch.stack(torch.meshgrid(xs / width * 2 - 1, ys / height * 2 - 1, indexing='xy'),
                     -1)
  return F.grid_sample(image[None], grid[None].float(), mode='bilinear',
                       padding_mode='border', align_corners=False)[0]


def load_views(out, epoch, batch, images):
  """A minimal FKD loader: the batch's views and its stored soft labels."""
  coords, flip, mix_index, lam, bbox, soft = torch.load(
      os.path.join(out, f'epoch_{epoch}', f'batch_{batch}.tar'), weights_only=False)
  with open(os.path.join(out, fkd_export.BATCHES)) as f:
    ids = json.load(f)['batches'][epoch][batch]
  x = (torch.from_numpy(images[ids]).float() / 255 - torch.tensor(SPEC.mean)) / torch.tensor(
      SPEC.std)
  x = x.permute(0, 3, 1, 2)
  x = torch.stack([crop(im, c, x.shape[-1]) for im, c in zip(x, coords)])
  x = torch.where(flip[:, None, None, None], x.flip(-1), x)
  bbx1, bby1, bbx2, bby2 = bbox
  x[:, :, bbx1:bbx2, bby1:bby2] = x[mix_index, :, bbx1:bbx2, bby1:bby2].clone()
  return x, soft, lam


@pytest.mark.equivalence
@pytest.mark.slow  # ~45 s: the views, teacher and its twin compiled and run for 6 batches
def test_fkd_export_read_back_by_torch_reproduces_the_teacher(tmp_path):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.teacher.width = 8
  config.recover.ipc = IPC
  config.student.update(epochs=2, batch_size=8)
  config.relabel.update(mix='cutmix', mix_prob=0.5)
  workdir = str(tmp_path / 'run')
  _, variables = testlib.write_teacher(config, workdir)
  images = np.random.default_rng(0).integers(0, 256, (10 * IPC,) + SPEC.image_shape,
                                             np.uint8)
  export.write_tfds(image_sets.distilled_dir(workdir), images,
                    np.repeat(np.arange(10), IPC).astype(np.int32), 10)
  files.write_json(os.path.join(workdir, 'config.json'), config.to_dict())

  out = str(tmp_path / 'fkd')
  index = fkd_export.export(workdir, out)
  assert index['epochs'] == 2 and len(index['batches'][0]) == 3  # 20 images, batches of 8
  twin = torch_reference.build_model('convnet', 10, 1, 28, width=8, depth=3)
  twin = torch_reference.load_flax_variables(twin, variables).eval()
  mixed = 0
  for epoch in range(2):
    for batch in range(3):
      x, soft, lam = load_views(out, epoch, batch, images)
      assert soft.dtype == torch.float32 and soft.shape == (8, 10)
      with torch.no_grad():
        got = twin(x).double()
      assert torch.linalg.norm(got - soft.double()) / torch.linalg.norm(soft.double()) < RTOL
      mixed += lam < 1
  assert 0 < mixed < 6  # mix_prob 0.5: some batches mixed, some not (both paths read back)
