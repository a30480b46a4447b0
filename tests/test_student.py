"""student: EDC's loss (MSE to the teacher's logits + CE to the views' mixed labels); a
single student is a stack of one (`over_stack`, the single-student reference)."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from sre2l_jax import evaluate
from sre2l_jax import label_store
from sre2l_jax import models
from sre2l_jax import student
from sre2l_jax import train_lib
from sre2l_jax.data import batching
from sre2l_jax.data import datasets

import student_reference
import testlib

SPEC = datasets.get_spec('fashion_mnist')


def test_mse_ce_loss_is_edcs(data):
  """loss 'mse_ce' (EDC): its targets are the teacher's logits on the same views whose
  softmax at T are the 'kl' targets, and the views' mixed one-hot labels (the hard-label
  variant's targets); its value is mean((student - teacher logits)^2) + ce_weight x the
  cross-entropy to those labels (NumPy)."""
  config = testlib.fashion_config(data, {'teacher.width': 8, 'student.width': 8})
  teacher_model, teacher = testlib.random_teacher(config, seed=1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8,) + SPEC.image_shape, np.uint8)
  labels = np.arange(8, dtype=np.int32)
  key = jax.random.key(3)
  lesson = student.Lesson(config.relabel, SPEC, teacher_model, 4.0, 'online', 'mse_ce', 0.3)
  x, mse = student.set_targets(key, images[:8], labels[:8], None, teacher, lesson)
  x_kl, kl = student.set_targets(key, images[:8], labels[:8], None, teacher,
                                 dataclasses.replace(lesson, loss='kl'))
  _, hard = student.set_targets(key, images[:8], labels[:8], None, teacher,
                                dataclasses.replace(lesson, target='hard'))
  np.testing.assert_array_equal(x, x_kl)
  np.testing.assert_array_equal(mse['labels'], hard)
  assert len(np.unique(np.asarray(hard).max(-1))) > 1  # some views are mixed
  np.testing.assert_allclose(jax.nn.softmax(mse['logits'] / 4.0), kl, rtol=1e-5, atol=1e-7)

  model = models.create_model(config.student, SPEC.num_classes)
  state = train_lib.create_train_state(model, optax.sgd(0.0), SPEC.image_shape,
                                       jax.random.key(0), batching.create_mesh(1))
  _, metrics = student.update(state, x, mse, lesson)
  logits, _ = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, x,
                             train=True, mutable=['batch_stats'])
  logits, t, y = (np.asarray(a, np.float64) for a in (logits, mse['logits'], mse['labels']))
  log_p = logits - logits.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  expected = np.mean((logits - t) ** 2) + 0.3 * np.mean(-(y * log_p).sum(-1))
  np.testing.assert_allclose(float(metrics['loss']), expected, rtol=1e-5)


def test_mse_ce_loss_needs_logits(data):
  config = testlib.fashion_config(data, {'relabel.mode': 'stored', 'relabel.storage': 'topk',
                                       'evaluate.loss': 'mse_ce'})
  with pytest.raises(ValueError, match="relabel.storage='topk' keeps top-k probabilities"):
    evaluate.validate(config, testlib.context_of(config, mesh=batching.create_mesh(1)))
  config.evaluate.loss = 'mse'
  with pytest.raises(ValueError, match="evaluate.loss='mse'; valid: kl, mse_ce"):
    evaluate.validate(config, testlib.context_of(config, mesh=batching.create_mesh(1)))
  with pytest.raises(ValueError, match='evaluate.loss=.mse_ce. needs relabel.storage float32'):
    label_store.logits_from_stored({'topk_probs': np.ones((2, 1)),
                                    'topk_index': np.zeros((2, 1))})


def test_over_stack_maps_each_student_to_its_set():
  """`over_stack` unrolled and vmapped: student i gets member i of the states and entry
  index[i] of the inputs; outputs stacked in student order."""
  states = {'w': np.arange(3.0)}
  inputs = np.array([10.0, 20.0])
  fn = lambda state, x: ({'w': state['w'] + x}, {'loss': state['w'] * x})
  for mode in ('unrolled', 'vmap'):
    out, metrics = jax.jit(lambda s, x, mode=mode: student.over_stack(
        fn, mode, s, (x,), index=(1, 0, 1)))(states, inputs)
    np.testing.assert_array_equal(out['w'], [20.0, 11.0, 22.0])
    np.testing.assert_array_equal(metrics['loss'], [0.0, 10.0, 40.0])


@pytest.mark.equivalence
@pytest.mark.parametrize('target', ['online', 'hard'])
def test_stack_of_one_equals_the_single_step(data, target):
  """A single student is a stack of one: `student.create_student_step` with one member
  (unrolled, as on CPU) against the single-student program it replaced
  (`student_reference.create_student_step`), three steps on one device.

  Tolerance: the stacked step computes the views and the teacher's targets under a vmap of
  one set, which XLA may fuse otherwise, so float rounding may differ: parameters within
  1e-6 and losses within rtol 1e-6 (measured: bit-identical here)."""
  config = testlib.fashion_config(data, {'teacher.width': 8, 'student.width': 8,
                                       'student.batch_size': 8})
  teacher_model, teacher = testlib.random_teacher(config, seed=1)
  mesh = batching.create_mesh(1)
  model = models.create_model(config.student, SPEC.num_classes)
  tx = train_lib.create_optimizer(config.evaluate, train_lib.warmup_cosine(1e-3, 3))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8,) + SPEC.image_shape, np.uint8)
  labels = rng.integers(0, SPEC.num_classes, (8,)).astype(np.int32)
  teacher_arg = teacher if target == 'online' else None
  alone = train_lib.create_train_state(model, tx, SPEC.image_shape, jax.random.key(0), mesh)
  stacked = student.stack([train_lib.create_train_state(model, tx, SPEC.image_shape,
                                                        jax.random.key(0), mesh)])
  single_step = student_reference.create_student_step(config, SPEC, teacher_model, mesh, target)
  stack_step = student.create_student_step(config, SPEC, teacher_model, mesh, target)
  for s in range(3):
    key = jax.random.key(10 + s)
    alone, m_alone = single_step(alone, images, labels, None, key, teacher_arg)
    stacked, m_stacked = stack_step(stacked, images[None], labels[None], None, key,
                                    teacher_arg)
    np.testing.assert_allclose(m_stacked['loss'][0], m_alone['loss'], rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(alone.params),
                  jax.tree_util.tree_leaves(student.unstack(stacked.params, 0))):
    np.testing.assert_allclose(b, a, atol=1e-6)
