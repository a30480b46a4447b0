"""`fingerprints` computes every record a workdir keeps to the bytes of c0f06d5 (issue 29):
tests/data/fingerprints_c0f06d5.json, made there by tests/data/make_fingerprints.py."""

import json
import os
import sys

import pytest

from sre2l_jax import class_stats
from sre2l_jax import continual
from sre2l_jax import evaluate
from sre2l_jax import fingerprints
from sre2l_jax import image_sets
from sre2l_jax import label_store
from sre2l_jax import teacher
from sre2l_jax.data import datasets

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
sys.path.insert(0, DATA)
import make_fingerprints  # pylint: disable=g-import-not-at-top,wrong-import-position

with open(os.path.join(DATA, 'fingerprints_c0f06d5.json')) as f:
  BEFORE = json.load(f)


def records(config) -> dict:
  """make_fingerprints.records, by the code of this commit."""
  m = make_fingerprints
  spec = datasets.get_spec(config.dataset.name)
  images_sha256 = label_store.images_digest(m.IMAGES)
  out = {'squeeze': fingerprints.record('squeeze', config),
         'recover': fingerprints.record('recover', config,
                                        **{image_sets.TEACHER_KEY: m.TEACHER_DIGEST}),
         'recover_without_teacher': fingerprints.record('recover', config),
         'teacher_meta': teacher.teacher_meta(config, spec)}
  stats = fingerprints.record('class_stats', config,
                              teacher_weights_sha256=class_stats.weights_digest(m.VARIABLES),
                              num_classes=spec.num_classes)
  out['class_stats'] = stats
  out['class_stats_file'] = class_stats.file_name(stats)
  out['label_settings'] = fingerprints.record('labels', config)
  for name in ('distilled', 'random', 'coreset'):
    out[f'label_dir/{name}'] = label_store.label_dir(config, m.WORKDIR, name)
  for name, _, hard in evaluate.variants(config):
    for arch, student_cfg in evaluate.student_configs(config):
      settings = evaluate.student_settings(config, hard, m.IMAGES, student_cfg)
      out[f'evaluate/{name}/{arch}'] = settings
      out[f'evaluate_dir/{name}/{arch}'] = evaluate.variant_dir(
          m.WORKDIR, name, settings, config.evaluate.full_data_dir)
  order = continual.class_order(config, spec.num_classes)
  for name in continual.SETS:
    out[f'continual/{name}'] = fingerprints.record(
        'continual', config, set=name, class_order=order, images_sha256=images_sha256)
  return m.normalised(out)


@pytest.mark.parametrize('case', make_fingerprints.CASES,
                         ids=lambda c: make_fingerprints.case_name(*c))
def test_records_are_those_of_c0f06d5(case):
  name = make_fingerprints.case_name(*case)
  now = records(make_fingerprints.load(*case))
  assert json.dumps(now, sort_keys=True) == json.dumps(BEFORE[name], sort_keys=True)


def test_every_case_was_recorded():
  assert sorted(BEFORE) == sorted(make_fingerprints.case_name(*c) for c in make_fingerprints.CASES)


def test_a_key_added_at_its_old_default_is_left_out():
  config = make_fingerprints.load('fashion_mnist_ipc10', 'smoke', {})
  assert 'init_pick' not in fingerprints.record('recover', config)['recover']
  config.recover.scored.pick = 'centre'
  assert fingerprints.record('recover', config)['recover']['init_pick'] == 'centre'
  assert 'init_kmeans_iterations' not in fingerprints.record('recover', config)['recover']
  config.recover.scored.iterations = 100
  assert fingerprints.record('recover', config)['recover']['init_kmeans_iterations'] == 100
  soft = fingerprints.record('student', config)
  assert 'loss' not in soft and 'ce_weight' not in soft  # ce_weight goes with loss
  config.evaluate.loss = 'mse_ce'
  assert {'loss', 'ce_weight'} <= set(fingerprints.record('student', config))
