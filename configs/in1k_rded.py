"""ImageNet-1K, ResNet-18, IPC 10: RDED's settings (synthesis/rded.py; CVPR 2024).

Arguments: `smoke` (recover for 2 classes at 224x224 with a tiny teacher, as
configs/in1k_ipc50.py's smoke), `ipc=N` (10, 50), `seeds=N`.

RDED (its script imagenet-1k_10ipc_resnet-18_to_resnet-18_cr5.sh and argument.py): the
torchvision ResNet-18 teacher; per class 300 random real candidates (`mipc`), 5 square
random-resized crops each (scale 0.08-1) of 112 x 112 (224 / factor), scored by the
teacher's -CE on the crop zero-padded to 224; the 40 (ipc * 4) best candidates' best crops
stitched 2 x 2 (`factor` 2) into 10 images per class. No optimisation. Students: ResNet-18,
300 epochs, AdamW lr 1e-3 (wd 0.01, cosine), batch 100 at IPC 10 (200 at IPC 50), CutMix
with T = 20, crops of scale 0.08-1. Published: ResNet-18 IPC 10 42.3%, IPC 50 56.5%.

Here, and where it differs: the students learn from the teacher's soft labels on views of the
stitched images (relabel, FKD-style) rather than RDED's patch-level soft labels; candidates
are centre crops at 224 x 224 of the training images (`Split.candidate_batches`) rather than
crops of the full-size JPEGs, scored as they are read, 1,024 at a time: the host keeps their
scores (1000 x 300 x 5 floats) and reads the 40 chosen per class again, never holding the
300,000 candidates (45 GB) at once. Import the teacher as in
configs/in1k_ipc50.py (python -m sre2l_jax.models.torch_import) and skip squeeze.
"""

import os

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=10, seeds=1)
  # in1k_ipc50's dataset, teacher, squeeze and student; RDED's recover, relabel and evaluate.
  c = config_lib.load_config_file(os.path.join(os.path.dirname(__file__), 'in1k_ipc50.py'),
                                  f'ipc={arg.ipc},seeds={arg.seeds}')
  c.recover = config_lib.base_config().recover
  c.recover.update(method='rded', ipc=arg.ipc, batch_size=arg.ipc,
                   rded=dict(candidates=300, crops=5, factor=2), min_scale=0.08, max_scale=1.0)
  c.student.update(batch_size=100 if arg.ipc <= 10 else 200)
  c.evaluate.update(eval_batch_size=1000)

  if arg.smoke:
    # 224x224, tiny widths, 2 classes of 8 candidates, 2 crops each.
    config_lib.smoke(
        c, width=8, every=1, dataset=dict(train_limit=32, test_limit=16),
        squeeze=dict(epochs=2, batch_size=32, eval_batch_size=32),
        recover=dict(ipc=1, batch_size=1, num_classes=2, rded=dict(candidates=8, crops=2)),
        student=dict(epochs=1, batch_size=32),
        evaluate=dict(eval_batch_size=32, log_every_steps=5, baselines=()))
  return c
