"""Synthesis methods beyond SRe2L: per-class BN statistics, the edc loss on groups of one
class, the one-class group layout, teacher-scored selection, DELT's early-late mask, and
SIGKILL + resume of an edc run.

Teachers are random ConvNet-BNs of width 8 (`testlib.random_teacher`); nothing is trained.
"""

import json
import os
import shlex
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sre2l_jax import class_stats
from sre2l_jax import config_lib
from sre2l_jax import evaluate
from sre2l_jax import export
from sre2l_jax import files
from sre2l_jax import fingerprints
from sre2l_jax import models
from sre2l_jax import recover
from sre2l_jax import rngs
from sre2l_jax import teacher as teacher_lib
from sre2l_jax import synthesis
from sre2l_jax.data import batching
from sre2l_jax.data import datasets
from sre2l_jax.data import pipeline
from sre2l_jax.synthesis import candidates
from sre2l_jax.synthesis import diversity
from sre2l_jax.synthesis import edc
from sre2l_jax.synthesis import optimize
from sre2l_jax.synthesis import selection
from sre2l_jax.synthesis import sre2l

import testlib

SPEC = datasets.get_spec('fashion_mnist')


def small_config(**recover_overrides):
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.teacher.width = 8
  config.recover.update(**recover_overrides)
  return config


def read_set(result):
  """A recover result's distilled set: (uint8 images, labels) from its TFDS export."""
  return export.read_tfds(export.tfds_dataset_dir(result['outputs']['tfds']))


def layer_of(path):
  """A BN-input path ('bn0_input') -> the BN layer's path in batch_stats ('bn0')."""
  return path[:-1] + (path[-1][:-len('_input')],)


