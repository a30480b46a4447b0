"""A control for a refinement that moves real images a little: the starting set moved by the
same per-pixel amounts in random directions, written as an image folder for
`--config.evaluate.images_dir`.

  python -m benchmarks.perturbation_control --start=runs/i50_select \
      --refined=runs/i50_mixed10 --out=runs/rough/fm_sign

`--start` and `--refined` are two workdirs whose recover stages wrote sets of the same
classes from the same starting images (e.g. `method=select` and `edc_mixed` refining 10
steps, same seed). Every pixel of the start moves by |refined - start| at that pixel, up or
down at random (`--kind=sign`), or by Gaussian noise of the change's RMS (`--kind=gaussian`),
rounded and clipped to uint8. If students trained on this folder score as the refined set's
do, the refinement's gain is its amount of change (the images roughened), not its direction
(docs/results.md, issue 30's tenth step). Prints the two sets' RMS change in grey levels.
"""

import argparse

import numpy as np

from sre2l_jax import export
from sre2l_jax import image_sets

KINDS = ('sign', 'gaussian')


def perturb(start: np.ndarray, refined: np.ndarray, rng: np.random.Generator,
            kind: str = 'sign') -> np.ndarray:
  """uint8 `start` moved pixel by pixel by |refined - start| with random signs ('sign') or
  by Gaussian noise of the change's RMS ('gaussian'), rounded and clipped to [0, 255]."""
  if start.shape != refined.shape:
    raise ValueError(f'The sets differ in shape ({start.shape} vs {refined.shape}); give two '
                     f'runs of the same IPC, classes and image size.')
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r}; valid: {KINDS}.')
  change = refined.astype(np.float64) - start.astype(np.float64)
  if kind == 'sign':
    noise = np.abs(change) * rng.choice([-1.0, 1.0], size=change.shape)
  else:
    noise = rng.normal(0.0, np.sqrt(np.mean(change ** 2)), size=change.shape)
  return np.clip(np.round(start + noise), 0, 255).astype(np.uint8)


def rms(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.sqrt(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--start', required=True, help='workdir of the starting set')
  parser.add_argument('--refined', required=True, help='workdir of the refined set')
  parser.add_argument('--out', required=True, help='image folder to write (new000/...)')
  parser.add_argument('--kind', default='sign', choices=KINDS)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  start, labels = image_sets.distilled_set(args.start)
  refined, refined_labels = image_sets.distilled_set(args.refined)
  if not np.array_equal(labels, refined_labels):
    raise ValueError(f'{args.start} and {args.refined} hold different classes per image; '
                     f'give two runs of the same IPC and classes.')
  control = perturb(start, refined, np.random.default_rng(args.seed), args.kind)
  ipc = int(np.sum(labels == labels[0]))
  export.write_image_folder(args.out, control, labels, np.arange(len(labels)) % ipc)
  out = {'refined_rms': rms(refined, start), 'control_rms': rms(control, start)}
  print(f'RMS change from the start, grey levels: refined {out["refined_rms"]:.2f}, '
        f'control ({args.kind}) {out["control_rms"]:.2f}; wrote {len(control)} images to '
        f'{args.out}')
  return out


if __name__ == '__main__':
  main()
