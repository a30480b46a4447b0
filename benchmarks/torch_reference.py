"""PyTorch reference networks, recover step and training steps (squeeze's teacher step,
evaluate's student step): the parity tests' twin of the Flax models, and the torch side of
`benchmarks.bench`.

Written from the paper's loss and the way SRe2L's reference implementation computes it:
  CE(teacher(aug(x)), y) + r_bn * sum_l w_l (||mean_l - running_mean_l||_2 +
                                              ||var_l - running_var_l||_2)
with mean_l and the biased var_l of the *input* of every BatchNorm2d over (N, H, W), taken by
forward pre-hooks; w_1 = first_bn_multiplier, 1 elsewhere. Adam(betas 0.5, 0.9, eps 1e-8) on
the input tensor only, cosine learning rate set on the host each step, one RandomResizedCrop +
horizontal flip for the whole batch (torchvision's tensor transforms, rewritten with torch ops
because torchvision is not a dependency), then a random roll ("jitter"), clip to the valid
pixel range after the step. Groups run one after another, as the reference's batches do.

The models are written here in torchvision's layout and state-dict names (ConvNet-BN, ResNet-
18/50/101), independently of `sre2l_jax.models`; `load_flax_variables` copies the Flax
teacher's weights into them, so both sides compute the same function. They are the one
PyTorch twin of the Flax models: the parity tests (tests/test_recover.py,
tests/test_torch_import.py, tests/test_bench.py) use them too. torch is imported here, outside
the package (the optional `bench` and `test` extras).
"""

import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sre2l_jax.data import streaming

RESNET_STAGES = {'resnet18': ('basic', (2, 2, 2, 2)), 'resnet50': ('bottleneck', (3, 4, 6, 3)),
                 'resnet101': ('bottleneck', (3, 4, 23, 3))}


# ----------------------------------------------------------------------------- models


class ConvNet(nn.Module):
  """ConvNet-BN: depth x [conv3x3 -> BatchNorm -> ReLU -> 2x2 pool], linear classifier (NCHW)."""

  def __init__(self, num_classes: int, in_channels: int, image_size: int, width: int = 128,
               depth: int = 3, pooling: str = 'avg'):
    super().__init__()
    self.depth, self.pooling = depth, pooling
    size = image_size
    for i in range(depth):
      setattr(self, f'conv{i}', nn.Conv2d(in_channels if i == 0 else width, width, 3,
                                          padding=1))
      setattr(self, f'bn{i}', nn.BatchNorm2d(width))
      size //= 2
    self.fc = nn.Linear(width * size * size, num_classes)

  def forward(self, x):
    pool = F.avg_pool2d if self.pooling == 'avg' else F.max_pool2d
    for i in range(self.depth):
      x = pool(F.relu(getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x))), 2)
    # Flatten in (H, W, C) order, like the Flax model, so the fc weights carry over.
    return self.fc(x.permute(0, 2, 3, 1).flatten(1))


class BasicBlock(nn.Module):
  expansion = 1

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, inplanes: int, planes: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # V1.5: stride here
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride != 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False),
                                      nn.BatchNorm2d(planes * 4))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class ResNet(nn.Module):
  """torchvision's ResNet; stem 'imagenet' (7x7/2 conv + max-pool) or 'small' (3x3/1 conv)."""

  def __init__(self, arch: str, num_classes: int, in_channels: int = 3, width: int = 64,
               stem: str = 'imagenet'):
    super().__init__()
    kind, stage_sizes = RESNET_STAGES[arch]
    block = BasicBlock if kind == 'basic' else Bottleneck
    self.stem = stem
    if stem == 'imagenet':
      self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
    else:
      self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    inplanes = width
    for i, num_blocks in enumerate(stage_sizes):
      blocks = []
      for j in range(num_blocks):
        planes = width * 2**i
        blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
        inplanes = planes * block.expansion
      setattr(self, f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stage_sizes)
    self.fc = nn.Linear(inplanes, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    if self.stem == 'imagenet':
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return self.fc(x.mean(dim=(2, 3)))


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, *,
                width: int, depth: int = 3, pooling: str = 'avg',
                stem: str = 'imagenet') -> nn.Module:
  """The torch twin of `sre2l_jax.models.create_model` for the same settings."""
  if name == 'convnet':
    return ConvNet(num_classes, in_channels, image_size, width, depth, pooling)
  if name in RESNET_STAGES:
    return ResNet(name, num_classes, in_channels, width, stem)
  raise ValueError(f'Unknown model {name!r}; valid: convnet, {", ".join(RESNET_STAGES)}.')


