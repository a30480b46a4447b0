"""`workdir/report.json` and `workdir/report.md`: results, storage and wall time per stage.

Also the plots, drawn from the runs' own files: student test accuracy over training per variant
(the students' `metrics.jsonl`), recover's BN loss per layer over iterations (recover's
`metrics.jsonl`, keys `bn/<layer>`), and, from the command line, top-1 against IPC over several
workdirs (their `evaluate/result.json`):

  python -m sre2l_jax.report --workdirs=runs/fm_ipc1,runs/fm,runs/fm_ipc50 --out_dir=docs
"""

import io
import json
import os

from absl import logging
from etils import epath
import jax
import numpy as np

from sre2l_jax import config_lib
from sre2l_jax import files
from sre2l_jax import metric_writers

# Published ConvNet results on Fashion-MNIST (top-1 %, IPC 1 / 10 / 50), for context.
PUBLISHED = {'fashion_mnist': {'DC': {1: 70.5, 10: 82.3, 50: 83.6},
                               'DSA': {1: 70.6, 10: 84.6, 50: 88.7},
                               'KIP': {1: 76.7, 10: 88.8, 50: 91.0}}}


def _load(path):
  return files.read_json(path) if files.exists(path) else None


def collect(config, workdir: str) -> dict:
  """Everything the report shows, from the stages' result.json files."""
  stages = {s: _load(os.path.join(workdir, s, 'result.json')) for s in config_lib.STAGES}
  out = {'dataset': config.dataset.name, 'ipc': config.recover.ipc,
         'wall_seconds': {s: r.get('wall_seconds') for s, r in stages.items() if r},
         'stages': {s: r for s, r in stages.items() if r}}
  evaluate = stages['evaluate']
  if evaluate:
    out['dd_ranking'] = dd_ranking(evaluate['variants'])
  relabel = stages['relabel']
  if relabel:
    out['storage'] = relabel.get('sets', {})
  # Which run measured what: a stage that was re-run with nothing to do keeps its result.
  out['measured'] = {s: {'at': r.get('measured_at'), 'note': r.get('wall_seconds_note')}
                     for s, r in stages.items() if r}
  grid = os.path.join(workdir, 'recover', 'grid.png')
  out['grid'] = grid if files.exists(grid) else None
  return out


# DD-Ranking's label-robust score (LRS) and its two terms, as its documentation defines them
# (github.com/NUS-HPC-AI-Lab/DD-Ranking, doc/introduction.md, "Label-Robust Score (LRS)"):
#   HLR = Acc(real-hard) - Acc(syn-hard): the student on the full real training set with
#         hard labels, minus the same student on the distilled set with hard labels;
#   IOR = Acc(syn-any) - Acc(rdm-any): the distilled set minus the random subset of the same
#         size, both with the evaluation's own labels (here the run's soft labels);
#   alpha = w IOR - (1 - w) HLR (w = 0.5 on its leaderboard),
#   LRS = 100% (e^alpha - e^-1) / (e - e^-1).
# doc/metrics/lrs-soft-label.md: each is computed per evaluation round (a seed) and the
# rounds averaged. Accuracies are fractions, so alpha lies in [-1, 1] and LRS in [0, 100].
# The report's variants: real-hard 'full_hard' (evaluate.baselines 'full_data'), syn-hard
# 'distilled_hard' ('hard_label'), syn-any 'distilled', rdm-any 'random'.
DD_RANKING_INPUTS = {'hard_label_recovery': ('full_hard', 'distilled_hard'),
                     'improvement_over_random': ('distilled', 'random')}
LRS_WEIGHT = 0.5


def _mean_std(values) -> dict:
  values = np.asarray(values, np.float64)
  return {'mean': float(values.mean()), 'std': float(values.std()),
          'per_seed': values.tolist()}