def at(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def random_class_stats(variables, num_classes, seed=0):
  """Per-class statistics (K, C) per BN layer, random but plausible (var > 0)."""
  rng = np.random.default_rng(seed)
  out = {}
  for path in class_stats.layer_paths(variables['batch_stats']):
    channels = at(variables['batch_stats'], path)['mean'].shape[0]
    leaf = {'mean': jnp.asarray(rng.normal(0, 0.5, (num_classes, channels)), jnp.float32),
            'var': jnp.asarray(rng.uniform(0.2, 2.0, (num_classes, channels)), jnp.float32)}
    leaf['within_var'] = leaf['var'] * jnp.asarray(rng.uniform(0.2, 0.9, (num_classes, channels)),
                                                   jnp.float32)
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


# ----------------------------------------------------------------------------- class stats


def test_class_statistics_equal_a_numpy_computation():
  config = small_config()
  model, variables = testlib.random_teacher(config, statistics='random')
  rng = np.random.default_rng(0)
  # 37 images of classes 0..3 only, batches of 16: the last batch is padded (mask) and
  # classes 4..9 have no image.
  images = rng.integers(0, 256, (37,) + SPEC.image_shape, dtype=np.uint8)
  labels = rng.integers(0, 4, 37).astype(np.int32)
  stats = class_stats.compute(model, variables, pipeline.InMemorySplit(images, labels), 10,
                              SPEC, batching.create_mesh(8), batch_size=16)

  _, state = model.apply(variables, datasets.normalise(images, SPEC), train=False,
                         mutable=[models.BN_INPUTS])
  layers = 0
  for path, x in models.iter_in_call_order(state[models.BN_INPUTS]):
    x = np.asarray(x, np.float64)
    got, running = at(stats, layer_of(path)), at(variables['batch_stats'], layer_of(path))
    for k in range(4):
      mine = x[labels == k]
      np.testing.assert_allclose(got['mean'][k], mine.mean(axis=(0, 1, 2)), rtol=1e-4,
                                 atol=1e-5)
      np.testing.assert_allclose(got['var'][k], mine.var(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(got['within_var'][k], mine.var(axis=(1, 2)).mean(0),
                                 rtol=1e-4, atol=1e-5)
      assert np.all(got['within_var'][k] <= got['var'][k] * (1 + 1e-4) + 1e-5)
      assert got['count'][k] == mine.shape[0] * mine.shape[1] * mine.shape[2]
    for k in range(4, 10):  # no image: the running statistics
      np.testing.assert_array_equal(got['mean'][k], np.asarray(running['mean']))
      np.testing.assert_array_equal(got['var'][k], np.asarray(running['var']))
      np.testing.assert_array_equal(got['within_var'][k], np.asarray(running['var']))
      assert got['count'][k] == 0
    layers += 1
  assert layers == 3  # depth 3 ConvNet-BN


def test_class_statistics_are_stored_beside_the_teacher_and_read_back(tmp_path, monkeypatch):
  config = small_config()
  model, variables = testlib.random_teacher(config, statistics='random')
  del model
  teacher_dir, fallback = tmp_path / 'teacher', tmp_path / 'recover'
  teacher_dir.mkdir()
  (teacher_dir / 'teacher.json').write_text('{}')  # stands for the teacher's own files
  rng = np.random.default_rng(1)
  split = pipeline.InMemorySplit(rng.integers(0, 256, (24,) + SPEC.image_shape, np.uint8),
                                 np.arange(24, dtype=np.int32) % 10)
  config.squeeze.eval_batch_size = 8
  mesh = batching.create_mesh(8)
  first = class_stats.load_or_compute(config, variables, lambda: split, str(teacher_dir),
                                      str(fallback), mesh)
  written = sorted(os.listdir(teacher_dir))
  assert written[0].startswith('class_stats-') and written[1] == 'teacher.json'
  assert (teacher_dir / 'teacher.json').read_text() == '{}'

  def no_compute(*args, **kwargs):
    raise AssertionError('recomputed although stored')

  monkeypatch.setattr(class_stats, 'compute', no_compute)
  again = class_stats.load_or_compute(config, variables, lambda: split, str(teacher_dir),
                                      str(fallback), mesh)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  # A file stored before the within-image variance existed is computed again, and
  # replaced by one that has it.
  monkeypatch.undo()
  name = next(n for n in os.listdir(teacher_dir) if n.startswith('class_stats-'))
  expected = json.loads(bytes(np.load(teacher_dir / name)['__fingerexpected_']).decode())
  older = jax.tree_util.tree_map(lambda a: a, class_stats.load(str(teacher_dir / name),
                                                               expected))
  for _, layer in class_stats._layers(older):  # pylint: disable=protected-access
    del layer['within_var']
  class_stats.save(str(teacher_dir / name), older, expected)
  assert class_stats.load(str(teacher_dir / name), expected) is None
  again = class_stats.load_or_compute(config, variables, lambda: split, str(teacher_dir),
                                      str(fallback), mesh)
  jax.tree_util.tree_map(np.testing.assert_array_equal, first, again)
  assert class_stats.load(str(teacher_dir / name), expected) is not None
  monkeypatch.setattr(class_stats, 'compute', no_compute)
  # Another teacher (other weights) does not read them.
  other = jax.tree_util.tree_map(lambda x: x + 1, variables)
  with pytest.raises(AssertionError, match='recomputed'):
    class_stats.load_or_compute(config, other, lambda: split, str(teacher_dir), str(fallback),
                                mesh)


# ----------------------------------------------------------------------------- edc loss


def edc_inputs(label=3, group=4, seed=0):
  config = small_config(method='edc', edc=dict(class_bn_weight=0.5), r_bn=1.0)
  model, variables = testlib.random_teacher(config, statistics='random')
  teacher = dict(variables, **{class_stats.KEY: random_class_stats(variables, 10, seed)})
  images = jax.random.normal(jax.random.key(seed), (group,) + SPEC.image_shape)
  labels = jnp.full((group,), label, jnp.int32)
  uids = jnp.arange(group, dtype=jnp.int32) * 10 + label
  return config, model, teacher, images, labels, uids


def edc_loss(config, model, teacher, images, labels, uids):
  loss, metrics = edc.group_loss(images, labels, uids, jax.random.key(7), jnp.float32(0.5),
                                 model=model, teacher=teacher, cfg=config.recover)
  return float(loss), metrics


def test_groups_of_one_class_use_only_that_class_statistics():
  config, model, teacher, images, labels, uids = edc_inputs(label=3)
  reference, metrics = edc_loss(config, model, teacher, images, labels, uids)
  assert float(metrics['bn_loss_class']) > 0 and float(metrics['bn_loss_global']) > 0

  def shifted(classes):
    moved = jax.tree_util.tree_map(
        lambda a: a.at[np.asarray(classes)].add(1.0), teacher[class_stats.KEY])
    return dict(teacher, **{class_stats.KEY: moved})

  others = [k for k in range(10) if k != 3]
  assert edc_loss(config, model, shifted(others), images, labels, uids)[0] == reference
  assert edc_loss(config, model, shifted([3]), images, labels, uids)[0] != reference

  # The class term is the layer loss against class 3's statistics, by hand.
  _, state = model.apply(
      {k: teacher[k] for k in ('params', 'batch_stats')},
      sre2l.augment_group(jax.random.key(7), images, uids, cfg=config.recover,
                          min_scale=jnp.float32(0.5)),
      train=False, mutable=[models.BN_INPUTS])
  terms = [sre2l.layer_bn_loss(x, {k: v[3] for k, v in
                                   at(teacher[class_stats.KEY], layer_of(p)).items()})
           for p, x in models.iter_in_call_order(state[models.BN_INPUTS])]
  by_hand, _ = sre2l.weighted_bn_loss(jnp.stack(terms), config.recover.first_bn_multiplier)
  np.testing.assert_allclose(float(metrics['bn_loss_class']), float(by_hand), rtol=1e-6)


def test_class_term_per_class_matches_each_class_of_a_mixed_group_to_its_own():
  """edc.class_term='per_class': in a group of several classes each class's images against
  their class's statistics (mean and variance over their (n_c, H, W)), averaged over the
  classes present; on a one-class group it is the 'group' term. class_var='expected':
  pooled - (pooled - within) / n_c."""
  config, model, teacher, _, _, _ = edc_inputs(group=6)
  images = jax.random.normal(jax.random.key(3), (6,) + SPEC.image_shape)
  labels = jnp.asarray([2, 5, 2, 7, 2, 5], jnp.int32)
  uids = jnp.arange(6, dtype=jnp.int32) * 10 + labels
  x = sre2l.augment_group(jax.random.key(7), images, uids, cfg=config.recover,
                          min_scale=jnp.float32(0.5))
  _, state = model.apply({k: teacher[k] for k in ('params', 'batch_stats')}, x, train=False,
                         mutable=[models.BN_INPUTS])
  stats_of = lambda p: {k: np.asarray(v, np.float64)
                        for k, v in at(teacher[class_stats.KEY], layer_of(p)).items()}

  def by_hand(class_var):
    terms = []
    for p, inputs in models.iter_in_call_order(state[models.BN_INPUTS]):
      inputs, stats, per_class = np.asarray(inputs, np.float64), stats_of(p), []
      for c in (2, 5, 7):
        mine = inputs[np.asarray(labels) == c]
        target = stats['var'][c]
        if class_var == 'expected':
          target = target - (target - stats['within_var'][c]) / len(mine)
        per_class.append(np.linalg.norm(mine.mean(axis=(0, 1, 2)) - stats['mean'][c]) +
                         np.linalg.norm(mine.var(axis=(0, 1, 2)) - target))
      terms.append(np.mean(per_class))
    return float(sre2l.weighted_bn_loss(jnp.asarray(terms, jnp.float32),
                                        config.recover.first_bn_multiplier)[0])

  for class_var in ('pooled', 'expected'):
    config.recover.edc.update(class_term='per_class', class_var=class_var)
    _, metrics = edc_loss(config, model, teacher, images, labels, uids)
    np.testing.assert_allclose(float(metrics['bn_loss_class']), by_hand(class_var), rtol=1e-5)
  # 'expected' moves only the variance target: one image of a class against its mean
  # within-image variance, not the class's pooled variance.
  assert by_hand('expected') != by_hand('pooled')

  # A one-class group: 'per_class' is the 'group' term, for either variance target.
  config, model, teacher, images, labels, uids = edc_inputs(label=4, group=3)
  for class_var in ('pooled', 'expected'):
    config.recover.edc.update(class_term='group', class_var=class_var)
    group, _ = edc_loss(config, model, teacher, images, labels, uids)
    config.recover.edc.class_term = 'per_class'
    per_class, _ = edc_loss(config, model, teacher, images, labels, uids)
    np.testing.assert_allclose(per_class, group, rtol=1e-5)
  # Unknown values are refused by name; the defaults leave old workdirs' records unchanged.
  for key, bad in (('class_term', 'each'), ('class_var', 'within')):
    config.recover.edc.update(class_term='group', class_var='pooled')
    config.recover.edc[key] = bad
    with pytest.raises(ValueError, match=f'recover.edc.{key}'):
      edc.validate(config.recover)
  config.recover.edc.update(class_term='group', class_var='pooled')
  record = fingerprints.record('recover', config)['recover']
  assert 'edc_class_term' not in record and 'edc_class_var' not in record
  config.recover.edc.class_var = 'expected'
  assert fingerprints.record('recover', config)['recover']['edc_class_var'] == 'expected'


def test_class_weight_zero_is_the_sre2l_loss():
  config, model, teacher, images, labels, uids = edc_inputs()
  config.recover.edc.class_bn_weight = 0.0
  loss, _ = edc_loss(config, model, teacher, images, labels, uids)
  plain = {k: teacher[k] for k in ('params', 'batch_stats')}
  expected, _ = sre2l.group_loss(images, labels, uids, jax.random.key(7), jnp.float32(0.5),
                                 model=model, teacher=plain, cfg=config.recover)
  np.testing.assert_allclose(loss, float(expected), rtol=1e-6)
  assert synthesis.get_method('edc') is edc.METHOD and edc.METHOD.needs_class_stats


def test_cross_entropy_weight_scales_only_the_cross_entropy():
  """recover.r_ce weighs the CE term of sre2l's and edc's loss, nothing else: at 0 the loss
  is r_bn x the BN loss; both zero is refused; at 1 old workdirs' records are unchanged."""
  config, model, teacher, images, labels, uids = edc_inputs()
  plain = {k: teacher[k] for k in ('params', 'batch_stats')}
  for method, variables in ((sre2l, plain), (edc, teacher)):
    for weight in (0.0, 1.0, 2.5):
      config.recover.r_ce = weight
      loss, metrics = method.group_loss(images, labels, uids, jax.random.key(7),
                                        jnp.float32(0.5), model=model, teacher=variables,
                                        cfg=config.recover)
      assert float(metrics['ce']) > 0.1
      np.testing.assert_allclose(
          float(loss), weight * float(metrics['ce']) + config.recover.r_bn *
          float(metrics['bn_loss']), rtol=1e-6)
  config.recover.r_ce = 1.0
  assert 'r_ce' not in fingerprints.record('recover', config)['recover']
  config.recover.r_ce = 0.0
  assert fingerprints.record('recover', config)['recover']['r_ce'] == 0.0
  recover.check_settings(config, SPEC)
  config.recover.r_bn = 0.0
  with pytest.raises(ValueError, match=r'r_ce \+ r_bn > 0'):
    recover.check_settings(config, SPEC)


# ----------------------------------------------------------------------------- layout


def test_one_class_layout_covers_every_image_once_and_exports_class_major():
  num_classes, ipc, size = 10, 4, 2
  labels, uids, real = optimize.group_layout(num_classes, ipc, size, 8, by_class=True)
  assert real == 20 and labels.shape == uids.shape == (24, size)
  assert (labels[:real] == labels[:real, :1]).all()  # one class per group
  pairs = {(int(c), int(u) // num_classes) for c, u in zip(labels[:real].ravel(),
                                                           uids[:real].ravel())}
  assert pairs == {(c, i) for c in range(num_classes) for i in range(ipc)}
  np.testing.assert_array_equal(uids[:real] % num_classes, labels[:real])
  assert uids[real:].min() >= num_classes * ipc  # padding ids repeat no real image's
  major = optimize.to_class_major(uids[:real], num_classes, ipc, by_class=True)
  np.testing.assert_array_equal(major, np.arange(ipc)[None] * num_classes +
                                np.arange(num_classes)[:, None])
  # The default layout keeps its ids (i * C + c) and its export.
  labels, uids, real = optimize.group_layout(num_classes, ipc, 5, 8)
  np.testing.assert_array_equal(optimize.to_class_major(uids[:real], num_classes, ipc),
                                major)
  np.testing.assert_array_equal(labels, uids % num_classes)
  # Groups of every class at 2 ipc indices (B = 2 C): each class twice per group, the same ids
  # and export; a B that does not tile the set is refused.
  labels, uids, real = optimize.group_layout(num_classes, ipc, 2 * num_classes, 8)
  assert real == 2 and labels.shape == (8, 20)
  for g in range(real):
    np.testing.assert_array_equal(np.bincount(labels[g], minlength=num_classes), 2)
    np.testing.assert_array_equal(uids[g] // num_classes, np.repeat([2 * g, 2 * g + 1], 10))
  np.testing.assert_array_equal(optimize.to_class_major(uids[:real], num_classes, ipc),
                                major)
  assert uids[real:].min() >= num_classes * ipc
  fits = lambda size: recover.mixed_group_size_fits(size, num_classes, ipc)
  assert [s for s in range(0, 50) if fits(s)] == [1, 2, 5, 10, 20, 40]
  config = small_config(ipc=4, group_by='ipc_index', batch_size=30)
  with pytest.raises(ValueError, match=r'batch_size=30 .* 10 x m with m dividing ipc=4'):
    recover.validate(config, testlib.context_of(config, spec=SPEC))
  config.recover.batch_size = 20
  recover.validate(config, testlib.context_of(config, spec=SPEC))


# ----------------------------------------------------------------------------- selection


def test_selection_returns_the_top_scored_candidates_one_per_source_image():
  rng = np.random.default_rng(0)
  sources = np.repeat(np.arange(8), 3)  # 8 images, 3 crops each
  scores = rng.permutation(len(sources)) / len(sources)
  chosen = selection.select(scores, sources, 4)
  best_of = {s: np.flatnonzero(sources == s)[np.argmax(scores[sources == s])]
             for s in range(8)}
  ranked = sorted(best_of.values(), key=lambda i: -scores[i])
  np.testing.assert_array_equal(chosen, ranked[:4])
  assert len(set(sources[chosen])) == 4

  # Coverage: three far-apart clusters of sources; the best-scored of each, one per source.
  centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
  cluster = np.repeat(np.arange(8) % 3, 3)
  features = centres[cluster] + rng.normal(0, 1, (len(sources), 2))
  chosen = selection.select(scores, sources, 3, features, np.random.default_rng(0))
  assert sorted(cluster[chosen]) == [0, 1, 2]
  for i in chosen:
    mates = np.flatnonzero(cluster == cluster[i])
    assert scores[i] == scores[mates].max()
  assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
  with pytest.raises(ValueError, match='scored.candidates'):
    selection.select(scores, sources, 9)

  # pick 'centre': of each cluster the source whose best candidate is nearest the mean of
  # the cluster's sources' best candidates (the coreset's choice), whatever the scores.
  chosen = selection.select(scores, sources, 3, features, np.random.default_rng(0), 'centre')
  best = np.asarray(sorted(best_of.values()))
  assert sorted(cluster[chosen]) == [0, 1, 2] and len(set(sources[chosen])) == 3
  for i in chosen:
    mates = best[cluster[best] == cluster[i]]
    distance = ((features[mates] - features[mates].mean(0)) ** 2).sum(-1)
    assert i == mates[np.argmin(distance)]
  # pick 'hardest': of each cluster the source whose best candidate scores lowest.
  chosen = selection.select(scores, sources, 3, features, np.random.default_rng(0), 'hardest')
  assert sorted(cluster[chosen]) == [0, 1, 2]
  for i in chosen:
    mates = best[cluster[best] == cluster[i]]
    assert scores[i] == scores[mates].min()
  assert list(scores[chosen]) == sorted(scores[chosen], reverse=True)
  with pytest.raises(ValueError, match='scored.pick'):
    selection.select(scores, sources, 3, features, np.random.default_rng(0), 'middle')


def test_centre_pick_follows_kmeans_of_the_given_lloyd_iterations():
  """recover.scored.iterations: pick 'centre' takes each cluster's most typical member of the
  k-means that ran that many Lloyd iterations from the same seeding; more iterations leave
  the clusters tighter (Lloyd never raises the within-cluster sum of squares)."""
  rng = np.random.default_rng(1)
  features = rng.uniform(0, 1, (300, 2))
  scores, sources = rng.permutation(300) / 300, np.arange(300)

  def reference(iterations):
    centroids, assign = candidates.kmeans(features, 12, np.random.default_rng(0), iterations)
    chosen = []
    for j in range(12):
      members = np.flatnonzero(assign == j)
      chosen.append(members[np.argmin(((features[members] - features[members].mean(0)) ** 2)
                                      .sum(-1))])
    inertia = ((features - centroids[assign]) ** 2).sum()
    return np.asarray(chosen)[np.argsort(-scores[chosen], kind='stable')], inertia

  picked = {n: selection.select(scores, sources, 12, features, np.random.default_rng(0),
                                'centre', iterations=n) for n in (1, 100)}
  (one, inertia_one), (many, inertia_many) = reference(1), reference(100)
  np.testing.assert_array_equal(picked[1], one)
  np.testing.assert_array_equal(picked[100], many)
  assert set(one) != set(many) and inertia_many < inertia_one


def test_recover_refuses_scored_settings_out_of_range_or_without_effect():
  for bad in (dict(candidates=-1), dict(crops=0), dict(iterations=0)):
    config = small_config(init='scored', scored=dict(dict(candidates=12), **bad))
    with pytest.raises(ValueError, match=r'must all be in range'):
      recover.validate(config, testlib.context_of(config, spec=SPEC))
  config = small_config(init='scored', scored=dict(candidates=12, iterations=1))
  recover.validate(config, testlib.context_of(config, spec=SPEC))
  # A pick is a choice within k-means clusters (or herding's): without coverage (the top
  # ipc by score) it would be ignored, so it is refused.
  config.recover.scored.coverage = False
  recover.validate(config, testlib.context_of(config, spec=SPEC))  # pick 'score'
  for pick in ('centre', 'hardest', 'herding'):
    config.recover.scored.pick = pick
    with pytest.raises(ValueError, match=f"pick='{pick}' takes effect only with scored.coverage"):
      recover.validate(config, testlib.context_of(config, spec=SPEC))


def test_herding_keeps_the_chosen_mean_nearest_the_class_mean():
  """Herding (recover.scored.pick='herding'): each next image is the one that brings the
  chosen images' mean feature nearest the mean of all; no clusters, no random draw."""
  # Mean 5.1: 5.5 first; then (5.5 + x) / 2 nearest 5.1 wants 4.7: 4; then 5.8: 6; then
  # 4.9: 0 (4.9 away) before 10 (5.1 away).
  features = np.array([[0.0], [10.0], [4.0], [6.0], [5.5]])
  np.testing.assert_array_equal(candidates.herding(features, 4), [4, 2, 3, 0])
  # In select: over each source's best candidate, returned best-scored first, whatever rng.
  sources = np.array([0, 0, 1, 2, 3, 4])  # source 0 has two candidates, the second better
  scores = np.array([0.1, 0.9, 0.5, 0.8, 0.3, 0.2])
  feats = np.array([[50.0], [0.0], [10.0], [4.0], [6.0], [5.5]])  # row 0 is not a best
  for seed in (0, 1):
    chosen = selection.select(scores, sources, 4, feats, np.random.default_rng(seed),
                              'herding')
    np.testing.assert_array_equal(chosen, [1, 3, 4, 5])  # rows of 0 (0.9), 4, 6, 5.5


def test_scored_start_keeps_scores_and_crops_the_chosen_images_again():
  """selection.scored_images scores the candidates a chunk at a time and keeps numbers, not
  images: its starting images equal the best crops of the top-scored candidates of every
  candidate scored and cropped at once (the reference below)."""
  config = small_config(init='scored', scored=dict(candidates=6, crops=3, coverage=False),
                        ipc=2, min_scale=0.3)
  model, variables = testlib.random_teacher(config)
  data = np.random.default_rng(2)
  split = pipeline.InMemorySplit(data.integers(0, 256, (40,) + SPEC.image_shape, np.uint8),
                                 np.repeat(np.arange(4), 10).astype(np.int32))
  held = testlib.BatchesOnly(split)
  out = selection.scored_images(config, model, variables, held, 3, chunk=4)
  assert out.shape == (3, 2) + SPEC.image_shape and held.most == 4  # a chunk, never all 18

  rng = rngs.numpy_rng('recover_init_scored', config.seed)
  images, labels = split.class_balanced_subset(3, 6, rng)
  key = rngs.stream_key(config.seed, 'recover_init_crops')
  keys = jnp.concatenate([selection.crop_keys(key, i, min(4, 18 - i), 3)
                          for i in range(0, 18, 4)])
  crops = np.asarray(selection.create_crop_fn(SPEC, config.recover)(images, keys))
  scores, _ = selection.create_score_fn(model, SPEC, config.recover)(
      variables, images, labels, jax.random.key_data(keys))
  scores = np.asarray(scores)
  assert crops.shape == (18, 3) + SPEC.image_shape
  assert len({crops[0, k].tobytes() for k in range(3)}) == 3  # three different crops
  for c in range(3):
    rows = np.flatnonzero(labels == c)
    best = scores[rows].max(1)
    top = rows[np.argsort(-best, kind='stable')[:2]]
    expected = crops[top, scores[top].argmax(1)]
    np.testing.assert_array_equal(
        out[c], datasets.normalise(datasets.denormalise(expected, SPEC), SPEC))
  config.recover.scored.candidates = 11  # 10 images per class
  with pytest.raises(ValueError, match=r'^recover.scored.candidates: 11 training images of every '
                                       r'class are needed; 3 classes'):
    selection.scored_images(config, model, variables, split, 3)
  config.recover.scored.candidates = 6
  # Scored across 8 devices (chunks of 4 padded to 8): the same choice.
  spread = selection.scored_images(config, model, variables, split, 3,
                                   batching.create_mesh(8), chunk=4)
  np.testing.assert_allclose(spread, out, atol=1e-5)


def test_a_new_recover_key_at_its_old_behaviour_keeps_old_workdirs_resumable():
  config = testlib.load_config('fashion_mnist_ipc10', 'ipc=10,method=edc')
  config.recover.scored.pick = 'score'
  before = fingerprints.record('recover', config)
  assert 'init_pick' not in before['recover']  # 'score': what workdirs before it did
  config.recover.scored.pick = 'centre'
  assert fingerprints.record('recover', config)['recover']['init_pick'] == 'centre'


def test_select_exports_the_scored_start_unoptimised(data, tmp_path):
  """method='select' (the config's `method=select`): recover writes the teacher's scored
  choice of real images, bit for bit the images edc starts from, each a training image;
  a start other than 'scored' and settings of an optimisation are refused."""
  config = testlib.fashion_config(data, name='fashion_mnist_ipc10', arg='smoke,method=select')
  config.teacher.width = 8
  config.recover.ipc = 3
  assert (config.recover.method, config.recover.init, config.recover.scored.pick) == (
      'select', 'scored', 'centre')
  workdir = str(tmp_path)
  testlib.write_teacher(config, workdir)
  result = testlib.run_stage(recover, config, workdir)
  assert result['method'] == 'select' and result['images'] == 30
  images, labels = read_set(result)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 3))
  mesh = batching.create_mesh(1)
  model, variables = teacher_lib.load(config, workdir, mesh)
  start = selection.scored_images(config, model, variables,
                                  pipeline.load_split(config.dataset, 'train'), 10, mesh)
  np.testing.assert_array_equal(images, datasets.denormalise(start, SPEC).reshape(images.shape))
  train, train_labels = pipeline.load_split(config.dataset, 'train').arrays()
  for image, label in zip(images, labels):
    assert any((train[train_labels == label] == image).all((1, 2, 3)))
  config.recover.init = 'real'
  with pytest.raises(ValueError, match="set recover.init='scored'"):
    recover.check_settings(config, SPEC)
  config.recover.update(init='scored', refine_fraction=0.5)
  with pytest.raises(ValueError, match='optimises nothing'):
    recover.check_settings(config, SPEC)


# ----------------------------------------------------------------------------- diversity


def test_early_late_starts_each_stage_at_its_step():
  cfg = small_config(ipc=4, iterations=10, diversity='early_late',
                     early_late=dict(stages=2)).recover
  _, uids, _ = optimize.group_layout(3, 4, 2, 1, by_class=True)
  grads = jnp.ones(uids.shape + (2, 2, 1))
  ipc_index = uids // 3
  for step, active in ((0, ipc_index < 2), (4, ipc_index < 2), (5, ipc_index < 4)):
    masked = diversity.mask_gradients(grads, jnp.asarray(uids), step, 3, cfg)
    np.testing.assert_array_equal(np.asarray(masked)[..., 0, 0, 0], active.astype(np.float32))
  cfg.diversity = 'none'
  assert diversity.mask_gradients(grads, uids, 0, 3, cfg) is grads


def test_refine_fraction_keeps_the_best_scored_images_as_they_start():
  """refine_fraction 0.5 at ipc 4: ipc indices 0 and 1 of every class (with init 'scored'
  the best-scored) keep their pixels to the bit through Adam's steps while 2 and 3 move;
  with early-late too, an image moves only once both let it."""
  config = small_config(method='sre2l', group_by='class', ipc=4, batch_size=4, init='real',
                        lr=0.1, refine_fraction=0.5)
  cfg = config.recover
  model, teacher = testlib.random_teacher(config)
  labels, uids, _ = optimize.group_layout(SPEC.num_classes, 4, 4, 1, by_class=True)
  np.testing.assert_array_equal(diversity.refined(jnp.asarray(uids), SPEC.num_classes, cfg),
                                uids // SPEC.num_classes >= 2)
  images = np.asarray(jax.random.normal(jax.random.PRNGKey(0), uids.shape + SPEC.image_shape))
  tx = optimize.create_optimizer(cfg)
  recovery = optimize.Recovery(synthesis.get_method('sre2l'), model, cfg, tx,
                               optimize.pixel_bounds(SPEC), num_classes=SPEC.num_classes)
  step = jax.jit(lambda s: optimize.recover_step(s, labels, uids, jax.random.PRNGKey(1),
                                                 teacher, recovery))
  state = optimize.create_state(jnp.asarray(images), tx)
  for _ in range(3):
    state, _ = step(state)
  after = np.asarray(state['images'])
  kept = uids // SPEC.num_classes < 2
  np.testing.assert_array_equal(after[kept], np.clip(images[kept], *map(np.asarray,
                                                                        recovery.bounds)))
  moved = np.abs(after - images).reshape(uids.shape + (-1,)).max(-1)
  assert (moved[~kept] > 1e-2).all()
  # early-late (2 stages over 10 iterations): ipc indices 2, 3 start at step 5.
  cfg.update(diversity='early_late', iterations=10, early_late=dict(stages=2))
  grads = jnp.ones(uids.shape + (2, 2, 1))
  for at_step, active in ((0, np.zeros_like(kept)), (5, ~kept)):
    masked = diversity.mask_gradients(grads, jnp.asarray(uids), at_step, SPEC.num_classes, cfg)
    np.testing.assert_array_equal(np.asarray(masked)[..., 0, 0, 0], active.astype(np.float32))
  for bad, match in ((0.0, r'in \(0, 1\]'), (1.5, r'in \(0, 1\]')):
    cfg.refine_fraction = bad
    with pytest.raises(ValueError, match=match):
      diversity.validate(cfg)
  cfg.update(refine_fraction=0.5, init='noise')
  with pytest.raises(ValueError, match="init='noise' starts them as noise"):
    diversity.validate(cfg)


# ----------------------------------------------------------------------------- resume

WIDTH = 8
RUN = dict(method='edc', group_by='class', init='scored', scored=dict(candidates=6, crops=2),
           ipc=2, batch_size=2, iterations=12, checkpoint_every_steps=2, log_every_steps=2,
           diversity='early_late', early_late=dict(stages=2))


def edc_config(data_dir):
  config = small_config(**RUN)
  config.dataset.data_dir = str(data_dir)
  config.mesh_shape = 1
  return config


@pytest.mark.equivalence
@pytest.mark.slow
def test_edc_resumes_after_sigkill(data_dir, tmp_path):
  teacher_workdir = str(tmp_path / 'teacher')
  testlib.write_teacher(edc_config(data_dir), teacher_workdir, statistics='measured')
  overrides = {'dataset.data_dir': data_dir, 'teacher.width': WIDTH, 'mesh_shape': 1}
  overrides.update({f'recover.{k}': v for k, v in RUN.items() if not isinstance(v, dict)})
  overrides.update({f'recover.{k}.{g}': v for k, group in RUN.items()
                    if isinstance(group, dict) for g, v in group.items()})

  def fresh(name):
    workdir = str(tmp_path / name)
    shutil.copytree(os.path.join(teacher_workdir, 'squeeze'), os.path.join(workdir, 'squeeze'))
    return workdir

  reference = fresh('reference')
  ref_result = testlib.run_stage(recover, edc_config(data_dir), reference)
  teacher_files = sorted(os.listdir(os.path.join(reference, 'squeeze', 'teacher')))
  assert any(n.startswith('class_stats-') for n in teacher_files)

  killed = fresh('killed')
  command = testlib.main_command('fashion_mnist_ipc10', killed, stages='recover',
                                 overrides=overrides)
  checkpoints = os.path.join(killed, 'recover', 'checkpoints')
  testlib.kill_when(command, lambda: testlib.checkpoint_steps(checkpoints),
                    os.path.join(killed, 'log.txt'))
  killed_step = testlib.checkpoint_steps(checkpoints)[-1]
  assert killed_step < RUN['iterations']
  testlib.run_command(command)
  result = files.read_json(os.path.join(killed, 'recover', 'result.json'))
  assert result['method'] == 'edc'
  assert 0 < result['resumed_from_step'] == killed_step
  for key in ('bn_loss_initial', 'bn_loss_final', 'teacher_top1_on_synthetic'):
    assert result[key] == ref_result[key], key
  (images, labels), (ref_images, ref_labels) = read_set(result), read_set(ref_result)
  np.testing.assert_array_equal(images, ref_images)
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), RUN['ipc']))
  np.testing.assert_array_equal(labels, ref_labels)


