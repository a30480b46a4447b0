"""train_lib: the student's learning-rate schedule and the parameters' moving average."""

import ml_collections
import numpy as np
import optax

from sre2l_jax import train_lib
from sre2l_jax import views

import testlib


def test_student_schedule_is_the_smoothed_cosine():
  """lr_zeta 1: the cosine to 0 of every earlier run; lr_zeta 2 (EDC): lr (1 + cos(pi t /
  (2 T))) / 2, half the peak at the last step."""
  cfg = ml_collections.ConfigDict(dict(lr=1e-3, lr_zeta=1.0))
  t = np.arange(101)
  np.testing.assert_array_equal(train_lib.student_schedule(cfg, 100)(t),
                                train_lib.warmup_cosine(1e-3, 100)(t))
  cfg.lr_zeta = 2.0
  np.testing.assert_allclose(train_lib.student_schedule(cfg, 100)(t),
                             1e-3 * (1 + np.cos(np.pi * t / 200)) / 2, rtol=1e-5, atol=1e-9)


def test_fashion_config_epochs_sets_the_student_schedule():
  assert testlib.load_config('fashion_mnist_ipc10').student.epochs == 300
  config = testlib.load_config('fashion_mnist_ipc10', 'ipc=10,epochs=1500')
  assert config.student.epochs == 1500
  assert views.create_schedule(config, 100).total_steps == 3000


def test_param_ema_averages_the_parameters_after_each_update():
  """The optimiser's moving average equals the NumPy recursion over the parameters it saw
  (from the initial ones), and leaves the updates, so the parameters, unchanged."""
  cfg = ml_collections.ConfigDict(dict(optimizer='adamw', weight_decay=0.01, ema_decay=0.8))
  schedule = lambda _: 0.1
  plain = train_lib.create_optimizer(ml_collections.ConfigDict(
      dict(optimizer='adamw', weight_decay=0.01)), schedule)
  tx = train_lib.create_optimizer(cfg, schedule)
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': rng.normal(size=(3, 2)).astype(np.float32)}}
  p_plain, s_plain, s = params, plain.init(params), tx.init(params)
  p, ema = params, params['dense']['kernel'].astype(np.float64)
  for _ in range(5):
    grads = {'dense': {'kernel': rng.normal(size=(3, 2)).astype(np.float32)}}
    u, s = tx.update(grads, s, p)
    u_plain, s_plain = plain.update(grads, s_plain, p_plain)
    p, p_plain = optax.apply_updates(p, u), optax.apply_updates(p_plain, u_plain)
    ema = 0.8 * ema + 0.2 * np.asarray(p['dense']['kernel'], np.float64)
    np.testing.assert_array_equal(p['dense']['kernel'], p_plain['dense']['kernel'])
  state = train_lib.TrainState(step=5, apply_fn=None, params=p, tx=tx, opt_state=s,
                               batch_stats={})
  np.testing.assert_allclose(train_lib.eval_params(state)['dense']['kernel'], ema, rtol=1e-6)
  assert not np.allclose(ema, p['dense']['kernel'], atol=1e-3)
  assert train_lib.eval_params(state.replace(opt_state=s_plain)) is p
