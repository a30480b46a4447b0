"""ImageNet-1K, ResNet-18 teacher and student, IPC 50: the paper's headline setting.

Arguments: `smoke` (every stage for a few steps at 224x224, tiny widths, on a handful of
images: for tests with `tfds.testing.mock_data` and for checking a pod before a real run),
`ipc=N` (10, 50, 100, 200), `seeds=N` (students per variant).

Data: TFDS's `imagenet2012` builder reads ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar
from `config.dataset.manual_dir` (default <data_dir>/downloads/manual) and prepares
ArrayRecord files once; a `--config.dataset.data_dir=gs://...` that holds them prepared is read
from a copy on each host (see the README's Data section; launch/tpu_pod.sh reads them through
a gcsfuse mount instead).

Teacher: squeeze trains one (torchvision's recipe: 90 epochs, SGD 0.1, momentum 0.9, wd 1e-4,
batch 256; cosine instead of the step schedule), or skip it and import the pretrained
torchvision ResNet-18 the reference uses:

  python -c "import torch, torchvision; torch.save(torchvision.models.resnet18(
      weights='IMAGENET1K_V1').state_dict(), 'resnet18.pth')"
  python -m sre2l_jax.models.torch_import --pth resnet18.pth --arch resnet18 \
      --out /path/to/teacher
  python -m sre2l_jax.main --config=configs/in1k_ipc50.py --workdir=DIR \
      --config.squeeze.teacher_dir=/path/to/teacher --stages=recover,relabel,evaluate
"""

from sre2l_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, smoke=False, ipc=50, seeds=1)
  c = config_lib.base_config()
  c.dataset.name = 'imagenet2012'

  c.teacher.update(name='resnet18', width=64, stem='imagenet')
  c.squeeze.update(epochs=90, batch_size=256, optimizer='sgd', lr=0.1, momentum=0.9,
                   nesterov=False, weight_decay=1e-4, warmup_epochs=0, eval_batch_size=1024,
                   checkpoint_every_steps=2000, log_every_steps=500)

  # The reference's ImageNet recipe; groups of 100 classes sharing an ipc index (10 per
  # ipc index), per-image crops instead of its one crop per batch.
  c.recover.update(ipc=arg.ipc, batch_size=100, iterations=4000, lr=0.25, r_bn=0.01,
                   first_bn_multiplier=10.0, jitter=32, min_scale=0.08, max_scale=1.0,
                   crop='per_image', init='noise', checkpoint_every_steps=500,
                   log_every_steps=100)

  c.student.update(name='resnet18', width=64, stem='imagenet', epochs=300, batch_size=1024)
  c.relabel.update(mode='online', min_scale=0.08, max_scale=1.0,
                   mix='cutmix', cutmix_alpha=1.0)
  c.evaluate.update(optimizer='adamw', lr=1e-3, weight_decay=0.01, temperature=20.0,
                    seeds=arg.seeds, eval_batch_size=1024, checkpoint_every_epochs=10,
                    log_every_steps=100)

  if arg.smoke:
    # Same code paths and 224x224 inputs; tiny widths, few images, a few steps per stage.
    # Every batch is 32 images (evaluation pads to it): a multiple of 8, 16 (a v4-32 slice)
    # and 32 (4 nodes x 8 GPUs) devices.
    # Only the first 40 classes get an image (all 1000 at 224x224 take minutes per step on
    # a CPU); groups of 5 make 8 groups, padded to a multiple of the device count. A random
    # real subset needs >= ipc training images of every class: not in a few mock images.
    config_lib.smoke(
        c, width=8, every=1, dataset=dict(train_limit=32, test_limit=16),
        squeeze=dict(epochs=2, batch_size=32, eval_batch_size=32),
        recover=dict(ipc=1, num_classes=40, batch_size=5, iterations=2),
        student=dict(epochs=1, batch_size=32),
        evaluate=dict(eval_batch_size=32, log_every_steps=5, baselines=()))
  return c
