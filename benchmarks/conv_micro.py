"""One 3x3 convolution of the Fashion-MNIST ConvNet, alone: forward, gradient to the input,
gradient to the kernel, in XLA (as the model writes it, NHWC; NCHW; as an im2col matrix
product; as 9 matrix products over shifted rows) and in PyTorch, at the same shapes and
threads, beside XLA's plain matrix product of the same multiply-adds: the minimal reproducer
of where `profile_steps` finds the CPU step's time.

  python -m benchmarks.conv_micro --batch=128 --size=14 --channels=64 --repeats=20 \
      --torch_threads=2 --json=conv.json

Each variant is jitted (JAX) and run `--repeats` times after 3 warm-up calls; the median is
reported in ms. All variants compute the same numbers (checked against the NHWC one). The
row `dot_same_macs` is no convolution: XLA's `dot` on matrices of the im2col shapes (forward
(B*H*W, 9*Cin) x (9*Cin, Cout), to the input (B*H*W, Cout) x (Cout, 9*Cin), to the kernel
(9*Cin, B*H*W) x (B*H*W, Cout)), i.e. what the multiply-adds cost in XLA's matrix kernel
with the operands already laid out.
"""

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_ms(fn, repeats: int) -> float:
  for _ in range(3):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def conv_nhwc(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def conv_nchw(x, w):  # x NCHW, w OIHW
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NCHW', 'OIHW', 'NCHW'))


def conv_im2col(x, w):
  """The 3x3 'SAME' convolution as one matrix product over the 9 shifted copies of x."""
  b, h, wd, c = x.shape
  k = w.shape[0]
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  patches = jnp.concatenate([xp[:, i:i + h, j:j + wd, :] for i in range(k) for j in range(k)],
                            axis=-1)  # (b, h, w, k*k*c), (i, j, c) order as w's HWIO
  return (patches.reshape(b * h * wd, k * k * c) @ w.reshape(k * k * c, -1)).reshape(
      b, h, wd, -1)


def conv_shifted_dots(x, w):
  """The 3x3 'SAME' convolution as 9 matrix products over row-shifted slices: the
  zero-padded activations flattened to (B*(H+2)*(W+2), C) put tap (i, j) of the output pixel
  at flat row p at row p + i*(W+2) + j, so each tap's operand is a contiguous block of rows
  (no strided window to gather); the outputs at the border rows are computed and dropped."""
  b, h, wd, c = x.shape
  k = w.shape[0]
  pad = k // 2
  row = wd + 2 * pad
  flat = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))).reshape(-1, c)
  m = flat.shape[0] - (k - 1) * (row + 1)
  y = sum(flat[i * row + j:i * row + j + m] @ w[i, j] for i in range(k) for j in range(k))
  y = jnp.pad(y, ((0, flat.shape[0] - m), (0, 0))).reshape(b, h + 2 * pad, row, -1)
  return y[:, :h, :wd]


def dot_rows(x_nhwc, w_hwio, repeats: int) -> dict:
  """ms of XLA's `dot` on the im2col shapes of the convolution's three products."""
  b, h, wd, cin = x_nhwc.shape
  k, cout = w_hwio.shape[0], w_hwio.shape[-1]
  rows, taps = b * h * wd, k * k * cin
  rng = np.random.default_rng(1)
  mat = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  out = {}
  for name, (a, c) in (('forward', (mat(rows, taps), mat(taps, cout))),
                       ('to_input', (mat(rows, cout), mat(cout, taps))),
                       ('to_kernel', (mat(taps, rows), mat(rows, cout)))):
    out[name] = _median_ms(lambda a=a, c=c: matmul(a, c).block_until_ready(), repeats)
  return out