@pytest.mark.equivalence
@pytest.mark.slow
def test_edc_mixed_one_group_on_eight_devices_is_the_one_device_group(data_dir, tmp_path):
  # The whole set as one group (edc_mixed's layout): on 8 devices one device holds it and
  # the other 7 padding groups, which must not reach it. Equal up to float rounding, the
  # bound argued in tests/test_recover.py's 1-vs-8-device test (gradients ~1e-7 relative,
  # Adam's eps amplifying it on a few pixels); padding leaking into the group, or statistics
  # pooled across groups, would move every pixel by about the learning rate (0.05).
  run = dict(RUN, group_by='ipc_index', batch_size=20, iterations=6, diversity='none',
             edc=dict(class_term='per_class', class_var='expected'))
  teacher_workdir = str(tmp_path / 'teacher')
  testlib.write_teacher(edc_config(data_dir), teacher_workdir, statistics='measured')
  states, results = {}, {}
  for devices in (1, 8):
    config = small_config(**run)
    config.dataset.data_dir = str(data_dir)
    config.mesh_shape = devices
    workdir = str(tmp_path / f'devices{devices}')
    shutil.copytree(os.path.join(teacher_workdir, 'squeeze'), os.path.join(workdir, 'squeeze'))
    results[devices] = testlib.run_stage(recover, config, workdir)
    assert (results[devices]['groups'], results[devices]['devices']) == (1, devices)
    step, states[devices] = testlib.restore_checkpoint(
        os.path.join(workdir, 'recover', 'checkpoints'))
    assert step == 6
  assert states[8]['images'].shape[0] == 8 and states[1]['images'].shape[0] == 1
  diff = np.abs(states[1]['images'][0] - states[8]['images'][0])
  assert np.mean(diff <= 1e-5) >= 0.999, np.quantile(diff, [0.5, 0.999, 1.0])
  assert diff.max() <= 1e-4
  (images1, labels1), (images8, labels8) = read_set(results[1]), read_set(results[8])
  assert np.abs(images1.astype(int) - images8).max() <= 1
  np.testing.assert_array_equal(labels1, labels8)
  np.testing.assert_array_equal(labels1, np.repeat(np.arange(10), 2))
  assert results[1]['bn_loss_final'] == pytest.approx(results[8]['bn_loss_final'], rel=1e-4)


