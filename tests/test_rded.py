"""RDED (synthesis/rded.py): selection, stitching layout, scores, and the whole method on a
random teacher (the same images on 1 and 8 devices)."""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sre2l_jax import config_lib
from sre2l_jax import export
from sre2l_jax import runner
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import rngs
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.synthesis import rded

import testlib


def test_select_takes_each_sources_best_crop_then_the_best_sources():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(20, 3))
  candidates, crops = rded.select(scores, 5)
  best = scores.max(axis=1)
  assert len(set(candidates.tolist())) == 5  # one crop per source image
  np.testing.assert_array_equal(candidates, np.argsort(-best)[:5])
  np.testing.assert_array_equal(crops, scores[candidates].argmax(axis=1))
  assert np.all(np.diff(scores[candidates, crops]) <= 0)  # best first


@pytest.mark.parametrize('factor,size', [(2, 5), (3, 7), (1, 4)])
def test_stitch_layout(factor, size):
  ipc, channels = 3, 2
  cells = rded.cell_bounds(size, factor)
  assert sum(length for _, length in cells) == size
  assert [length for _, length in cells] == sorted((length for _, length in cells),
                                                    reverse=True)
  p = rded.patch_size(size, factor)
  # Patch r is constant r + 1 (resizing keeps it), so every cell names its patch.
  patches = np.broadcast_to(np.arange(1, ipc * factor**2 + 1, dtype=np.float32)[
      :, None, None, None], (ipc * factor**2, p, p, channels))
  out = np.asarray(rded.stitch(patches, factor, ipc, (size, size, channels)))
  assert out.shape == (ipc, size, size, channels)
  for t in range(ipc):
    for i, (top, h) in enumerate(cells):
      for j, (left, w) in enumerate(cells):
        k = i * factor + j
        np.testing.assert_array_equal(out[t, top:top + h, left:left + w], k * ipc + t + 1)
  if factor == 1:  # whole crops, untouched
    np.testing.assert_array_equal(out, patches)


def test_pad_to_centres():
  x = jnp.ones((1, 3, 2, 1))
  y = np.asarray(rded.pad_to(x, 6, 5))
  assert y.shape == (1, 6, 5, 1) and y.sum() == 6
  np.testing.assert_array_equal(y[0, 1:4, 1:3, 0], 1)


def _setup(factor):
  config = config_lib.base_config()
  config.teacher.update(width=4, depth=2)
  config.recover.update(method='rded', ipc=2, min_scale=0.3,
                        rded=dict(candidates=10, crops=3, factor=factor))
  spec = datasets.get_spec('fashion_mnist')
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (60,) + spec.image_shape, dtype=np.uint8)
  labels = np.repeat(np.arange(3), 20).astype(np.int32)
  model = models.create_model(config.teacher, spec.num_classes)
  teacher = model.init(jax.random.key(3), jnp.zeros((1,) + spec.image_shape))
  return config, spec, pipeline.InMemorySplit(images, labels), model, teacher


def test_scores_are_minus_cross_entropy_of_the_padded_crop():
  config, spec, train, model, teacher = _setup(2)
  mesh = batching.create_mesh(8)
  scorer = rded.create_scorer(model, spec, config.recover, mesh)
  images = train.images[:8]
  labels = np.array([4, 4, 1, 4, 0, 4, 4, 2], np.int32)
  crops, scores = scorer(teacher, images, labels, np.arange(8, dtype=np.int32),
                         jax.random.key(5))
  assert crops.shape == (8, 3, 14, 14, 1)
  padded = rded.pad_to(np.asarray(crops).reshape(24, 14, 14, 1), 28, 28)
  logits = model.apply(teacher, padded)
  expected = -optax.softmax_cross_entropy_with_integer_labels(logits, np.repeat(labels, 3))
  np.testing.assert_allclose(np.asarray(scores).ravel(), expected, rtol=1e-5, atol=1e-5)
  # A candidate's crops depend on its (class, rank) only, not on the batch around it.
  alone, _ = scorer(teacher, np.repeat(images[2:3], 8, 0), np.full(8, 1, np.int32),
                    np.full(8, 2, np.int32), jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(alone)[0], np.asarray(crops)[2])


@pytest.mark.equivalence
@pytest.mark.parametrize('factor', [1, 2])
def test_synthesize_same_on_1_and_8_devices(factor):
  config, spec, train, model, teacher = _setup(factor)
  outs = [rded.synthesize(config, spec, model=model, teacher=teacher, train=train,
                          num_classes=3, mesh=batching.create_mesh(n)) for n in (1, 8)]
  assert outs[0].shape == (3, 2) + spec.image_shape and outs[0].dtype == np.uint8
  np.testing.assert_allclose(outs[0].astype(int), outs[1].astype(int), atol=1)
  again = rded.synthesize(config, spec, model=model, teacher=teacher, train=train,
                          num_classes=3, mesh=batching.create_mesh(8))
  np.testing.assert_array_equal(again, outs[1])  # deterministic for a seed