def jax_rows(x_nhwc, w_hwio, repeats: int) -> dict:
  """{variant: {forward, to_input, to_kernel}} ms of the JAX variants."""
  g = jnp.ones(conv_nhwc(x_nhwc, w_hwio).shape, jnp.float32)
  x_nchw, w_oihw = jnp.transpose(x_nhwc, (0, 3, 1, 2)), jnp.transpose(w_hwio, (3, 2, 0, 1))
  g_nchw = jnp.transpose(g, (0, 3, 1, 2))
  reference = np.asarray(conv_nhwc(x_nhwc, w_hwio))
  out = {}
  for name, fn, x, w, gy in (('xla_nhwc', conv_nhwc, x_nhwc, w_hwio, g),
                             ('xla_nchw', conv_nchw, x_nchw, w_oihw, g_nchw),
                             ('im2col_dot', conv_im2col, x_nhwc, w_hwio, g),
                             ('shifted_dots', conv_shifted_dots, x_nhwc, w_hwio, g)):
    forward = jax.jit(fn)
    result = np.asarray(forward(x, w))
    if name == 'xla_nchw':
      result = result.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(result, reference, rtol=1e-4, atol=1e-4)
    to_input = jax.jit(lambda x, w, gy, fn=fn: jax.vjp(lambda x: fn(x, w), x)[1](gy)[0])
    to_kernel = jax.jit(lambda x, w, gy, fn=fn: jax.vjp(lambda w: fn(x, w), w)[1](gy)[0])
    out[name] = {
        'forward': _median_ms(lambda: forward(x, w).block_until_ready(), repeats),
        'to_input': _median_ms(lambda: to_input(x, w, gy).block_until_ready(), repeats),
        'to_kernel': _median_ms(lambda: to_kernel(x, w, gy).block_until_ready(), repeats)}
  out['dot_same_macs'] = dot_rows(x_nhwc, w_hwio, repeats)
  return out


def torch_row(x_nhwc, w_hwio, repeats: int, threads: int) -> dict:
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if threads > 0:
    torch.set_num_threads(threads)
  x = torch.as_tensor(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
  w = torch.as_tensor(np.asarray(w_hwio).transpose(3, 2, 0, 1).copy())
  g = torch.ones_like(F.conv2d(x, w, padding=1))
  xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
  y = F.conv2d(xg, wg, padding=1)  # the graph, once: only the backward is timed

  def grad(inputs):
    return torch.autograd.grad(y, inputs, g, retain_graph=True)

  with torch.no_grad():
    forward = _median_ms(lambda: F.conv2d(x, w, padding=1), repeats)
  return {'forward': forward, 'to_input': _median_ms(lambda: grad([xg]), repeats),
          'to_kernel': _median_ms(lambda: grad([wg]), repeats),
          'threads': torch.get_num_threads(), 'version': torch.__version__}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--size', type=int, default=14, help='H = W of the activations')
  p.add_argument('--channels', type=int, default=64, help='output channels')
  p.add_argument('--in_channels', type=int, default=0, help='input channels (0: --channels)')
  p.add_argument('--repeats', type=int, default=20)
  p.add_argument('--torch_threads', type=int, default=0)
  p.add_argument('--json', default='')
  args = p.parse_args(argv)
  args.in_channels = args.in_channels or args.channels
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(args.batch, args.size, args.size, args.in_channels)),
                  jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, args.in_channels, args.channels)) /
                  np.sqrt(9 * args.in_channels), jnp.float32)
  out = {'settings': vars(args), 'jax_version': jax.__version__,
         'rows': jax_rows(x, w, args.repeats)}
  out['rows']['torch'] = torch_row(x, w, args.repeats, args.torch_threads)
  print(f'conv 3x3 {args.in_channels}->{args.channels} on {args.batch}x{args.size}x{args.size}'
        f', ms (median of {args.repeats})')
  print('| variant | forward | grad to input | grad to kernel |\n|---|---|---|---|')
  for name, row in out['rows'].items():
    print(f'| {name} | {row["forward"]:.2f} | {row["to_input"]:.2f} | '
          f'{row["to_kernel"]:.2f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
