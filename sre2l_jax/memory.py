"""Memory plans from XLA's own analysis: what a jitted step needs per device, before running it.

A step is compiled at abstract shapes (`jax.ShapeDtypeStruct`, nothing allocated) and XLA's
buffer assignment says how many bytes one device holds while it runs:

  peak = arguments + outputs + temporaries + generated code - aliased (donated) bytes

(`jax.stages.Compiled.memory_analysis()`; the estimate `jax.stages` itself prints). The same
compiled program gives XLA's FLOP count (`cost_analysis()`), from which a running time is
*projected* at a stated fraction of a device's peak: a projection, not a measurement.

Work that scales with a count (recover groups per device, student batch) is planned by
compiling at two counts, fitting `peak = fixed + count * per_unit`, choosing the largest count
that fits `margin * memory`, and compiling that count to check it (`plan_units`).

The analysis is that of the backend the program was compiled for: on this CPU it estimates a
GPU or TPU program (same shapes, other fusion and layout decisions), so a plan for another
device keeps a margin, and `launch/gpu_bench.sh` compares the plan with a measured peak.
"""

import dataclasses
import math
import os
import resource
from typing import Callable

import jax

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Device:
  """A device the plans know by name. Memory in GiB (2^30 bytes) as vendors state it (an
  "80 GB" H100 has 80 GiB); peak TFLOP/s dense (no sparsity) per compute dtype."""
  name: str
  memory_gib: float
  peak_tflops: dict
  note: str = ''


# Datasheet figures. 'float32' is what an fp32 program runs at by default: TF32 tensor cores
# on Hopper (XLA's default precision for fp32 convolutions and matmuls), one bf16 pass on the
# TPU MXU (JAX's default precision there).
DEVICES = {
    'h100': Device('NVIDIA H100 SXM 80 GB', 80, {'bfloat16': 989.4, 'float32': 494.7},
                   'fp32 as TF32; JAX takes 75% of a GPU unless XLA_PYTHON_CLIENT_MEM_FRACTION '
                   'is raised'),
    'h200': Device('NVIDIA H200 141 GB', 141, {'bfloat16': 989.4, 'float32': 494.7},
                   'same compute as the H100 SXM; fp32 as TF32'),
    'tpu_v4': Device('TPU v4 (one chip)', 32, {'bfloat16': 275.0, 'float32': 275.0},
                     'fp32 matmuls at default precision run as bf16 passes'),
    'tpu_v5e': Device('TPU v5e (one chip)', 16, {'bfloat16': 197.0, 'float32': 197.0},
                      'fp32 matmuls at default precision run as bf16 passes'),
}


# The utilisation a projection assumes: a fraction of the datasheet peak that convolutional
# networks reach in practice (stated with every projected time; measure to know).
PROJECTED_UTILISATION = 0.35