# ----------------------------------------------------------------------------- ImageNet


def test_in1k_edc_config_has_edc_settings_and_passes_the_stage_checks():
  for arg in (None, 'smoke'):
    config = testlib.load_config('in1k_edc', arg)
    spec = datasets.get_spec(config.dataset.name)
    recover.validate(config, testlib.context_of(config, spec=spec))
    assert config.recover.method == 'edc' and config.recover.group_by == 'class'
  r = testlib.load_config('in1k_edc').recover
  assert (r.ipc, r.batch_size, r.iterations, r.lr, r.r_bn, r.edc.class_bn_weight, r.min_scale,
          r.jitter, r.init, r.scored.crops, r.scored.candidates) == (
              10, 10, 1000, 0.05, 0.1, 0.5, 0.5, 0, 'scored', 5, 300)
  # What needs the whole split in host memory is refused early on a streamed one.
  spec = datasets.get_spec('imagenet2012')
  for overrides, what in (({'recover.init': 'real'}, "init='real'"),
                          ({'recover.scored.candidates': 0},
                           "init='scored' with scored.candidates=0")):
    config = testlib.load_config('in1k_edc')
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=f"recover.{what} needs the whole training split in "
                                         f"host memory; imagenet2012 is streamed"):
      recover.validate(config, testlib.context_of(config, spec=spec))
  edc_config = testlib.load_config('in1k_edc')
  s, e = edc_config.student, edc_config.evaluate
  assert (s.epochs, s.batch_size, edc_config.relabel.min_scale, e.lr, e.temperature) == (
      300, 100, 0.5, 1e-3, 20.0)
  assert (e.lr_zeta, e.ema_decay, e.loss, e.ce_weight) == (2.0, 0.99, 'mse_ce', 0.025)
  config = testlib.load_config('in1k_edc')
  evaluate.validate(config, testlib.context_of(config, mesh=batching.create_mesh(1)))


