"""ImageNet-1K, ResNet-18, IPC 10: EDC's settings (synthesis/edc.py; NeurIPS 2024).

Arguments: `smoke` (every stage for a few steps at 224x224, tiny widths, on a handful of
images, as configs/in1k_ipc50.py's smoke), `ipc=N` (10, 50), `seeds=N`.

EDC (its scripts for ImageNet-1K): RDED-selected real crops as starting images, 1,000 Adam
steps at lr 0.05 (betas 0.5/0.9, cosine), BN weight (`r-loss`) 0.1 with the class's own
statistics mixed 0.5 / 0.5 with the global ones, crops of scale 0.5-1 and flips (no jitter);
soft labels on crops of scale 0.5-1 with CutMix, students trained 300 epochs with AdamW 1e-3
(wd 0.01), batch 100, T = 20. Published: ResNet-18 IPC 10 48.6%, IPC 50 58.0%.

Here, and where it differs: groups of one class (all `ipc` images of a class, matched to that
class's statistics; EDC's code mixes 80 images of several classes against the mean of their
classes' statistics); the starting images are scored on whole random-resized crops (RDED's
300 candidates per class, 5 crops of scale 0.5-1 each, scored as they are read: the host keeps
per candidate its best crop's score, key and 512 features, about 0.6 GB in all, and reads the
chosen 10 per class again) without stitching; one teacher (EDC uses
several backbones). The student is EDC's: the smoothed schedule (evaluate.lr_zeta 2), the
weights' moving average (evaluate.ema_decay 0.99) tested, and MSE to the teacher's logits +
0.025 x cross-entropy (evaluate.loss 'mse_ce'; EDC's code takes the cross-entropy to the
unmixed image's class, here to the CutMix-mixed labels of the view). The teacher and its
import are as in configs/in1k_ipc50.py; the per-class statistics (one pass over the training
set) are computed on the first recover run and stored beside the teacher.
"""

import os

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=10, seeds=1)
  # in1k_ipc50's dataset, teacher, squeeze and student; EDC's recover, relabel and evaluate.
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'in1k_ipc50.py'),
                                  f'ipc={arg.ipc},seeds={arg.seeds}')
  c.recover = config_lib.base_config().recover
  c.recover.update(method='edc', group_by='class', ipc=arg.ipc, batch_size=arg.ipc,
                   iterations=1000, lr=0.05, r_bn=0.1, edc=dict(class_bn_weight=0.5),
                   first_bn_multiplier=10.0, jitter=0, min_scale=0.5, max_scale=1.0,
                   crop='per_image', init='scored',
                   scored=dict(candidates=300, crops=5, coverage=True),
                   checkpoint_every_steps=200, log_every_steps=50)
  c.student.update(batch_size=100)
  c.relabel.update(min_scale=0.5)
  c.evaluate.update(eval_batch_size=1000, lr_zeta=2.0, ema_decay=0.99, loss='mse_ce',
                    ce_weight=0.025)

  if arg.smoke:
    # As in1k_ipc50's smoke: 224x224, tiny widths, 40 classes, a few steps. Noise starting
    # images: the mock split has far fewer than ipc images of most classes.
    config_lib.smoke(
        c, width=8, every=1, dataset=dict(train_limit=32, test_limit=16),
        squeeze=dict(epochs=2, batch_size=32, eval_batch_size=32),
        recover=dict(ipc=1, batch_size=1, num_classes=40, iterations=2, init='noise'),
        student=dict(epochs=1, batch_size=32),
        evaluate=dict(eval_batch_size=32, log_every_steps=5, baselines=()))
  return c
