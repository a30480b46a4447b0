"""Relabel: FKD-style soft labels for every augmented view of every synthetic image.

Views are a pure function of (seed, epoch, batch) (`views.py`), so nothing about crops is
stored and replay is exact. Two modes give the same labels:
  online  the teacher runs inside the student's step (nothing is stored; this stage only
          records that choice);
  stored  the teacher's logits on each view are written once, compressed, in checksummed
          shards (`label_store.py`) under `workdir/relabel/<set>/`; evaluate reads them back.
"""

import os
import time

import ml_collections
from absl import logging

from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import student
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import views
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stored mode: writes `workdir/relabel/<set>/` for the distilled set and each baseline.
  Online mode: records that labels come from the teacher at training time."""
  label_store.validate(config.relabel)
  start = time.time()
  spec = datasets.get_spec(config.dataset.name)
  sets = image_sets.image_sets(config, workdir)
  result = {'stage': 'relabel', 'mode': config.relabel.mode, 'sets': {}}
  if config.relabel.mode == 'stored':
    mesh = batching.create_mesh(config.mesh_shape)
    model, teacher = teacher_lib.load(config, workdir, mesh)
    logits_fn = student.create_teacher_logits(model, teacher, mesh)
    for name, (images, _) in sets.items():
      schedule = views.create_schedule(config, len(images))
      batching.check_batch_size(schedule.batch_size, mesh, 'relabel.batch_size')
      manifest = label_store.write_labels(
          label_store.label_dir(workdir, name), images, schedule, config.relabel, spec,
          logits_fn, mesh, config.evaluate.temperature)
      result['sets'][name] = {'label_bytes': manifest['bytes'],
                              'image_bytes': int(images.nbytes),
                              'storage': manifest['storage'], 'topk': manifest['topk']}
      logging.info('relabel: %s labels %d bytes (%s)', name, manifest['bytes'],
                   manifest['storage'])
  result['wall_seconds'] = time.time() - start
  files.write_json(os.path.join(workdir, 'relabel', 'result.json'), result)
  return result