@pytest.mark.slow
def test_in1k_edc_smoke_recovers_on_mock_imagenet(tmp_path):
  import test_in1k_smoke  # pylint: disable=g-import-not-at-top  # its mock ImageNet
  config = testlib.load_config('in1k_edc', 'smoke')
  manual = tmp_path / 'manual'
  manual.mkdir()
  for name in test_in1k_smoke.builders.IMAGENET_MANUAL_FILES:
    (manual / name).write_text('')
  config.dataset.update(data_dir=str(tmp_path / 'tfds'), manual_dir=str(manual))
  workdir = str(tmp_path / 'work')
  testlib.write_teacher(config, workdir)  # random ResNet-18 (width 8)
  with test_in1k_smoke.mock_imagenet():
    result = testlib.run_stage(recover, config, workdir)
  assert result['method'] == 'edc' and result['images'] == 40
  assert np.isfinite(result['bn_loss_initial']) and np.isfinite(result['bn_loss_final'])
  stored = [n for n in os.listdir(os.path.join(workdir, 'squeeze', 'teacher'))
            if n.startswith('class_stats-')]
  assert len(stored) == 1
  with np.load(os.path.join(workdir, 'squeeze', 'teacher', stored[0])) as data:
    counts = [data[k] for k in data.files if k.endswith('/count')]
  assert len(counts) == 20  # ResNet-18: 20 BN layers
  assert counts[0].shape == (1000,) and counts[0].sum() > 0


