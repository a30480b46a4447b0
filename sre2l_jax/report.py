"""`workdir/report.json` and `workdir/report.md`: results, storage and wall time per stage."""

import os

import jax

from sre2l_jax import config_lib
from sre2l_jax import files

# Published ConvNet results on Fashion-MNIST (top-1 %, IPC 1 / 10 / 50), for context.
PUBLISHED = {'fashion_mnist': {'DC': {1: 70.5, 10: 82.3, 50: 83.6},
                               'DSA': {1: 70.6, 10: 84.6, 50: 88.7},
                               'KIP': {1: 76.7, 10: 88.8, 50: 91.0}}}


def _load(path):
  return files.read_json(path) if os.path.exists(path) else None


def collect(config, workdir: str) -> dict:
  """Everything the report shows, from the stages' result.json files."""
  stages = {s: _load(os.path.join(workdir, s, 'result.json')) for s in config_lib.STAGES}
  out = {'dataset': config.dataset.name, 'ipc': config.recover.ipc,
         'wall_seconds': {s: r.get('wall_seconds') for s, r in stages.items() if r},
         'stages': {s: r for s, r in stages.items() if r}}
  evaluate = stages['evaluate']
  if evaluate:
    v = evaluate['variants']
    ranking = {}
    if 'distilled' in v and 'random' in v:
      ranking['improvement_over_random'] = (v['distilled']['test_top1_mean'] -
                                            v['random']['test_top1_mean'])
    teacher = stages['squeeze']
    if 'distilled_hard' in v and teacher and teacher.get('test_top1') is not None:
      ranking['hard_label_recovery'] = teacher['test_top1'] - v['distilled_hard'][
          'test_top1_mean']
    out['dd_ranking'] = ranking
  relabel = stages['relabel']
  if relabel:
    out['storage'] = relabel.get('sets', {})
  # Which run measured what: a stage that was re-run with nothing to do keeps its result.
  out['measured'] = {s: {'at': r.get('measured_at'), 'note': r.get('wall_seconds_note')}
                     for s, r in stages.items() if r}
  grid = os.path.join(workdir, 'recover', 'grid.png')
  out['grid'] = grid if os.path.exists(grid) else None
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
    ranking = data.get('dd_ranking', {})
    if ranking:
      lines += ['', 'DD-Ranking style: ' + ', '.join(
          f'{k.replace("_", " ")} {100 * v:+.2f} points' for k, v in ranking.items())]
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
  if recover:
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
  return '\n'.join(lines) + '\n'


def write(config, workdir: str) -> dict:
  data = collect(config, workdir)
  data['workdir'] = os.path.abspath(workdir)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, 'report.json'), data)
    files.atomic_write(os.path.join(workdir, 'report.md'), to_markdown(data))
  return data