def _torch_name(module: str) -> str:
  """Flax module name -> torchvision's: layer1_0 -> layer1.0, downsample_bn -> downsample.1."""
  if module.startswith('layer'):
    return module.replace('_', '.')
  return {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}.get(module,
                                                                                 module)


def state_dict_from_flax(variables: dict) -> dict:
  """{'params', 'batch_stats'} of the Flax model (numpy or jax arrays) -> torch state dict.

  Conv kernels HWIO -> OIHW, dense (in, out) -> (out, in); BN scale/bias -> weight/bias,
  mean/var -> running_mean/running_var.
  """
  leaves = {('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
            ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
            ('batch_stats', 'var'): 'running_var'}
  out = {}

  def walk(tree, collection, path):
    for key, value in tree.items():
      if hasattr(value, 'items'):
        walk(value, collection, path + (key,))
        continue
      array = np.asarray(value, np.float32)
      if array.ndim == 4:
        array = array.transpose(3, 2, 0, 1)
      elif array.ndim == 2:
        array = array.T
      name = '.'.join([_torch_name(m) for m in path] + [leaves[(collection, key)]])
      out[name] = torch.tensor(array)

  for collection in ('params', 'batch_stats'):
    walk(variables[collection], collection, ())
  return out


def load_flax_variables(model: nn.Module, variables: dict) -> nn.Module:
  """Copies the Flax teacher's weights into `model` (strict but for BN's update counter)."""
  missing, unexpected = model.load_state_dict(state_dict_from_flax(variables), strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise ValueError(f'Flax variables do not fit the torch model: missing {missing}, '
                     f'unexpected {unexpected}.')
  return model


# ----------------------------------------------------------------------------- loss


class BNStatistics:
  """Forward pre-hooks on every BatchNorm2d, in module order (the reference's BNFeatureHook).

  Each hook stores ||mean - running_mean||_2 + ||var - running_var||_2 of its layer's input,
  mean and biased variance over (N, H, W), computed in float32 at least (also under
  autocast; a float64 model keeps float64).
  """

  def __init__(self, model: nn.Module):
    self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    self.losses = [None] * len(self.layers)
    self.handles = [layer.register_forward_pre_hook(self._hook(i))
                    for i, layer in enumerate(self.layers)]

  def _hook(self, index: int):
    def hook(module, inputs):
      x = inputs[0]
      x = x.to(torch.promote_types(x.dtype, torch.float32))
      mean = x.mean(dim=(0, 2, 3))
      var = x.var(dim=(0, 2, 3), correction=0)
      self.losses[index] = (torch.norm(mean - module.running_mean, 2) +
                            torch.norm(var - module.running_var, 2))
    return hook

  def loss(self, first_bn_multiplier: float):
    """(weighted sum, per-layer losses (L,)) of the last forward pass."""
    per_layer = torch.stack(self.losses)
    weights = torch.ones_like(per_layer)
    weights[0] = first_bn_multiplier
    return torch.sum(weights * per_layer), per_layer

  def remove(self):
    for handle in self.handles:
      handle.remove()


def bn_statistics_loss(model: nn.Module, images_nchw, first_bn_multiplier: float):
  """Un-augmented BN loss of one batch: (weighted sum, per-layer (L,), logits), as numpy."""
  hooks = BNStatistics(model)
  try:
    with torch.no_grad():
      logits = model.eval()(torch.as_tensor(np.asarray(images_nchw, np.float32)))
      total, per_layer = hooks.loss(first_bn_multiplier)
  finally:
    hooks.remove()
  return float(total), per_layer.numpy(), logits.numpy()


# ----------------------------------------------------------------------------- recover


class RecoverReference:
  """The reference's recover loop for `groups` batches of images, one Adam per batch.

  init_images: (groups, group_size, C, H, W) start images, default Gaussian noise.
  amp: 'none', 'bf16' or 'fp16' (torch.autocast; fp16 with a GradScaler). weight_grads:
  False freezes the teacher (requires_grad off, what a careful port does); True keeps weight
  gradients on, as the original reference does (they are computed and accumulated, never
  used).
  """

  def __init__(self, model: nn.Module, labels: np.ndarray, image_shape, mean, std, *,
               lr: float = 0.25, r_bn: float = 0.01, first_bn_multiplier: float = 10.0,
               betas=(0.5, 0.9), jitter: int = 32, min_scale: float = 0.08,
               max_scale: float = 1.0, crop: bool = True, flip: bool = True,
               iterations: int = 1000, amp: str = 'none', weight_grads: bool = False,
               device: str = 'cpu', seed: int = 0, init_images=None):
    if amp not in ('none', 'bf16', 'fp16'):
      raise ValueError(f"amp={amp!r}; valid: 'none', 'bf16', 'fp16'.")
    self.device = torch.device(device)
    self.model = model.to(self.device).eval()
    for p in self.model.parameters():
      p.requires_grad_(weight_grads)
    self.hooks = BNStatistics(self.model)
    self.targets = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=self.device)
    height, width, channels = image_shape
    if init_images is None:  # Gaussian noise in normalised space, as the reference
      generator = torch.Generator().manual_seed(seed)
      init_images = torch.randn((labels.shape[0], labels.shape[1], channels, height, width),
                                generator=generator)
    init_images = torch.as_tensor(np.asarray(init_images, np.float32))
    self.inputs = [init_images[g].clone().to(self.device).requires_grad_(True)
                   for g in range(labels.shape[0])]
    self.optimizers = [torch.optim.Adam([x], lr=lr, betas=betas, eps=1e-8)
                       for x in self.inputs]
    mean = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    self.low = (-mean / std).to(self.device)
    self.high = ((1 - mean) / std).to(self.device)
    self.lr, self.r_bn, self.first_bn_multiplier = lr, r_bn, first_bn_multiplier
    self.jitter, self.scale, self.crop, self.flip = jitter, (min_scale, max_scale), crop, flip
    self.iterations, self.amp = iterations, amp
    self.rng = np.random.default_rng(seed)
    self.scaler = torch.amp.GradScaler(self.device.type) if amp == 'fp16' else None
    self.iteration = 0

  def augment(self, x):
    """One crop (resized back, bilinear), one flip and one roll for the whole batch."""
    height, width = x.shape[-2:]
    if self.crop:
      top, left, h, w = streaming.sample_crop_box(self.rng, height, width, self.scale)
      # The crop is never larger than the output: upsampling, where antialias changes nothing.
      x = F.interpolate(x[:, :, top:top + h, left:left + w], size=(height, width),
                        mode='bilinear', align_corners=False, antialias=False)
    if self.flip and self.rng.random() < 0.5:
      x = torch.flip(x, dims=(3,))
    if self.jitter > 0:
      shifts = tuple(int(v) for v in self.rng.integers(0, self.jitter + 1, size=2))
      x = torch.roll(x, shifts=shifts, dims=(2, 3))
    return x

  def step_group(self, g: int):
    """One iteration of group `g`: cosine lr, augment, forward, loss, backward, Adam, clip."""
    x, optimizer = self.inputs[g], self.optimizers[g]
    lr = 0.5 * (1 + math.cos(math.pi * self.iteration / self.iterations)) * self.lr
    for group in optimizer.param_groups:
      group['lr'] = lr
    optimizer.zero_grad(set_to_none=True)
    if self.amp == 'none':
      logits = self.model(self.augment(x))
    else:
      dtype = torch.bfloat16 if self.amp == 'bf16' else torch.float16
      with torch.autocast(self.device.type, dtype=dtype):
        logits = self.model(self.augment(x))
    ce = F.cross_entropy(logits.float(), self.targets[g])
    bn, _ = self.hooks.loss(self.first_bn_multiplier)
    loss = ce + self.r_bn * bn
    if self.scaler is not None:
      self.scaler.scale(loss).backward()
      self.scaler.step(optimizer)
      self.scaler.update()
    else:
      loss.backward()
      optimizer.step()
    with torch.no_grad():
      x.clamp_(self.low, self.high)
    return loss

  def step(self):
    """One iteration of every group (the reference runs its batches one after another)."""
    for g in range(len(self.inputs)):
      self.step_group(g)
    self.iteration += 1


def synchronize(device: torch.device) -> None:
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def default_device() -> str:
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def benchmark_recover(model: nn.Module, labels: np.ndarray, image_shape, mean, std, *,
                      steps: int, repeats: int, warmup: int = 2, threads: int = 0,
                      **kwargs) -> dict:
  """Times `RecoverReference.step`: median over `repeats` of `steps` steps (all groups).

  threads > 0 sets torch's CPU thread count (torch.set_num_threads) for the measurement
  only.

  Returns image_iterations_per_second (groups * group_size * steps / s), the timings (s),
  peak device memory (bytes, CUDA only) and the torch settings that affect speed.
  """
  previous_threads = torch.get_num_threads()
  if threads > 0:
    torch.set_num_threads(threads)
  try:
    return _benchmark(RecoverReference(model, labels, image_shape, mean, std, **kwargs),
                      labels, steps, repeats, warmup)
  finally:
    torch.set_num_threads(previous_threads)


def _benchmark(ref: RecoverReference, labels, steps: int, repeats: int, warmup: int) -> dict:
  device = ref.device
  if device.type == 'cuda':
    torch.backends.cudnn.benchmark = True
    torch.cuda.reset_peak_memory_stats(device)
  start = time.perf_counter()
  for _ in range(warmup):
    ref.step()
  synchronize(device)
  warmup_seconds = time.perf_counter() - start
  timings = []
  for _ in range(repeats):
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
      ref.step()
    synchronize(device)
    timings.append(time.perf_counter() - start)
  ref.hooks.remove()
  median = statistics.median(timings)
  images = int(labels.shape[0] * labels.shape[1])
  return {
      'image_iterations_per_second': images * steps / median,
      'seconds_per_step': median / steps, 'timings_s': timings, 'warmup_s': warmup_seconds,
      'images_per_step': images,
      'peak_bytes_in_use': (int(torch.cuda.max_memory_allocated(device))
                            if device.type == 'cuda' else None),
      'torch_version': torch.__version__, 'device': str(device),
      'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                      else 'cpu'),
      'threads': torch.get_num_threads(), 'amp': ref.amp,
      'weight_grads': any(p.requires_grad for p in ref.model.parameters()),
      'cudnn_benchmark': bool(torch.backends.cudnn.benchmark),
      'cudnn_allow_tf32': bool(torch.backends.cudnn.allow_tf32),
      'matmul_allow_tf32': bool(torch.backends.cuda.matmul.allow_tf32),
      'crop': 'per_group (one RandomResizedCrop for the batch, as the reference)',
  }


# ----------------------------------------------------------------------------- squeeze, student
#
# The training steps beside squeeze (`squeeze.classification_step`) and evaluate's student
# (`student.student_step`, online soft labels), written the way a PyTorch user would: the
# same networks, batch, optimiser and per-image augmentations, on the device, one Python call
# per step. Per-image crops are one batched `grid_sample` (an affine map per image, bilinear),
# the boxes drawn on the host by the same sampler as the JAX side's; inputs are uint8 batches
# already on the device (no data loader is measured, as on the JAX side).


def crop_theta(boxes, height: int, width: int, out_height: int, out_width: int):
  """Affine maps (B, 2, 3) for `F.affine_grid` that resample boxes (top, left, h, w) of a
  (height, width) image to (out_height, out_width), pixel centres as in a resize
  (align_corners=False): output pixel j reads input position left + (j + 0.5) w / out - 0.5."""
  del out_height, out_width  # the map is in normalised coordinates
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  top, left, h, w = boxes.T
  theta = np.zeros((len(boxes), 2, 3), np.float32)
  theta[:, 0, 0] = w / width
  theta[:, 0, 2] = (2 * left + w) / width - 1
  theta[:, 1, 1] = h / height
  theta[:, 1, 2] = (2 * top + h) / height - 1
  return torch.from_numpy(theta)


def crop_batch(x, boxes, out_size):
  """Every image of x (B, C, H, W) cropped to its box and resized (bilinear) to out_size."""
  height, width = x.shape[-2:]
  theta = crop_theta(boxes, height, width, *out_size).to(x.device)
  grid = F.affine_grid(theta, (x.shape[0], x.shape[1]) + tuple(out_size), align_corners=False)
  # 'border': a sample within half a pixel outside the image takes the edge pixel, as the JAX
  # side's `jax.image.scale_and_translate` (its kernel renormalised over the image) does.
  return F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)