def test_fashion_mnist_config_defaults_per_ipc_and_keeps_sre2l_as_published():
  # Below IPC 50: edc_mixed, the whole set as one group (every class's images), each class's
  # images against their own class's mean and the variance that many real images have; the
  # rest of edc's recipe unchanged.
  for ipc in (1, 10):
    config = testlib.load_config('fashion_mnist_ipc10', f'ipc={ipc}')
    recover.validate(config, testlib.context_of(config, spec=SPEC))
    mixed = config.recover
    assert (mixed.method, mixed.group_by, mixed.batch_size, mixed.edc.class_term,
            mixed.edc.class_var) == ('edc', 'ipc_index', 10 * ipc, 'per_class', 'expected')
    assert recover.real_group_count(mixed, 10) == 1
    edc_one_class = testlib.load_config('fashion_mnist_ipc10', f'ipc={ipc},method=edc').recover
    assert (edc_one_class.group_by, edc_one_class.batch_size, edc_one_class.edc.class_term,
            edc_one_class.edc.class_var) == ('class', ipc, 'group', 'pooled')
    # IPC 10 (under 750 epochs) starts from the coreset baseline's own images; IPC 1 from
    # recover's k-means, edc's start.
    assert mixed.init == ('coreset' if ipc == 10 else 'scored'), ipc
    for key in ('scored', 'iterations', 'lr', 'jitter', 'edc.class_bn_weight'):
      assert config_lib.find(mixed, key)[0][key.split('.')[-1]] == (
          config_lib.find(edc_one_class, key)[0][key.split('.')[-1]]), key
  assert testlib.load_config('fashion_mnist_ipc10').recover == mixed  # IPC 10 without arguments
  # Under a long student (from 750 epochs) IPC 10's default refines 10 steps, not 300, from
  # recover's k-means; IPC 50's under any student 10 steps from the coreset baseline's own
  # images; the rest of the recipe, IPC 1's, edc's and a shorter student's are unchanged.
  # The reference is IPC 10's 300-step recipe (`mixed`), sized for the light recipe's IPC.
  for arg in ('epochs=750', 'epochs=1500', 'ipc=50', 'ipc=50,epochs=1500', 'ipc=100'):
    light = testlib.load_config('fashion_mnist_ipc10', arg).recover
    assert light.iterations == 10, arg
    assert (light.init == 'coreset') == (light.ipc >= 50), arg
    reference = ml_collections.ConfigDict(mixed.to_dict())
    reference.update(ipc=light.ipc, batch_size=10 * light.ipc, iterations=10, init=light.init)
    assert light == reference, arg
  for arg in ('ipc=1,epochs=1500', 'epochs=1500,method=edc', 'epochs=749',
              'ipc=50,method=edc'):
    assert testlib.load_config('fashion_mnist_ipc10', arg).recover.iterations == 300, arg
  for arg, init in (('epochs=749', 'coreset'), ('ipc=1,epochs=1500', 'scored'),
                    ('epochs=1500,method=edc', 'scored'), ('ipc=50,method=edc', 'scored')):
    assert testlib.load_config('fashion_mnist_ipc10', arg).recover.init == init, arg
  edc_at_10 = testlib.load_config('fashion_mnist_ipc10', 'method=edc').recover
  assert (edc_at_10.method, edc_at_10.group_by, edc_at_10.init, edc_at_10.scored.pick,
          edc_at_10.batch_size, edc_at_10.iterations, edc_at_10.lr, edc_at_10.jitter,
          edc_at_10.edc.class_bn_weight) == (
              'edc', 'class', 'scored', 'centre', 10, 300, 0.05, 0, 0.5)
  # The continual config takes the default per IPC, or the method it is given.
  assert testlib.load_config('fashion_mnist_continual').recover == mixed
  assert testlib.load_config('fashion_mnist_continual', 'method=edc').recover == edc_at_10
  # IPC 50's default is edc_mixed too (10 steps from the coreset, above); `select` gives
  # edc's start unrefined.
  config = testlib.load_config('fashion_mnist_ipc10', 'ipc=50,method=select')
  recover.validate(config, testlib.context_of(config, spec=SPEC))
  assert (config.recover.method, config.recover.init, config.recover.scored.pick,
          config.recover.scored.candidates) == ('select', 'scored', 'centre', 0)
  recover.validate(testlib.load_config('fashion_mnist_ipc10', 'ipc=50'),
                   testlib.context_of(config, spec=SPEC))
  assert testlib.load_config('fashion_mnist_ipc10', 'ipc=50,method=edc').recover.method == 'edc'
  # `scored`: SRe2L's recovery (its groups, steps, statistics) from teacher-scored starts.
  scored = testlib.load_config('fashion_mnist_ipc10', 'ipc=1,method=scored').recover
  assert (scored.method, scored.group_by, scored.init, scored.scored.pick, scored.iterations,
          scored.lr) == ('sre2l', 'ipc_index', 'scored', 'score', 1000, 0.05)
  recover.validate(testlib.load_config('fashion_mnist_ipc10', 'ipc=1,method=scored'),
                   testlib.context_of(config, spec=SPEC))
  published = testlib.load_config('fashion_mnist_ipc10', 'method=sre2l').recover
  assert (published.method, published.group_by, published.init, published.iterations,
          published.lr) == ('sre2l', 'ipc_index', 'noise', 1000, 0.25)
  assert testlib.load_config('fashion_mnist_ipc10', 'smoke').recover.method == 'sre2l'
  with pytest.raises(ValueError, match='method'):
    testlib.load_config('fashion_mnist_ipc10', 'method=dc')