def test_synthesize_scores_candidates_as_they_come_whatever_the_batch():
  """The pass keeps scores, not images: candidates handed over 7 at a time (mixed classes)
  give the same images as every candidate scored at once (the reference below)."""
  config, spec, train, model, teacher = _setup(2)
  mesh = batching.create_mesh(1)
  whole = rded.synthesize(config, spec, model=model, teacher=teacher, train=train,
                          num_classes=3, mesh=mesh)
  small = testlib.BatchesOnly(train)
  out = rded.synthesize(config, spec, model=model, teacher=teacher, train=small,
                        num_classes=3, mesh=mesh, batch_size=7)
  np.testing.assert_array_equal(out, whole)
  # A batch of 7, or the ipc * f^2 = 8 chosen of a class read again; never all 30 candidates.
  assert small.most == 8
  # Reference: every candidate's crops and scores at once, the best ipc * f^2 stitched.
  cfg = config.recover
  images, labels = train.class_balanced_subset(
      3, cfg.rded.candidates, rngs.numpy_rng('rded_candidates', config.seed))
  scorer = rded.create_scorer(model, spec, cfg, mesh)
  ranks = np.tile(np.arange(cfg.rded.candidates), 3).astype(np.int32)
  crops, scores = scorer(teacher, images, labels, ranks, rngs.stream_key(config.seed,
                                                                          'rded_crops'))
  crops, scores = np.asarray(crops), np.asarray(scores)
  for c in range(3):
    rows = slice(c * cfg.rded.candidates, (c + 1) * cfg.rded.candidates)
    source, crop = rded.select(scores[rows], 8)
    patches = crops[rows][source, crop]
    np.testing.assert_array_equal(
        out[c], datasets.denormalise(rded.stitch(patches, 2, 2, spec.image_shape), spec))


def test_too_few_candidates_name_the_setting_to_lower():
  config, spec, train, model, teacher = _setup(1)
  config.recover.rded.candidates = 21  # 20 images per class
  with pytest.raises(ValueError, match=r'^recover.rded.candidates: 21 training images of every '
                                       r'class are needed; 3 classes .* Lower '
                                       r'recover.rded.candidates.$'):
    rded.synthesize(config, spec, model=model, teacher=teacher, train=train, num_classes=3,
                    mesh=batching.create_mesh(1))


def test_validate():
  cfg = ml_collections.ConfigDict(dict(ipc=10, rded=dict(candidates=39, crops=5, factor=2)))
  with pytest.raises(ValueError, match='rded.candidates'):
    rded.validate(cfg)
  cfg.rded.candidates = 40
  rded.validate(cfg)


def test_in1k_rded_config_has_rded_settings_and_passes_the_stage_checks():
  for arg in (None, 'smoke', 'ipc=50'):
    config = testlib.load_config('in1k_rded', arg)
    recover.validate(config, testlib.context_of(config,
                                                spec=datasets.get_spec(config.dataset.name)))
    rded.validate(config.recover)
    assert config.recover.method == 'rded'
  r = testlib.load_config('in1k_rded').recover
  assert (r.ipc, r.rded.candidates, r.rded.crops, r.rded.factor, r.min_scale, r.max_scale) == (
      10, 300, 5, 2, 0.08, 1.0)
  config = testlib.load_config('in1k_rded')
  assert (config.student.epochs, config.student.batch_size, config.evaluate.lr,
          config.evaluate.temperature) == (300, 100, 1e-3, 20.0)
  assert testlib.load_config('in1k_rded', 'ipc=50').student.batch_size == 200
  # Settings of the optimisation RDED does not run are refused, not silently ignored.
  for key, value in (('refine_fraction', 0.5), ('r_ce', 0.0), ('diversity', 'early_late')):
    config = testlib.load_config('in1k_rded')
    config.recover[key] = value
    with pytest.raises(ValueError, match=f"optimises nothing, so recover.{key}={value!r}"):
      recover.check_settings(config, datasets.get_spec(config.dataset.name))


def test_in1k_rded_smoke_recovers_at_224(tmp_path):
  """recover with in1k_rded:smoke on 224 x 224 images (random, 8 per class; the mock
  ImageNet's random labels rarely cover a class) and a random ResNet-18 teacher."""
  config = testlib.load_config('in1k_rded', 'smoke')
  workdir = str(tmp_path)
  testlib.write_teacher(config, workdir)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 224, 224, 3), dtype=np.uint8)
  split = pipeline.InMemorySplit(images, np.repeat(np.arange(2), 8).astype(np.int32))
  with mock.patch.object(pipeline, 'load_split', lambda *_: split):
    result = testlib.run_stage(recover, config, workdir)
  assert result['method'] == 'rded' and result['images'] == 2
  testlib.assert_share_of(result['teacher_top1_on_synthetic'], 2)  # of the 2 images
  out, labels = export.read_tfds(export.tfds_dataset_dir(result['outputs']['tfds']))
  assert out.shape == (2, 224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1])
  assert os.path.exists(os.path.join(workdir, 'recover', 'grid.png'))
  # A run killed before its result.json starts again and makes the same images.
  os.remove(os.path.join(workdir, 'recover', 'result.json'))
  with mock.patch.object(pipeline, 'load_split', lambda *_: split):
    again = testlib.run_stage(recover, config, workdir)
  np.testing.assert_array_equal(
      export.read_tfds(export.tfds_dataset_dir(again['outputs']['tfds']))[0], out)


def test_squeeze_and_recover_refuse_too_many_rded_candidates_before_squeeze(data, tmp_path):
  """recover.rded.candidates over a class's training images is refused by main's up-front
  check (runner.validate), before squeeze trains (or writes) anything."""
  config = testlib.fashion_config(data)
  config.recover.update(method='rded', ipc=1, rded=dict(factor=1, candidates=1000))
  workdir = str(tmp_path / 'run')
  with pytest.raises(ValueError, match=r'^recover.rded.candidates: 1000 training images of '
                                       r'every class are needed;.* Lower '
                                       r'recover.rded.candidates.$'):
    runner.run(config, workdir, ['squeeze', 'recover'])
  assert not os.path.exists(workdir)