def flip_batch(x, flips):
  """Images whose entry of `flips` (B,) bool is set, flipped left-right."""
  flips = torch.as_tensor(flips, device=x.device).view(-1, 1, 1, 1)
  return torch.where(flips, x.flip(3), x)


def normalise(images_u8, mean, std):
  """uint8 (B, H, W, C) on the device -> float32 (B, C, H, W), (x / 255 - mean) / std."""
  x = images_u8.permute(0, 3, 1, 2).float() / 255.0
  mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
  std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
  return (x - mean) / std


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
  """Optimiser parameter groups: weight decay on conv and linear weights only (the JAX
  side's `train_lib.decay_mask`: kernels, not biases or BatchNorm parameters)."""
  decay, rest = [], []
  for module in model.modules():
    for name, p in module.named_parameters(recurse=False):
      is_kernel = name == 'weight' and isinstance(module, (nn.Conv2d, nn.Linear))
      (decay if is_kernel else rest).append(p)
  return [{'params': decay, 'weight_decay': weight_decay}, {'params': rest, 'weight_decay': 0.0}]


class SqueezeReference:
  """Teacher training step: per-image augmentation (`augment`: 'pad_crop_flip' with `pad`,
  'random_resized_crop_flip' or 'flip'), cross-entropy, SGD with Nesterov momentum and
  coupled weight decay on kernels (squeeze's defaults)."""

  def __init__(self, model: nn.Module, image_shape, mean, std, *, augment: str, pad: int = 4,
               lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
               weight_decay: float = 5e-4, label_smoothing: float = 0.0,
               device: str = 'cpu', seed: int = 0):
    if augment not in ('pad_crop_flip', 'random_resized_crop_flip', 'flip'):
      raise ValueError(f'Unknown augmentation {augment!r}.')
    self.device = torch.device(device)
    self.model = model.to(self.device).train()
    self.optimizer = torch.optim.SGD(decay_groups(self.model, weight_decay), lr=lr,
                                     momentum=momentum, nesterov=nesterov)
    self.image_shape, self.mean, self.std = image_shape, mean, std
    self.augment_kind, self.pad, self.label_smoothing = augment, pad, label_smoothing
    self.rng = np.random.default_rng(seed)

  def augment(self, x):
    b, _, height, width = x.shape
    if self.augment_kind == 'pad_crop_flip':
      p = self.pad
      x = F.pad(x, (p, p, p, p))
      offsets = self.rng.integers(0, 2 * p + 1, size=(b, 2))
      boxes = [(dy, dx, height, width) for dy, dx in offsets]
      x = crop_batch(x, boxes, (height, width))  # whole-pixel shifts: exact copies
    elif self.augment_kind == 'random_resized_crop_flip':
      boxes = [streaming.sample_crop_box(self.rng, height, width) for _ in range(b)]
      x = crop_batch(x, boxes, (height, width))
    return flip_batch(x, self.rng.random(b) < 0.5)

  def loss(self, x, labels):
    """Cross-entropy of the model (training mode) on augmented images x (B, C, H, W)."""
    return F.cross_entropy(self.model(x), labels, label_smoothing=self.label_smoothing)

  def step(self, images_u8, labels):
    loss = self.loss(self.augment(normalise(images_u8, self.mean, self.std)), labels)
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss


class StudentReference:
  """Evaluate's student step with online soft labels: per-image RandomResizedCrop
  (`min_scale`..`max_scale`) and flip, CutMix of the batch (one lambda ~ Beta(alpha, alpha),
  one box, a partner permutation), the frozen teacher's softmax at temperature T on the views
  (eval mode, no gradient), the student's KL divergence at T (KLDivLoss 'batchmean'), AdamW
  with decoupled weight decay on kernels (evaluate's defaults)."""

  def __init__(self, teacher: nn.Module, student: nn.Module, image_shape, mean, std, *,
               temperature: float = 20.0, lr: float = 1e-3, weight_decay: float = 0.01,
               min_scale: float = 0.08, max_scale: float = 1.0, cutmix_alpha: float = 1.0,
               device: str = 'cpu', seed: int = 0):
    self.device = torch.device(device)
    self.teacher = teacher.to(self.device).eval()
    for p in self.teacher.parameters():
      p.requires_grad_(False)
    self.student = student.to(self.device).train()
    self.optimizer = torch.optim.AdamW(decay_groups(self.student, weight_decay), lr=lr)
    self.image_shape, self.mean, self.std = image_shape, mean, std
    self.temperature, self.scale, self.alpha = temperature, (min_scale, max_scale), cutmix_alpha
    self.rng = np.random.default_rng(seed)

  def views(self, images_u8):
    x = normalise(images_u8, self.mean, self.std)
    b, _, height, width = x.shape
    boxes = [streaming.sample_crop_box(self.rng, height, width, self.scale) for _ in range(b)]
    x = flip_batch(crop_batch(x, boxes, (height, width)), self.rng.random(b) < 0.5)
    lam = self.rng.beta(self.alpha, self.alpha)
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy, cx = int(self.rng.integers(0, height)), int(self.rng.integers(0, width))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    partner = torch.as_tensor(self.rng.permutation(b), device=x.device)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[partner][:, :, y0:y1, x0:x1]
    return x

  def loss(self, x):
    """KL(teacher || student) at T on views x (B, C, H, W), 'batchmean'."""
    with torch.no_grad():
      targets = F.softmax(self.teacher(x) / self.temperature, dim=-1)
    log_q = F.log_softmax(self.student(x) / self.temperature, dim=-1)
    return F.kl_div(log_q, targets, reduction='batchmean')

  def step(self, images_u8, labels=None):
    del labels  # soft labels only
    loss = self.loss(self.views(images_u8))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    self.optimizer.step()
    return loss