def test_every_methods_table_row_is_a_valid_recover_config():
  from benchmarks import methods_table  # pylint: disable=g-import-not-at-top
  for row, method, overrides, _ in methods_table.ROWS:
    for ipc in (1, 10, 50):
      config = testlib.load_config('fashion_mnist_ipc10', f'ipc={ipc},seeds=3,method={method}')
      for key, value in overrides.items():
        *sections, name = key.split('.')
        node = config
        for section in sections:
          node = node[section]
        assert name in node, key  # a typo would fail only in the subprocess
        node[name] = value
      recover.validate(config, testlib.context_of(config, spec=SPEC))
      argv, workdir = methods_table.command(row, ipc, 3, '/t', '/root')
      assert workdir == f'/root/ipc{ipc}/{row}' and f'method={method}' in argv[3]
  argv, _ = methods_table.command('sre2l', 10, 3, '/t', '/root', baselines=('random',))
  assert "--config.evaluate.baselines=('random',)" in argv
  argv, _ = methods_table.command('edc', 10, 3, '/t', '/root', baselines=('random',))
  assert '--config.evaluate.baselines=()' in argv  # baselines train in the sre2l row only
  squeeze = methods_table.squeeze_extra_teachers('/runs/fm/squeeze/teacher')
  assert '--workdir=/runs/fm' in squeeze and '--stages=squeeze' in squeeze
  assert methods_table.squeeze_extra_teachers('/imported/teacher') is None
  table = {'a': {'1': {'mean': 71.234, 'std': 0.5}}}
  assert methods_table.markdown(table, [1, 10]) == (
      '| row | IPC 1 | IPC 10 |\n|---|---|---|\n| a | 71.23 ± 0.50 | - |\n')


def test_methods_table_dry_run_prints_commands_a_shell_can_run(tmp_path, capsys):
  # The sre2l row's baselines are a Python tuple with quotes and parentheses: printed joined
  # by spaces, the line was a bash syntax error.
  from benchmarks import methods_table  # pylint: disable=g-import-not-at-top
  methods_table.main(['--teacher_dir=/t', f'--root={tmp_path}', '--ipcs=10', '--seeds=1',
                      '--rows=sre2l,edc', '--baselines=random,coreset', '--dry_run'])
  printed = capsys.readouterr().out.splitlines()
  expected = [methods_table.command(row, 10, 1, '/t', str(tmp_path), (), ('random', 'coreset'))[0]
              for row in ('sre2l', 'edc')]
  assert [shlex.split(line) for line in printed] == expected


