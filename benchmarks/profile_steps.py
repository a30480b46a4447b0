"""Where a training step's time goes: `bench`'s squeeze and student steps by kind of work,
JAX (XLA's per-op trace) beside its PyTorch twin (torch.profiler), on the same models and
batch.

  python -m benchmarks.profile_steps --what=squeeze,student --model=convnet --width=64 \
      --image_size=28 --channels=1 --num_classes=10 --batch_size=128 --steps=20 \
      --torch_threads=2 --json=profile.json

Takes `bench`'s flags. Each step is built by `bench` (the stage's own step factory; the torch
reference of `torch_reference`), compiled, run `--warmup` steps, then `--steps` steps under
the profiler.

JAX: `jax.profiler.trace`, read back with `jax.profiler.ProfileData`. On a CPU every
executed HLO instruction (a fusion, a convolution, ...) shows as events named after it on the
threads that ran it; an instruction's time is the union of its events' intervals, so the work
it spreads over threads counts once, as wall time, and instructions that ran at the same
time (XLA runs independent ones concurrently) share that time equally. Its kind comes from the compiled module:
the instruction's `op_name` metadata (JAX's name stack: `jvp(ConvNet)/conv0/...` is the
trained model's forward, `transpose(jvp(ConvNet))` its backward, a model under no `jvp` the
frozen teacher) and, for a backward convolution, its output shape (a kernel's: the gradient
to the kernel; else to the input).
PyTorch: `torch.profiler` on the CPU, each op's self time, its kind by the labelled range it
ran in (the augmentation or views, the frozen teacher, the optimiser, wrapped here with
`record_function`) or else by its name. PyTorch's CPU backward computes a convolution's
gradients to input and kernel in one op (`aten::convolution_backward`), so that row is not
split.
`between ops` is the step's wall time that no op covers: dispatch, the host, Python.
The profilers add overhead of their own: the figures are shares of a profiled step; the
throughput to compare is `bench`'s.
"""

import json
import os
import re
import tempfile
import time

import jax

from benchmarks import bench
from sre2l_jax import models
from sre2l_jax.data import batching