def benchmark_training(reference, images_u8: np.ndarray, labels: np.ndarray, *, steps: int,
                       repeats: int, warmup: int = 2, threads: int = 0) -> dict:
  """Times `reference.step(images, labels)` (a `SqueezeReference` or `StudentReference`) on
  one fixed batch kept on its device: median over `repeats` of `steps` steps. Returns
  images_per_second, the timings (s), the thread count and device."""
  previous_threads = torch.get_num_threads()
  if threads > 0:
    torch.set_num_threads(threads)
  try:
    device = reference.device
    images = torch.as_tensor(np.asarray(images_u8), device=device)
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long, device=device)
    if device.type == 'cuda':
      torch.backends.cudnn.benchmark = True
      torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
      loss = reference.step(images, labels)
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    timings = []
    for _ in range(repeats):
      synchronize(device)
      start = time.perf_counter()
      for _ in range(steps):
        loss = reference.step(images, labels)
      synchronize(device)
      timings.append(time.perf_counter() - start)
    median = statistics.median(timings)
    return {
        'images_per_second': len(images) * steps / median, 'seconds_per_step': median / steps,
        'timings_s': timings, 'warmup_s': warmup_seconds, 'batch_size': len(images),
        'loss_after': float(loss.detach().float().cpu()),
        'peak_bytes_in_use': (int(torch.cuda.max_memory_allocated(device))
                              if device.type == 'cuda' else None),
        'torch_version': torch.__version__, 'device': str(device),
        'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                        else 'cpu'),
        'threads': torch.get_num_threads(),
        'cudnn_benchmark': bool(torch.backends.cudnn.benchmark)}
  finally:
    torch.set_num_threads(previous_threads)