def preset_for(device_kind: str) -> str | None:
  """The `DEVICES` key of a `jax.Device.device_kind` ('NVIDIA H100 80GB HBM3', 'TPU v4',
  'TPU v5 lite', ...), or None for a device the presets do not know (a CPU)."""
  kind = device_kind.lower()
  for needle, name in (('h200', 'h200'), ('h100', 'h100'), ('v5 lite', 'tpu_v5e'),
                       ('v5e', 'tpu_v5e'), ('tpu v4', 'tpu_v4')):
    if needle in kind:
      return name
  return None


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """Per-device bytes of one compiled program, and XLA's FLOPs for one call of it (one
  device's share of the work under SPMD; None where the backend does not count)."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  generated_code_bytes: int
  alias_bytes: int
  flops: float | None = None
  bytes_accessed: float | None = None

  @property
  def peak_bytes(self) -> int:
    """Bytes one device holds while the program runs (donated buffers counted once)."""
    return (self.argument_bytes + self.output_bytes + self.temp_bytes +
            self.generated_code_bytes - self.alias_bytes)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self) | {'peak_bytes': self.peak_bytes}


def abstract(tree, sharding=None):
  """Arrays or shapes -> `jax.ShapeDtypeStruct`s (with `sharding` where given, else the
  array's own); nothing is allocated or copied."""
  def one(x):
    s = sharding if sharding is not None else getattr(x, 'sharding', None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree_util.tree_map(one, tree)


def analyse(compiled) -> MemoryReport:
  """XLA's memory and cost analysis of a `jax.stages.Compiled`."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError('This backend gives no memory analysis of compiled programs.')
  flops = accessed = None
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else {}
    cost = cost or {}
    flops = float(cost['flops']) if cost.get('flops', 0) > 0 else None
    accessed = (float(cost['bytes accessed']) if cost.get('bytes accessed', 0) > 0 else None)
  except Exception:  # pylint: disable=broad-except  # some backends count nothing
    pass
  return MemoryReport(
      argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
      temp_bytes=int(m.temp_size_in_bytes),
      generated_code_bytes=int(m.generated_code_size_in_bytes),
      alias_bytes=int(m.alias_size_in_bytes), flops=flops, bytes_accessed=accessed)


def compile_abstract(jitted, *args, **kwargs) -> MemoryReport:
  """Lowers and compiles `jitted` (a `jax.jit` function) at the shapes of `args` (arrays or
  `ShapeDtypeStruct`s; nothing is allocated) and returns XLA's analysis."""
  return analyse(jitted.lower(*abstract(args), **kwargs).compile())


def device_memory_bytes(memory_gib: float = 0.0) -> int | None:
  """`memory_gib` GiB if > 0, else what the first local device says it may allocate
  (`memory_stats()['bytes_limit']`: on a GPU, JAX's share of the card), else None (this
  CPU states no limit)."""
  if memory_gib > 0:
    return int(memory_gib * GIB)
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return int(stats['bytes_limit']) if stats and stats.get('bytes_limit') else None


@dataclasses.dataclass(frozen=True)
class UnitPlan:
  """How many units (groups, examples) per device fit: the linear fit, the chosen count and
  the compiled program's own analysis at that count."""
  units: int
  fixed_bytes: float
  bytes_per_unit: float
  budget_bytes: int
  report: MemoryReport

  @property
  def fits(self) -> bool:
    return self.report.peak_bytes <= self.budget_bytes


def fit_line(counts, peaks) -> tuple[float, float]:
  """Least-squares (fixed, per_unit) of peak = fixed + count * per_unit."""
  n = len(counts)
  if n < 2 or len(set(counts)) < 2:
    raise ValueError('A line needs peaks at two different counts at least.')
  mean_c, mean_p = sum(counts) / n, sum(peaks) / n
  slope = (sum((c - mean_c) * (p - mean_p) for c, p in zip(counts, peaks)) /
           sum((c - mean_c) ** 2 for c in counts))
  return mean_p - slope * mean_c, slope


def plan_units(report_at: Callable[[int], MemoryReport], budget_bytes: int, max_units: int,
               probe: tuple[int, int] = (1, 2), tolerance: float = 0.05,
               max_compiles: int = 8) -> UnitPlan:
  """The largest units-per-device count <= `max_units` whose compiled peak fits the budget.

  report_at(n): XLA's analysis of the step at n units per device (compiled at abstract
  shapes). Two probes give a line; the count it predicts is compiled and checked. Peaks grow
  faster than the probes' slope where buffers that small counts share stop being shared, so
  the search then narrows between the largest count known to fit and the smallest known not
  to (interpolating their peaks) until they are within `tolerance` of each other (exact for
  small counts) or `max_compiles` compilations were spent; it returns a count whose own
  compiled peak fits. Raises `MemoryError` when not even one unit fits.
  """
  reports = {}

  def peak(n):
    if n not in reports:
      reports[n] = report_at(n)
    return reports[n].peak_bytes

  for n in sorted(set(min(p, max_units) for p in probe)):
    peak(n)
  if len(reports) > 1:
    fixed, per_unit = fit_line(list(reports), [r.peak_bytes for r in reports.values()])
  else:  # one unit is all there is
    (n, r), = reports.items()
    fixed, per_unit = 0.0, r.peak_bytes / n
  per_unit = max(per_unit, 1.0)
  fits = [n for n in reports if peak(n) <= budget_bytes]
  over = [n for n in reports if peak(n) > budget_bytes]
  lo, hi = max(fits, default=0), min(over, default=max_units + 1)
  guess = max(1, min(max_units, int((budget_bytes - fixed) // per_unit)))
  while hi - lo > max(1, int(lo * tolerance)) and len(reports) < max_compiles:
    if not lo < guess < hi:  # interpolate between the bounds' own peaks
      if lo and hi <= max_units:
        slope = max((peak(hi) - peak(lo)) / (hi - lo), 1.0)
        guess = lo + int((budget_bytes - peak(lo)) // slope)
      guess = min(max(guess, lo + 1), hi - 1)
    if peak(guess) <= budget_bytes:
      lo = guess
    else:
      hi = guess
    guess = 0
  if not lo:
    raise MemoryError(
        f'One unit needs {format_bytes(peak(1))} per device; the budget is '
        f'{format_bytes(budget_bytes)}.')
  return UnitPlan(lo, fixed, per_unit, budget_bytes, reports[lo])


def balanced_rounds(total: int, per_round_max: int, multiple: int = 1) -> tuple[int, int]:
  """(rounds, per_round): the fewest rounds of at most `per_round_max` items, each round
  equally sized and a multiple of `multiple` (devices), padding at most one round's worth
  of rounding. E.g. 500 groups, at most 18 per round: 28 rounds of 18 (504, 4 padding)."""
  if per_round_max < multiple:
    raise ValueError(f'A round holds at most {per_round_max} items, fewer than the '
                     f'{multiple} devices that share it.')
  per_round_max -= per_round_max % multiple
  rounds = math.ceil(total / per_round_max)
  per_round = math.ceil(math.ceil(total / rounds) / multiple) * multiple
  return rounds, per_round


def projected_seconds(flops_per_call: float, calls: int, devices: int, peak_tflops: float,
                      utilisation: float) -> float:
  """A projection: `calls` runs of a program of `flops_per_call` FLOPs on each of `devices`
  devices at `utilisation` of `peak_tflops`. Devices run in parallel, so the time is that
  of one device's share."""
  del devices  # each device runs its own `flops_per_call` at the same time
  return calls * flops_per_call / (utilisation * peak_tflops * 1e12)


def format_bytes(n: float) -> str:
  """Bytes in the unit that shows them (GiB from 1 GiB down, then MiB, KiB): never
  '0.00 GiB' for a small budget."""
  for unit, size in (('GiB', GIB), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{n:.0f} B'


def heavier(first: MemoryReport, second: MemoryReport) -> MemoryReport:
  """Of two programs run one after the other, the report with the larger peak (what the
  devices must hold); the FLOPs are `first`'s (the step's, repeated; the other runs once)."""
  if second.peak_bytes <= first.peak_bytes:
    return first
  return dataclasses.replace(second, flops=first.flops, bytes_accessed=first.bytes_accessed)


def format_seconds(s: float) -> str:
  if s < 120:
    return f'{s:.0f} s'
  if s < 2 * 3600:
    return f'{s / 60:.1f} min'
  return f'{s / 3600:.1f} h'


def describe(report: MemoryReport) -> str:
  """One line: the peak and its parts."""
  return (f'peak {format_bytes(report.peak_bytes)} per device (arguments '
          f'{format_bytes(report.argument_bytes)}, outputs {format_bytes(report.output_bytes)}'
          f', temporaries {format_bytes(report.temp_bytes)}, code '
          f'{format_bytes(report.generated_code_bytes)}, donated '
          f'{format_bytes(report.alias_bytes)})')


def check_step_fits(jitted, args_fn: Callable[[], tuple], memory_gib: float,
                    what: str) -> MemoryReport | None:
  """Before training: compiles `jitted` at the shapes of `args_fn()` and raises
  `MemoryError` naming `what` when XLA's peak exceeds `memory_gib` GiB per device (0: the
  device's own limit). Where no limit is known (a CPU with memory_gib 0) nothing is built,
  compiled or checked."""
  budget = device_memory_bytes(memory_gib)
  if budget is None:
    return None
  report = compile_abstract(jitted, *args_fn())
  check_fits(report, budget, what)
  return report


def check_fits(report: MemoryReport, budget_bytes: int | None, what: str) -> None:
  """Raises `MemoryError` naming `what` when XLA's peak exceeds the budget (None: no limit
  known, nothing checked)."""
  if budget_bytes is not None and report.peak_bytes > budget_bytes:
    raise MemoryError(f'{what} does not fit: XLA plans {describe(report)}, over the '
                      f'{format_bytes(budget_bytes)} available per device.')



# ----------------------------------------------------------------------------- host


# Host bytes per byte of state while Orbax saves it: the state's host copy and the write
# buffers behind it. Measured on the 2-core CPU (docs/running.md): the first save of a 90 MiB
# recover state raised the resident set by 179 MiB.
CHECKPOINT_HOST_FACTOR = 2.0


def resident_bytes() -> int:
  """This process's resident set now (Linux /proc; elsewhere its peak so far)."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def host_memory_bytes() -> int | None:
  """The host's physical memory, where the OS says."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    return None


@dataclasses.dataclass(frozen=True)
class HostPlan:
  """One process's host memory at its peak: the process as it stands when planned (libraries,
  compiled programs, the teacher, data read so far: measured, not planned), the device
  buffers where the devices are this host's memory (XLA's CPU backend: its plan times the
  process's devices; 0 on a GPU or TPU), and the host-side passes: a checkpoint save of the
  state, the end of a pass (its outputs copied off the devices and encoded), the final export
  (process 0). The passes follow one another, but they are added, not maxed: the allocator
  keeps much of what one pass freed resident for the next (measured on the 2-core CPU: after
  recover's first save of a 90 MiB state, 89 of the 179 MiB it added stayed resident), and
  the measured peak came at the last pass (docs/running.md)."""
  process_bytes: int
  device_bytes: int
  passes: dict  # name: bytes

  @property
  def peak_bytes(self) -> int:
    return self.process_bytes + self.device_bytes + sum(self.passes.values())

  def to_dict(self) -> dict:
    return {'process_bytes': self.process_bytes, 'device_bytes': self.device_bytes,
            'passes': dict(self.passes), 'peak_bytes': self.peak_bytes}

  def describe(self) -> str:
    where = (f' + devices {format_bytes(self.device_bytes)} (XLA, in host memory)'
             if self.device_bytes else '')
    passes = ''.join(f' + {name} {format_bytes(b)}' for name, b in self.passes.items())
    return (f'host: peak {format_bytes(self.peak_bytes)} per process = the process now '
            f'{format_bytes(self.process_bytes)}{where}{passes}')


def host_plan(device_peak_bytes: int, passes: dict, backend: str | None = None,
              local_devices: int | None = None) -> HostPlan:
  """The `HostPlan` of this process now: `device_peak_bytes` is XLA's per-device plan,
  counted in host memory on the CPU backend; `passes` the host-side passes' bytes."""
  backend = backend or jax.default_backend()
  local_devices = jax.local_device_count() if local_devices is None else local_devices
  device = device_peak_bytes * local_devices if backend == 'cpu' else 0
  return HostPlan(resident_bytes(), int(device), {k: int(v) for k, v in passes.items()})


def check_host_fits(plan: HostPlan, what: str) -> str:
  """A warning line when `plan` exceeds this host's memory ('' when it fits or is unknown)."""
  total = host_memory_bytes()
  if total is None or plan.peak_bytes <= total:
    return ''
  return (f'{what}: the host plan ({format_bytes(plan.peak_bytes)}) exceeds this host\'s '
          f'{format_bytes(total)}: fewer groups per round (recover.groups_per_round) shrink '
          f'the checkpoint and round passes; the final export holds the whole set on '
          f'process 0.')