def dd_ranking(variants: dict, weight: float = LRS_WEIGHT) -> dict:
  """HLR, IOR and LRS (see DD_RANKING_INPUTS) from evaluate's variants ({name: row with
  'test_top1', one fraction per seed}), per seed, then mean / std; each metric names its
  inputs. A metric whose variants were not evaluated is left out."""
  out, per_seed = {}, {}
  for metric, (minuend, subtrahend) in DD_RANKING_INPUTS.items():
    if minuend in variants and subtrahend in variants:
      a = np.asarray(variants[minuend]['test_top1'], np.float64)
      b = np.asarray(variants[subtrahend]['test_top1'], np.float64)
      per_seed[metric] = a - b
      out[metric] = {**_mean_std(a - b), 'inputs': f'{minuend} - {subtrahend}'}
  if len(per_seed) == 2:
    alpha = (weight * per_seed['improvement_over_random'] -
             (1 - weight) * per_seed['hard_label_recovery'])
    lrs = 100 * (np.exp(alpha) - np.exp(-1)) / (np.e - np.exp(-1))
    out['label_robust_score'] = {
        **_mean_std(lrs), 'weight': weight,
        'inputs': f'100 (e^a - e^-1) / (e - e^-1), a = {weight:g} IOR - {1 - weight:g} HLR'}
  return out


def _pct(x):
  return '-' if x is None else f'{100 * x:.2f}'


