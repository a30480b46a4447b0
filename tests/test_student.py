"""student: EDC's loss (MSE to the teacher's logits + CE to the views' mixed labels)."""

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
  common = dict(cfg=config.relabel, spec=SPEC, teacher_model=teacher_model, temperature=4.0)
  x, mse = student.set_targets(key, images[:8], labels[:8], None, teacher, target='online',
                               loss='mse_ce', **common)
  x_kl, kl = student.set_targets(key, images[:8], labels[:8], None, teacher, target='online',
                                 **common)
  _, hard = student.set_targets(key, images[:8], labels[:8], None, teacher, target='hard',
                                **common)
  np.testing.assert_array_equal(x, x_kl)
  np.testing.assert_array_equal(mse['labels'], hard)
  assert len(np.unique(np.asarray(hard).max(-1))) > 1  # some views are mixed
  np.testing.assert_allclose(jax.nn.softmax(mse['logits'] / 4.0), kl, rtol=1e-5, atol=1e-7)

  model = models.create_model(config.student, SPEC.num_classes)
  state = train_lib.create_train_state(model, optax.sgd(0.0), SPEC.image_shape,
                                       jax.random.key(0), batching.create_mesh(1))
  _, metrics = student.update(state, x, mse, temperature=4.0, target='online',
                              loss='mse_ce', ce_weight=0.3)
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