def test_methods_table_collect_reads_finished_runs_and_runs_nothing(tmp_path, monkeypatch):
  from benchmarks import methods_table  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(methods_table.subprocess, 'run', lambda *a, **k: pytest.fail('ran'))
  evaluate_dir = tmp_path / 'ipc1' / 'edc' / 'evaluate'
  evaluate_dir.mkdir(parents=True)
  (evaluate_dir / 'result.json').write_text(json.dumps({'wall_seconds': 12.5, 'variants': {
      'distilled': {'seeds': 3, 'test_top1': [0.7, 0.71, 0.72], 'test_top1_mean': 0.71,
                    'test_top1_std': 0.01}}}))
  args = ['--teacher_dir=/t/squeeze/teacher', f'--root={tmp_path}', '--ipcs=1,10', '--seeds=3',
          '--rows=edc,teachers', '--collect']
  out = methods_table.main(args)
  (key, cells), = out['rows'].items()  # teachers (not run) and IPC 10 (not run) left out
  assert key.startswith('edc: ') and list(cells) == ['1']
  assert cells['1']['mean'] == pytest.approx(71.0) and cells['1']['seeds'] == 3
  assert out['runs']['edc/ipc1']['stage_seconds'] == {'evaluate': 12.5}
  assert out['runs']['edc/ipc1']['wall_seconds'] is None  # found, not run by this call
  assert '| 71.00 ± 1.00 | - |' in (tmp_path / 'methods_table.md').read_text()


def test_methods_table_over_teachers_counts_each_teachers_lead(tmp_path, monkeypatch, capsys):
  """--teacher_dirs: one table per teacher in its own folder, and the summary over teachers:
  the mean and std of the teachers' means and on how many the row leads its own baselines."""
  from benchmarks import methods_table  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(methods_table.subprocess, 'run', lambda *a, **k: pytest.fail('ran'))
  def student(*accs):
    return {'seeds': len(accs), 'test_top1': list(accs), 'test_top1_mean': float(np.mean(accs)),
            'test_top1_std': float(np.std(accs))}
  # Teacher a: edc 0.72 +- 0.03 against random 0.64 and coreset 0.70 (ahead of both, by more
  # than the stds of the random subset only); teacher b: 0.70 against 0.71.
  for label, edc_top1, coreset in (('a', (0.69, 0.75), 0.70), ('b', (0.70, 0.70), 0.71)):
    for row, variants in (('edc', {'distilled': student(*edc_top1)}),
                          ('sre2l', {'distilled': student(0.6, 0.6),
                                     'random': student(0.64, 0.64),
                                     'coreset': student(coreset, coreset)})):
      evaluate_dir = tmp_path / label / 'ipc1' / row / 'evaluate'
      evaluate_dir.mkdir(parents=True)
      (evaluate_dir / 'result.json').write_text(json.dumps({'variants': variants}))
  teachers = f'{tmp_path}/runs/a/squeeze/teacher,{tmp_path}/runs/b/squeeze/teacher'
  assert methods_table.teacher_labels(teachers.split(',')) == ['a', 'b']
  assert methods_table.teacher_labels(['/x/teacher', '/y/teacher']) == ['0_teacher', '1_teacher']
  summary = methods_table.main([f'--teacher_dirs={teachers}', f'--root={tmp_path}', '--ipcs=1',
                                '--seeds=2', '--rows=sre2l,edc', '--collect'])
  edc = next(v for k, v in summary['rows'].items() if k.startswith('edc: '))['1']
  assert edc['per_teacher'] == {'a': pytest.approx(72.0), 'b': pytest.approx(70.0)}
  assert (edc['mean'], edc['std']) == (pytest.approx(71.0), pytest.approx(1.0))
  assert (edc['ahead_of_random'], edc['ahead_of_coreset']) == ('2/2', '1/2')
  assert (edc['clear_of_random'], edc['clear_of_coreset']) == ('2/2', '0/2')
  assert 'ahead_of_coreset' not in summary['rows']['k-means coreset (teacher features)']['1']
  assert ('| 71.00 ± 1.00 (2 teachers; ahead of: 2/2 random, 1/2 coreset; by more than the '
          'stds: 2/2 random, 0/2 coreset) |') in (
      tmp_path / 'over_teachers.md').read_text()
  assert json.loads((tmp_path / 'a' / 'methods_table.json').read_text())['teacher_dir'] == (
      f'{tmp_path}/runs/a/squeeze/teacher')
  with pytest.raises(SystemExit):
    methods_table.main(['--teacher_dir=/t', f'--teacher_dirs={teachers}', '--collect'])
  assert 'not both' in capsys.readouterr().err


def test_methods_table_reruns_the_baseline_row_for_a_baseline_it_lacks(tmp_path, monkeypatch):
  from benchmarks import methods_table  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(methods_table.subprocess, 'run', lambda argv, **k: calls.append(argv))
  evaluate_dir = tmp_path / 'ipc10' / 'sre2l' / 'evaluate'
  evaluate_dir.mkdir(parents=True)
  student = {'seeds': 3, 'test_top1': [0.8] * 3, 'test_top1_mean': 0.8, 'test_top1_std': 0.0}
  (evaluate_dir / 'result.json').write_text(json.dumps({'variants': {
      'distilled': student, 'random': student}}))
  base = ['--teacher_dir=/t/squeeze/teacher', f'--root={tmp_path}', '--ipcs=10', '--seeds=3',
          '--rows=sre2l']
  methods_table.main(base + ['--baselines=random'])
  assert not calls  # everything asked for is there
  with pytest.raises(RuntimeError, match='without 3 seeds'):  # the stub trained nothing
    methods_table.main(base + ['--baselines=random,hard_label'])
  (argv,) = calls
  assert "--config.evaluate.baselines=('random', 'hard_label')" in argv


# ----------------------------------------------------------------------------- registry


def test_a_registered_method_is_validated_by_recover_up_front(monkeypatch):
  """recover reads a method's declaration: its own validate runs in recover.validate, and
  one that takes one teacher refuses teacher.extra_teachers."""
  def refuse(cfg, spec):
    raise ValueError(f'toy refuses ipc={cfg.ipc} on {spec.name}')
  monkeypatch.setattr(synthesis.method, 'METHODS', dict(synthesis.METHODS))
  toy = synthesis.register(synthesis.Method(
      name='toy', kind='direct', synthesize=lambda *a, **k: None, validate=refuse))
  assert synthesis.get_method('toy') is toy and not toy.optimised
  config = testlib.load_config('fashion_mnist_ipc10', 'smoke')
  config.recover.method = 'toy'
  with pytest.raises(ValueError, match='toy refuses ipc=10 on fashion_mnist'):
    recover.validate(config, testlib.context_of(config, spec=SPEC))
  with pytest.raises(ValueError, match='registered already'):
    synthesis.register(synthesis.Method(name='toy', kind='direct', synthesize=print))
  with pytest.raises(ValueError, match='lacks group_loss'):
    synthesis.Method(name='half', kind='optimised')