def to_markdown(data: dict) -> str:
  lines = [f'# SRe2L report: {data["dataset"]}, IPC {data["ipc"]}', '']
  evaluate = data['stages'].get('evaluate')
  if evaluate:
    lines += ['## Student top-1 on the real test split (%)', '',
              f'Student {evaluate["student"]["name"]} (width {evaluate["student"]["width"]}), '
              f'soft labels at temperature {evaluate["temperature"]:g}.', '',
              '| variant | labels | label storage | images | students | top-1 mean ± std | '
              'per seed |', '|---|---|---|---|---|---|---|']
    for name, v in evaluate['variants'].items():
      seeds = ', '.join(_pct(a) for a in v['test_top1'])
      lines.append(f'| {name} | {v["labels"]} | {v.get("label_storage") or "-"} | '
                   f'{v["images"]} | {v["seeds"]} | '
                   f'{_pct(v["test_top1_mean"])} ± {_pct(v["test_top1_std"])} | {seeds} |')
    archs = evaluate.get('architectures', {})  # evaluate.students: {arch: {variant: row}}
    if len(archs) > 1:
      names = list(next(iter(archs.values())))
      lines += ['', '### Across student architectures (top-1 mean ± std, %)', '',
                '| student | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 1) + '|']
      lines += [f'| {arch} | ' + ' | '.join(
          f'{_pct(rows[n]["test_top1_mean"])} ± {_pct(rows[n]["test_top1_std"])}'
          if n in rows else '-' for n in names) + ' |' for arch, rows in archs.items()]
    ranking = data.get('dd_ranking', {})
    if ranking:
      lines += ['', "DD-Ranking's metrics (per seed, then mean ± std): " + '; '.join(
          (f'LRS {m["mean"]:.2f} ± {m["std"]:.2f} ({m["inputs"]})'
           if k == 'label_robust_score' else
           f'{k.replace("_", " ")} {100 * m["mean"]:+.2f} ± {100 * m["std"]:.2f} points '
           f'({m["inputs"]})') for k, m in ranking.items())]
    published = PUBLISHED.get(data['dataset'])
    if published:
      lines += ['', 'Published (ConvNet, hard labels, other protocols): ' + ', '.join(
          f'{m} {r.get(data["ipc"], "-")}' for m, r in published.items())]
    lines.append('')
  squeeze = data['stages'].get('squeeze')
  if squeeze:
    lines += [f'Teacher: {squeeze["model"]["name"]} test top-1 {_pct(squeeze["test_top1"])}% '
              f'after {squeeze["epochs"]} epochs.', '']
  recover = data['stages'].get('recover')
  if recover and 'bn_loss_initial' not in recover:  # a method without optimisation (rded)
    lines += [f'Recover: {recover["method"]} (no optimisation); teacher top-1 on the '
              f'synthetic images {_pct(recover["teacher_top1_on_synthetic"])}%.', '']
  elif recover:
    lines += [f'Recover: BN loss {recover["bn_loss_initial"]:.4g} -> '
              f'{recover["bn_loss_final"]:.4g}; teacher top-1 on the synthetic images '
              f'{_pct(recover["teacher_top1_on_synthetic"])}%.', '']
  if data.get('storage'):
    lines += ['## Storage', '', '| set | labels (bytes) | storage | images (bytes) |',
              '|---|---|---|---|']
    for name, s in data['storage'].items():
      storage = s['storage'] + (f' (k={s["topk"]})' if s.get('topk') else '')
      lines.append(f'| {name} | {s["label_bytes"]} | {storage} | {s["image_bytes"]} |')
    lines.append('')
  continual = data['stages'].get('continual')
  if continual:
    lines += ['## Class-incremental learning', '',
              '| step | classes seen | ' + ' | '.join(continual['sets']) + ' |',
              '|---|---|' + '---|' * len(continual['sets'])]
    for k, seen in enumerate(continual['classes_seen']):
      accs = ' | '.join(_pct(continual['sets'][s]['test_top1'][k]) for s in continual['sets'])
      lines.append(f'| {k + 1} | {seen} | {accs} |')
    if continual.get('plot'):
      lines += ['', f'![accuracy per step]({os.path.relpath(continual["plot"], data["workdir"])})']
    lines.append('')
  lines += ['## Wall time per stage (s)', '',
            'Each measured by the run that did the work (re-runs with nothing to do change '
            'nothing).', '', '| stage | seconds | measured | note |', '|---|---|---|---|']
  measured = data.get('measured', {})
  for s, w in data['wall_seconds'].items():
    if w is not None:
      m = measured.get(s, {})
      lines.append(f'| {s} | {w:.1f} | {m.get("at") or "-"} | {m.get("note") or ""} |')
  if data.get('grid'):
    lines += ['', f'![distilled images]({os.path.relpath(data["grid"], data["workdir"])})']
  captions = {'student_accuracy': 'student test top-1 over training',
              'recover_bn': 'recover BN loss per layer'}
  for name, path in data.get('plots', {}).items():
    lines += ['', f'![{captions.get(name, name)}]({os.path.relpath(path, data["workdir"])})']
  return '\n'.join(lines) + '\n'


def write(config, workdir: str) -> dict:
  data = collect(config, workdir)
  data['workdir'] = files.absolute(workdir)
  if jax.process_index() == 0:
    data['plots'] = write_plots(workdir)
    files.write_json(os.path.join(workdir, 'report.json'), data)
    files.atomic_write(os.path.join(workdir, 'report.md'), to_markdown(data))
  return data


# ----------------------------------------------------------------------------- plots

PLOTS = 'plots'  # workdir/plots/: the report's figures


def find_metrics(folder) -> epath.Path | None:
  """The `metrics.jsonl` a writer made in `folder` or below it (e.g. `folder/logs/`)."""
  folder = epath.Path(folder)
  for candidate in (folder / 'metrics.jsonl', folder / 'logs' / 'metrics.jsonl'):
    if candidate.exists():
      return candidate
  # Two levels below at most: epath's rglob refuses '**' (it could mean thousands of GCS calls).
  found = sorted(p for pattern in ('*/metrics.jsonl', '*/*/metrics.jsonl')
                 for p in folder.glob(pattern)) if folder.exists() else []
  return found[0] if found else None


def student_curves(workdir) -> dict[str, list[tuple[list[int], list[float]]]]:
  """{variant: [(steps, test top-1 as fractions) per student seed]} of the last evaluation.

  The students are those `evaluate/result.json` names (its variants' `dir`, the settings
  digest); students of other settings beside them are left out. With several student
  architectures (`architectures` in the result) a variant is named '<architecture> <variant>'.
  """
  result_path = epath.Path(workdir) / 'evaluate' / 'result.json'
  if not result_path.exists():
    return {}
  result = json.loads(result_path.read_text())
  architectures = result.get('architectures') or {None: result['variants']}
  curves = {}
  for arch, variants in architectures.items():
    for name, variant in variants.items():
      label = name if len(architectures) == 1 else f'{arch} {name}'
      for seed in range(variant['seeds'] if variant.get('dir') else 0):
        path = find_metrics(epath.Path(workdir) / variant['dir'] / f'seed{seed}')
        rows = [r for r in metric_writers.read_metrics(path) if 'test_top1' in r] if path else []
        if rows:
          curves.setdefault(label, []).append(([r['step'] for r in rows],
                                               [r['test_top1'] for r in rows]))
  return curves


def bn_curves(workdir) -> dict[str, tuple[list[int], list[float]]]:
  """{layer: (steps, BN loss)} from recover's `metrics.jsonl` keys `bn/<layer>`."""
  path = find_metrics(epath.Path(workdir) / 'recover')
  curves = {}
  for row in metric_writers.read_metrics(path) if path else []:
    for key, value in row.items():
      if key.startswith('bn/'):
        steps, values = curves.setdefault(key[len('bn/'):], ([], []))
        steps.append(row['step'])
        values.append(value)
  return curves


def ipc_points(workdirs) -> dict[str, dict[str, dict[int, tuple[float, float]]]]:
  """{dataset: {variant: {ipc: (top-1 mean, std) as fractions}}} from each workdir's
  `evaluate/result.json` (a later workdir with the same dataset and IPC wins)."""
  points = {}
  for workdir in workdirs:
    path = epath.Path(workdir) / 'evaluate' / 'result.json'
    if not path.exists():
      raise FileNotFoundError(f'{path} does not exist: run the evaluate stage on {workdir}')
    result = json.loads(path.read_text())
    for name, v in result['variants'].items():
      points.setdefault(result['dataset'], {}).setdefault(name, {})[int(result['ipc'])] = (
          v['test_top1_mean'], v['test_top1_std'])
  return points


def _figure(width=6.0, height=4.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> str:
  """PNG through a buffer, so that `path` may be a bucket (`gs://...`)."""
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return os.fspath(path)


def plot_student_accuracy(curves: dict, path, title: str = '') -> str:
  """Test top-1 (%) against student step: a colour per variant, a line per seed."""
  fig = _figure()
  ax = fig.add_subplot()
  for k, (name, runs) in enumerate(curves.items()):
    final = 100 * sum(accs[-1] for _, accs in runs) / len(runs)
    for j, (steps, accs) in enumerate(runs):
      ax.plot(steps, [100 * a for a in accs], color=f'C{k}', alpha=0.8, marker='.',
              label=f'{name} ({len(runs)} seed{"s" * (len(runs) > 1)}, final {final:.2f}%)'
              if j == 0 else None)
  ax.set_xlabel('student step')
  ax.set_ylabel('test top-1 (%)')
  ax.set_title(title or 'Students: test top-1 over training')
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def plot_bn_loss(curves: dict, path, title: str = '') -> str:
  """Recover's BN loss per layer against iteration, log scale."""
  fig = _figure()
  ax = fig.add_subplot()
  for name, (steps, values) in curves.items():
    ax.plot(steps, values, label=name)
  if all(v > 0 for _, values in curves.values() for v in values):
    ax.set_yscale('log')
  ax.set_xlabel('recover iteration (rounds one after another)')
  ax.set_ylabel('BN loss of the layer')  # |mean - running mean| + |var - running var|
  ax.set_title(title or 'Recover: BN loss per layer (before the first-layer weight)')
  ax.grid(alpha=0.3, which='both')
  ax.legend(fontsize='small', ncol=2 if len(curves) > 6 else 1)
  return _save(fig, path)


def plot_accuracy_vs_ipc(variants: dict, path, title: str = '',
                         published: dict | None = None) -> str:
  """Top-1 (%) mean ± std against IPC (log scale), a line per variant; `published`
  ({method: {ipc: top-1 %}}) as grey dashed lines for context."""
  fig = _figure()
  ax = fig.add_subplot()
  ipcs = sorted({ipc for points in variants.values() for ipc in points})
  for name, points in variants.items():
    xs = sorted(points)
    ax.errorbar(xs, [100 * points[x][0] for x in xs], yerr=[100 * points[x][1] for x in xs],
                marker='o', capsize=4, label=name)
  for k, (method, points) in enumerate((published or {}).items()):
    xs = [x for x in ipcs if x in points]
    if xs:
      ax.plot(xs, [points[x] for x in xs], color='0.5', linestyle=('--', ':', '-.')[k % 3],
              linewidth=1, label=f'{method} (published)')
  ax.set_xscale('log')
  ax.set_xticks(ipcs, [str(x) for x in ipcs])
  ax.minorticks_off()
  ax.set_xlabel('images per class (IPC)')
  ax.set_ylabel('test top-1 (%), mean ± std over students')
  ax.set_title(title or 'Top-1 against IPC')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return _save(fig, path)


def write_plots(workdir, out_dir=None, prefix: str = '') -> dict[str, str]:
  """The plots one run's files allow, into `out_dir` (default `workdir/plots/`).

  Returns {'student_accuracy' | 'recover_bn': path} for those written. A plot that cannot be
  drawn is logged and skipped: it never fails the stage that asked for the report.
  """
  out_dir = epath.Path(out_dir or epath.Path(workdir) / PLOTS)
  written = {}
  for name, curves, plot in (('student_accuracy', student_curves, plot_student_accuracy),
                             ('recover_bn', bn_curves, plot_bn_loss)):
    try:
      data = curves(workdir)
      if data:
        written[name] = plot(data, out_dir / f'{prefix}{name}.png')
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('report: no %s plot for %s (%s: %s)', name, workdir,
                      type(e).__name__, e)
  return written


def main(argv=None) -> None:
  """`python -m sre2l_jax.report --workdirs=A,B,C --out_dir=docs`: every plot of every
  workdir (`<dataset>_ipc<k>_<plot>.png`, and its image grid) and, over them all,
  `<dataset>_accuracy_vs_ipc.png`."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog='python -m sre2l_jax.report', description=main.__doc__)
  parser.add_argument('--workdirs', required=True, help='comma-separated workdirs')
  parser.add_argument('--out_dir', default='docs', help='where the PNG files go')
  args = parser.parse_args(argv)
  workdirs = [w for w in args.workdirs.split(',') if w]
  out_dir = epath.Path(args.out_dir)
  for workdir in workdirs:
    config = json.loads((epath.Path(workdir) / 'config.json').read_text())
    prefix = f'{config["dataset"]["name"]}_ipc{config["recover"]["ipc"]}_'
    for path in write_plots(workdir, out_dir, prefix).values():
      print(path)
    grid = epath.Path(workdir) / 'recover' / 'grid.png'
    if grid.exists():
      (out_dir / f'{prefix}grid.png').write_bytes(grid.read_bytes())
      print(out_dir / f'{prefix}grid.png')
  for dataset, variants in ipc_points(workdirs).items():
    print(plot_accuracy_vs_ipc(variants, out_dir / f'{dataset}_accuracy_vs_ipc.png',
                               title=f'{dataset}: top-1 against IPC',
                               published=PUBLISHED.get(dataset)))


if __name__ == '__main__':
  main()
