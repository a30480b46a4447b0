"""DD-Ranking's HLR / IOR / LRS in the report, from the report's own numbers, and the
full-data student trained once and reused (evaluate.baselines 'full_data')."""

import math
import os
import shutil

import numpy as np
import pytest

from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import image_sets
from sre2l_jax import report
from sre2l_jax.data import datasets
import testlib

SPEC = datasets.get_spec('fashion_mnist')
IPC = 2


def make_config(data, full_data_dir):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.dataset.update(data_dir=data['data_dir'], source_dir=data['source_dir'])
  config.teacher.width = config.student.width = 8
  config.recover.ipc = IPC
  config.student.epochs = 2
  config.evaluate.update(seeds=2, baselines=('random', 'hard_label', 'full_data'),
                         full_data_dir=full_data_dir)
  return config


def write_run(config, workdir, seed):
  testlib.write_teacher(config, workdir)
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (10 * IPC,) + SPEC.image_shape, np.uint8)
  export.write_tfds(image_sets.distilled_dir(workdir), images,
                    np.repeat(np.arange(10), IPC).astype(np.int32), 10)


def hand_lrs(v):
  """The documentation's formulas, seed by seed, in plain Python."""
  out = []
  for seed in range(2):
    hlr = v['full_hard']['test_top1'][seed] - v['distilled_hard']['test_top1'][seed]
    ior = v['distilled']['test_top1'][seed] - v['random']['test_top1'][seed]
    alpha = 0.5 * ior - 0.5 * hlr
    out.append((hlr, ior, 100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))))
  return out


@pytest.mark.slow  # ~30 s: three stacks of students of two seeds
def test_hlr_ior_lrs_equal_a_hand_computation_and_full_data_is_reused(tmp_path):
  data = testlib.cut_fashion_mnist(tmp_path, train=200, test=100)
  full_dir = str(tmp_path / 'full')
  first = str(tmp_path / 'first')
  config = make_config(data, full_dir)
  write_run(config, first, seed=0)
  result = testlib.run_stage(evaluate, config, first)
  ranking = files.read_json(os.path.join(first, 'report.json'))['dd_ranking']
  hand = hand_lrs(result['variants'])
  for i, name in enumerate(('hard_label_recovery', 'improvement_over_random',
                            'label_robust_score')):
    np.testing.assert_allclose(ranking[name]['per_seed'], [h[i] for h in hand], rtol=1e-12)
    assert ranking[name]['mean'] == pytest.approx(np.mean([h[i] for h in hand]), rel=1e-12)
  assert ranking['hard_label_recovery']['inputs'] == 'full_hard - distilled_hard'
  assert ranking['improvement_over_random']['inputs'] == 'distilled - random'
  # The full-data student: the whole (cut) training split, hard labels, under full_dir.
  full = result['variants']['full_hard']
  assert full['images'] == 200 and full['labels'] == 'hard'
  seed_result = os.path.join(first, full['dir'], 'seed0', 'result.json')
  assert os.path.realpath(seed_result).startswith(os.path.realpath(full_dir))
  with open(os.path.join(first, 'report.md')) as f:
    assert 'hard label recovery' in f.read()

  # Another workdir (its own students already there: a copy) of the same dataset, student
  # and protocol: the full-data students are read from full_dir, not trained again.
  second = str(tmp_path / 'second')
  shutil.copytree(first, second)
  before = os.stat(seed_result).st_mtime_ns
  again = testlib.run_stage(evaluate, config, second)
  assert again['variants']['full_hard']['test_top1'] == full['test_top1']
  assert os.stat(seed_result).st_mtime_ns == before
  assert not os.path.exists(os.path.join(second, 'evaluate', evaluate.FULL_DATA))


def test_dd_ranking_leaves_out_what_was_not_evaluated():
  v = {'distilled': {'test_top1': [0.5]}, 'random': {'test_top1': [0.4]}}
  ranking = report.dd_ranking(v)
  assert set(ranking) == {'improvement_over_random'}
  assert ranking['improvement_over_random']['mean'] == pytest.approx(0.1)
  assert evaluate.FULL_DATA == report.DD_RANKING_INPUTS['hard_label_recovery'][0]
