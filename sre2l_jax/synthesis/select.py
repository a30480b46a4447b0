"""The teacher's choice of real images, exported as they are: recover.method='select'.

The starting images of recover.init='scored' (`selection.py`) without any optimisation: per
class, the scored candidates' k-means clusters over the teacher's features and one image of
each (`recover.scored.pick`). With the Fashion-MNIST config's settings (scored.candidates=0,
crops=1, coverage, pick='centre') that is the image nearest each of ipc k-means centroids of
all the class's images, the k-means coreset's kind of choice (`image_sets.coreset` runs its
own k-means, from another seed and up to 100 iterations against `recover.scored.iterations`'
20, so the two are two draws: at Fashion-MNIST IPC 50 they share 87 of 500 images and score
alike; 100 iterations here score as 20 do, issue 30's tenth step). Its soft
labels come from the teacher at relabel, as for any distilled set.

Why a method: at IPC 50 on Fashion-MNIST no refinement of 300 steps or more beat the coreset
it starts from, over four teachers, so the selection alone was the default there until a
10-step refinement (`edc_mixed`) led it on three teachers (docs/results.md, issue 30's ninth
step); it stays the way to measure a choice of real images as a distilled set (e.g.
`recover.scored.pick='herding'`).
"""

import numpy as np

from sre2l_jax.data import datasets
from sre2l_jax.synthesis.method import Method
from sre2l_jax.synthesis.selection import scored_images


def validate(cfg, spec=None) -> None:
  """Refuses a start other than 'scored' (the choice this method exports)."""
  del spec
  if cfg.init != 'scored':
    raise ValueError(f"recover.method='select' exports recover.init='scored''s choice of real "
                     f"images; set recover.init='scored' (now {cfg.init!r}).")


def synthesize(config, spec: datasets.DatasetSpec, *, model, teacher, train, num_classes: int,
               mesh) -> np.ndarray:
  """The chosen images, uint8 (num_classes, ipc, H, W, C) (`selection.scored_images`)."""
  validate(config.recover)
  return datasets.denormalise(
      scored_images(config, model, teacher, train, num_classes, mesh), spec)


METHOD = Method(name='select', kind='direct', synthesize=synthesize, selects=True,
                validate=validate)