KINDS = ('conv forward', 'conv backward to input', 'conv backward to kernel',
         'conv backward (input and kernel)', 'batchnorm', 'dense', 'pooling', 'loss',
         'teacher forward', 'augmentation and random numbers', 'optimizer and metrics',
         'other model ops', 'XLA-made copies (no op_name)', 'between ops')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\(')
_MODULE = re.compile(r'\w+\(([A-Z]\w*)\)')  # a Flax module in the name stack: jvp(ConvNet)
_AUGMENT = ('augment', 'threefry', 'view', 'random', 'cutmix', 'mix', 'crop', 'flip')


def _dims(shape: str) -> tuple[int, ...]:
  match = re.match(r'\w+\[([\d,]*)\]', shape)
  return tuple(int(d) for d in match.group(1).split(',') if d) if match else ()


def conv_grad_to_kernel(conv_line: str) -> bool:
  """Whether an HLO convolution computes a gradient to a kernel: its window spans the
  activations (H x W) and its output is the kernel's k x k, where a forward convolution or
  a gradient to the input slides a k x k window over an H x W output."""
  window = re.search(r'window=\{size=(\d+)x(\d+)', conv_line)
  labels = re.search(r'dim_labels=\w+_\w+->(\w+)', conv_line)
  match = _INSTRUCTION.match(conv_line)
  if not (window and labels and match):
    return False
  dims = _dims(match.group(2))
  out = labels.group(1)
  if len(dims) != len(out) or '0' not in out or '1' not in out:
    return False
  spatial = dims[out.index('0')] * dims[out.index('1')]
  return int(window.group(1)) * int(window.group(2)) > spatial


def jax_kind(op_name: str, conv_line: str | None) -> str:
  """The kind of an HLO instruction from its op_name metadata ('' if it has none) and the
  convolution it is or fuses (`conv_line`, None if none)."""
  if conv_line is not None:
    if conv_grad_to_kernel(conv_line):
      return 'conv backward to kernel'
    if op_name and 'jvp(' not in op_name and _MODULE.search(op_name):
      return 'teacher forward'
    return 'conv backward to input' if 'transpose(' in op_name or not op_name else (
        'conv forward')
  if not op_name:
    return 'XLA-made copies (no op_name)'
  leaf = op_name.rsplit('/', 1)[-1]
  if _MODULE.search(op_name):
    if 'jvp(' not in op_name:  # a model run without gradients: the frozen teacher
      return 'teacher forward'
    if re.search(r'/(bn\d*|BatchNorm\w*)/', op_name):
      return 'batchnorm'
    if '/fc/' in op_name or 'dot_general' in leaf:
      return 'dense'
    if 'reduce_window' in leaf or 'pool' in op_name:
      return 'pooling'
    return 'other model ops'
  lowered = op_name.lower()
  if any(w in lowered for w in ('log_softmax', 'softmax', 'logsumexp', 'cross_entropy')):
    return 'loss'
  if any(w in lowered for w in _AUGMENT) or 'vmap(vmap())' in op_name:
    return 'augmentation and random numbers'
  return 'optimizer and metrics'


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """{instruction name: kind} of every instruction of the module (a fusion by the
  convolution it fuses, if any, else by its op_name)."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = re.match(r'^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$', line)
    if header and ' = ' not in line:
      current = computations.setdefault(header.group(1), [])
    elif current is not None and _INSTRUCTION.match(line):
      current.append(line)
  first_conv = {name: next((l for l in lines if _INSTRUCTION.match(l).group(3) ==
                            'convolution'), None) for name, lines in computations.items()}
  out = {}
  for lines in computations.values():
    for line in lines:
      match = _INSTRUCTION.match(line)
      opcode = match.group(3)
      conv = line if opcode == 'convolution' else None
      called = re.search(r'calls=%?([\w.\-]+)', line)
      if opcode == 'fusion' and called:
        conv = first_conv.get(called.group(1))
      op_name = re.search(r'op_name="([^"]*)"', line)
      out[match.group(1)] = jax_kind(op_name.group(1) if op_name else '', conv)
  return out


def _merged(intervals) -> list[tuple[int, int]]:
  out = []
  for s, e in sorted(intervals):
    if out and s <= out[-1][1]:
      out[-1] = (out[-1][0], max(out[-1][1], e))
    else:
      out.append((s, e))
  return out


def union_ns(intervals) -> int:
  """The length of the union of (start, end) intervals."""
  return sum(e - s for s, e in _merged(intervals))


def shared_ns(by_op: dict) -> dict:
  """{op: ns} where ops that ran at the same time (on different threads) share that time
  equally: the values add up to the union of all intervals."""
  points = sorted((t, change, op) for op, intervals in by_op.items()
                  for s, e in _merged(intervals) for t, change in ((s, 1), (e, -1)))
  out, active, last = dict.fromkeys(by_op, 0.0), set(), None
  for t, change, op in points:
    if active and last is not None and t > last:
      share = (t - last) / len(active)
      for a in active:
        out[a] += share
    (active.add if change > 0 else active.discard)(op)
    last = t
  return out


def profile_jax(compiled, run_steps, steps: int, warmup: int) -> dict:
  """Per-kind milliseconds per step of `steps` steps of `compiled` under jax.profiler."""
  run_steps(max(warmup, 1))
  kinds = instruction_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      start = time.perf_counter()
      run_steps(steps)
      wall = time.perf_counter() - start
    path = next(os.path.join(d, f) for d, _, names in os.walk(directory) for f in names
                if f.endswith('.xplane.pb'))
    data = jax.profiler.ProfileData.from_file(path)
  by_op = {}
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          by_op.setdefault(event.name, []).append((event.start_ns, event.end_ns))
  ms = dict.fromkeys(KINDS, 0.0)
  for name, ns in shared_ns(by_op).items():
    ms[kinds[name]] += ns / 1e6 / steps
  covered = union_ns([iv for ivs in by_op.values() for iv in ivs]) / 1e6 / steps
  ms['between ops'] = max(wall * 1e3 / steps - covered, 0.0)
  return {'ms_per_step': ms, 'profiled_step_ms': wall * 1e3 / steps,
          'instructions_traced': len(by_op), 'instructions_classified': len(kinds)}


def torch_kind(name: str, label: str | None) -> str:
  if label:
    return label
  if 'convolution_backward' in name:
    return 'conv backward (input and kernel)'
  if 'conv' in name:
    return 'conv forward'
  if 'batch_norm' in name:
    return 'batchnorm'
  if name in ('aten::addmm', 'aten::mm', 'aten::linear', 'aten::t') or 'AddmmBackward' in name:
    return 'dense'
  if 'pool' in name:
    return 'pooling'
  if any(w in name for w in ('softmax', 'kl_div', 'cross_entropy', 'nll_loss')):
    return 'loss'
  return 'other model ops'


def _labelled(label: str, fn):
  from torch.profiler import record_function  # pylint: disable=g-import-not-at-top

  def wrapped(*args, **kwargs):
    with record_function(label):
      return fn(*args, **kwargs)
  return wrapped


def profile_torch(reference, images_u8, labels, steps: int, warmup: int,
                  threads: int) -> dict:
  """Per-kind milliseconds per step of `reference.step` under torch.profiler (CPU)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.profiler import ProfilerActivity, profile  # pylint: disable=g-import-not-at-top
  if threads > 0:
    torch.set_num_threads(threads)
  labels_of = {'augmentation and random numbers': ('augment', 'views'),
               'optimizer and metrics': ()}
  for label, methods in labels_of.items():
    for method in methods:
      if hasattr(reference, method):
        setattr(reference, method, _labelled(label, getattr(reference, method)))
  reference.optimizer.step = _labelled('optimizer and metrics', reference.optimizer.step)
  if hasattr(reference, 'teacher'):
    reference.teacher.forward = _labelled('teacher forward', reference.teacher.forward)
  images = torch.as_tensor(np.asarray(images_u8))
  labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
  for _ in range(max(warmup, 1)):
    reference.step(images, labels)
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      reference.step(images, labels)
    wall = time.perf_counter() - start
  ms = dict.fromkeys(KINDS, 0.0)
  covered = 0.0
  for event in prof.events():
    if event.name in KINDS:  # a labelled range: its ops are counted, not the range itself
      continue
    label, parent = None, event.cpu_parent
    while parent is not None:
      if parent.name in KINDS:
        label = parent.name
      parent = parent.cpu_parent
    self_ms = event.self_cpu_time_total / 1e3 / steps
    ms[torch_kind(event.name, label)] += self_ms
    covered += self_ms
  ms['between ops'] = max(wall * 1e3 / steps - covered, 0.0)
  return {'ms_per_step': ms, 'profiled_step_ms': wall * 1e3 / steps,
          'torch_threads': torch.get_num_threads()}


def table(what: str, jax_result: dict, torch_result: dict | None) -> str:
  lines = [f'{what}: ms per step (share)', '| kind | JAX | PyTorch |', '|---|---|---|']
  total_j = sum(jax_result['ms_per_step'].values())
  total_t = sum(torch_result['ms_per_step'].values()) if torch_result else 0
  for kind in KINDS:
    j = jax_result['ms_per_step'][kind]
    t = torch_result['ms_per_step'][kind] if torch_result else None
    if j < 0.005 and not t:
      continue
    cell_t = f'{t:.2f} ({100 * t / total_t:.0f}%)' if torch_result and t else '-'
    lines.append(f'| {kind} | {j:.2f} ({100 * j / total_j:.0f}%) | {cell_t} |')
  cell_t = f'{torch_result["profiled_step_ms"]:.2f}' if torch_result else '-'
  lines.append(f'| step (profiled) | {jax_result["profiled_step_ms"]:.2f} | {cell_t} |')
  return '\n'.join(lines)


def main(argv=None) -> dict:
  args = bench.parse_args(argv)
  spec, config = bench.dataset_spec(args), bench.bench_config(args)
  mesh = batching.create_mesh(args.devices)
  teacher_model = models.create_model(config.teacher, args.num_classes)
  teacher_host = bench.teacher_variables(teacher_model, spec.image_shape, args.seed)
  teacher = jax.device_put(teacher_host, batching.replicated(mesh))
  out = {**bench.environment(), 'settings': vars(args), 'results': {}}
  for what in [w for w in args.what if w in ('squeeze', 'student')]:
    if what == 'squeeze':
      compiled, run_steps, _ = bench.squeeze_workload(args, config, spec, mesh, teacher_model)
    else:
      compiled, run_steps, _ = bench.student_workload(args, config, spec, mesh,
                                                      teacher_model, teacher)
    result = {'jax': profile_jax(compiled, run_steps, args.steps, args.warmup),
              'loadavg_before_torch': bench.load_average()}
    if args.reference == 'torch':
      reference = bench.torch_training_reference(args, config, spec, teacher_host, what)
      images, labels = bench.host_batch(args, spec)
      result['torch'] = profile_torch(reference, images, labels, args.steps, args.warmup,
                                      args.torch_threads)
    result['loadavg_after'] = bench.load_average()
    out['results'][what] = result
    print(table(what, result['jax'], result.get('torch')), flush=True)
  out['loadavg_at_end'] = bench.load_average()
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
