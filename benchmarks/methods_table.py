"""The issue-13 methods table on Fashion-MNIST: every synthesis lever beside the baselines.

  python -m benchmarks.methods_table --teacher_dir=runs/fm/squeeze/teacher \
      --root=runs/methods --ipcs=1,10,50 --seeds=3

One teacher for every row (train it once: `python -m sre2l_jax.main
--config=configs/fashion_mnist_ipc10.py --workdir=runs/fm --stages=squeeze`). Each (row, IPC)
runs `python -m sre2l_jax.main --config=configs/fashion_mnist_ipc10.py:ipc=N,seeds=S,method=M`
with the row's overrides and `--stages=recover,relabel,evaluate` in its own workdir
`<root>/ipc<N>/<row>`, so the same student protocol (views, soft labels, schedule) applies
to every row; the baselines (random real subset, hard-label variants, and the k-means
coreset when the evaluate stage offers it) are trained once per IPC, in the `sre2l` row.
Resumable: a (row, IPC) whose evaluate result already holds `seeds` students of every variant
it asks for is not run again (the baseline row asked for a baseline it lacks runs again and
trains only that one's students), and a rerun of an interrupted one resumes its stages. Writes
`<root>/methods_table.json` (every row, IPC, variant: mean, std, per-seed top-1 %, the
command, wall seconds of the invocation and of each stage) and `<root>/methods_table.md`
(mean +- std, %), keeping the cells of earlier invocations. `--rows=a,b` runs some rows only;
`--baselines=random,coreset` trains only those baselines (default: all, hard labels too);
`--dry_run` prints the commands (shell-quoted); `--collect` runs nothing and writes the table from the runs
finished. The `teachers` row first trains its extra teachers beside
`--teacher_dir` (that workdir's squeeze; a no-op once they exist).

A row's lead moves with the teacher (at IPC 1 by 2-3 points between teachers of the same
recipe), so a lever is measured over several: `--teacher_dirs=runs/a/squeeze/teacher,...`
runs the table once per teacher, in `<root>/<label>/` (label: the teacher's run's workdir
name, 'a'), and writes `<root>/over_teachers.{json,md}`: per row and IPC the mean and std over
teachers of the teachers' means, and on how many teachers the row is ahead of the random
subset and the coreset of its own teacher.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist_ipc10.py')

# The `teachers` row's extra teachers, trained once beside the given teacher (by its own
# workdir's squeeze; teacher.extra_configs reads them from there).
EXTRA_TEACHERS = ('convnet:width=32', 'convnet:width=32,depth=2')

# (row, config `method` argument, overrides, what it shows). SRe2L as published first, then
# each lever alone on top of it, then the combination (the config's edc recipe).
ROWS = (
    ('sre2l', 'sre2l', {}, 'SRe2L as published: noise, 1,000 steps, mixed-class groups, '
     'global BN statistics'),
    ('real_init', 'sre2l', {'recover.init': 'real', 'recover.lr': 0.05},
     'lever: start from random real images (lr 0.05)'),
    ('scored_init', 'scored', {},
     'lever: start from teacher-scored real images with k-means coverage (lr 0.05; the '
     'config\'s `scored` recipe)'),
    ('class_stats', 'edc', {'recover.init': 'noise', 'recover.iterations': 1000,
                            'recover.lr': 0.25, 'recover.jitter': 4,
                            'recover.edc.class_bn_weight': 1.0},
     'lever: one-class groups matched to their class\'s BN statistics, from noise'),
    ('weak_aug', 'sre2l', {'recover.jitter': 0},
     'lever: no roll during recovery (crops and flips only, EDC\'s weak augmentation)'),
    ('early_late', 'sre2l', {'recover.diversity': 'early_late'},
     'lever: DELT early-late (a class\'s images start at 4 staggered steps), from noise'),
    ('edc', 'edc', {'recover.scored.pick': 'score', 'recover.scored.candidates': 300,
                    'recover.edc.class_bn_weight': 1.0},
     'combination: scored real init + class statistics + no roll, 300 steps (the '
     'Fashion-MNIST default before edc_centre)'),
    ('edc_real_init', 'edc', {'recover.init': 'real', 'recover.edc.class_bn_weight': 1.0},
     'combination with random real starting images instead of scored ones'),
    ('edc_early_late', 'edc', {'recover.diversity': 'early_late',
                               'recover.scored.coverage': False, 'recover.scored.pick': 'score',
                               'recover.edc.class_bn_weight': 1.0},
     'combination + early-late (top-scored first, started first)'),
    ('edc_centre', 'edc', {'recover.scored.pick': 'centre', 'recover.scored.candidates': 0,
                           'recover.edc.class_bn_weight': 1.0},
     'edc starting from the k-means coreset\'s images (each cluster\'s most typical image of '
     'the whole class) instead of the best-scored, class statistics only (the Fashion-MNIST '
     'default before edc_mix)'),
    ('edc_mix', 'edc', {'recover.edc.class_bn_weight': 0.5},
     'edc from the coreset\'s images with EDC\'s soft matching: half class, half global '
     'statistics (the Fashion-MNIST default below IPC 50 before edc_mixed)'),
    ('edc_no_ce', 'edc', {'recover.r_ce': 0.0},
     'edc_mix matching BN statistics only (recover.r_ce 0: no cross-entropy to the class)'),
    ('edc_hardest', 'edc', {'recover.scored.pick': 'hardest'},
     'edc_mix from each k-means cluster\'s lowest-scored image instead of its most typical'),
    ('edc_mixed', 'edc_mixed', {},
     'edc_mix with the whole set as one group: the global term over every class\'s images, '
     'the class term per class against the variance as many real images of the class have '
     '(the Fashion-MNIST default below IPC 50)'),
    ('edc_mixed_pooled', 'edc_mixed', {'recover.edc.class_var': 'pooled'},
     'edc_mixed with the class\'s pooled variance (over all its images) as the target'),
    ('edc_mixed_group', 'edc_mixed', {'recover.edc.class_term': 'group',
                                      'recover.edc.class_var': 'pooled'},
     'edc_mix with the whole set as one group, the class term as EDC\'s code has it: the '
     'group against the mean of its classes\' statistics'),
    ('select', 'select', {},
     'the coreset\'s choice (edc_mix\'s starting images) unrefined, through recover '
     '(method=select)'),
    ('rded', 'sre2l', {'recover.method': 'rded', 'recover.rded.factor': 1},
     'RDED without stitching: per class the top-scored of 300 real candidates (best of 5 '
     'crops each)'),
    ('rded_f2', 'sre2l', {'recover.method': 'rded', 'recover.rded.factor': 2},
     'RDED as published: 2 x 2 stitched top-scored crops'),
    ('teachers', 'sre2l', {'teacher.extra_teachers': EXTRA_TEACHERS},
     'lever: three teachers (+ ConvNet width 32 of depth 3 and 2): BN losses summed, soft '
     'labels averaged'),
)
BASELINE_ROW = 'sre2l'
# Names of the baseline variants in evaluate's result, as table rows.
BASELINE_VARIANTS = (('distilled_hard', 'SRe2L, hard labels'),
                     ('random', 'random real subset'),
                     ('random_hard', 'random real subset, hard labels'),
                     ('coreset', 'k-means coreset (teacher features)'),
                     ('coreset_hard', 'k-means coreset, hard labels'))


def available_baselines() -> tuple[str, ...]:
  """The evaluate baselines this checkout offers ('coreset' once the evaluate stage has it)."""
  sys.path.insert(0, REPO)
  from sre2l_jax import image_sets  # pylint: disable=g-import-not-at-top
  return tuple(b for b in ('random', 'hard_label', 'coreset') if b in image_sets.BASELINES)


def command(row: str, ipc: int, seeds: int, teacher_dir: str, root: str,
            extra: tuple[str, ...] = (),
            baselines: tuple[str, ...] | None = None) -> tuple[list[str], str]:
  """(argv, workdir) of one (row, IPC); `baselines` (default: all available) are trained in
  the baseline row only."""
  _, method, overrides, _ = next(r for r in ROWS if r[0] == row)
  workdir = os.path.join(root, f'ipc{ipc}', row)
  if row != BASELINE_ROW:
    baselines = ()
  elif baselines is None:
    baselines = available_baselines()
  argv = [sys.executable, '-m', 'sre2l_jax.main',
          f'--config={CONFIG}:ipc={ipc},seeds={seeds},method={method}',
          f'--workdir={workdir}', '--stages=recover,relabel,evaluate',
          f'--config.squeeze.teacher_dir={os.path.abspath(teacher_dir)}',
          f'--config.evaluate.baselines={tuple(baselines)!r}']
  argv += [f'--config.{k}={v}' for k, v in overrides.items()] + list(extra)
  return argv, workdir


def squeeze_extra_teachers(teacher_dir: str) -> list[str] | None:
  """The command that trains EXTRA_TEACHERS beside `teacher_dir` (<workdir>/squeeze/teacher
  of the run that trained it: that workdir's squeeze, its own teacher already finished), or
  None when `teacher_dir` is not such a folder."""
  squeeze_dir = os.path.dirname(os.path.normpath(os.path.abspath(teacher_dir)))
  if os.path.basename(squeeze_dir) != 'squeeze':
    return None
  return [sys.executable, '-m', 'sre2l_jax.main', f'--config={CONFIG}',
          f'--workdir={os.path.dirname(squeeze_dir)}', '--stages=squeeze',
          f'--config.teacher.extra_teachers={EXTRA_TEACHERS!r}']


def stage_seconds(workdir: str) -> dict:
  """Wall seconds of each stage as its result.json records them (the run that did the
  work; a later no-op keeps them), with the stage's note when it has one."""
  out = {}
  for stage in ('recover', 'relabel', 'evaluate'):
    path = os.path.join(workdir, stage, 'result.json')
    if os.path.exists(path):
      with open(path) as f:
        result = json.load(f)
      if 'wall_seconds' in result:
        out[stage] = round(result['wall_seconds'], 1)
      if result.get('wall_seconds_note'):
        out[f'{stage}_note'] = result['wall_seconds_note']
  return out


def expected_variants(baselines: tuple[str, ...]) -> set[str]:
  """The evaluate variants a run with these baselines trains (evaluate.variants' names)."""
  sys.path.insert(0, REPO)
  import ml_collections  # pylint: disable=g-import-not-at-top
  from sre2l_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict({'evaluate': {'baselines': tuple(baselines)}})
  return {name for name, _, _ in evaluate.variants(config)}


def finished(workdir: str, seeds: int, variants: set[str] = frozenset({'distilled'})
             ) -> dict | None:
  """The evaluate result of `workdir` if it has each of `variants` and every variant has
  `seeds` students, else None (so a finished run asked for another baseline runs again)."""
  path = os.path.join(workdir, 'evaluate', 'result.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  done = result.get('variants', {})
  if set(variants) <= set(done) and all(v.get('seeds') == seeds for v in done.values()):
    return result
  return None


def percent(variant: dict) -> dict:
  accs = [100 * a for a in variant['test_top1']]
  return {'mean': 100 * variant['test_top1_mean'], 'std': 100 * variant['test_top1_std'],
          'test_top1': accs, 'seeds': variant['seeds'], 'steps': variant.get('steps')}


def markdown(table: dict, ipcs: list[int]) -> str:
  """mean +- std (%) per row and IPC; '-' where not measured."""
  lines = ['| row | ' + ' | '.join(f'IPC {i}' for i in ipcs) + ' |',
           '|---|' + '---|' * len(ipcs)]
  for name, cells in table.items():
    values = []
    for ipc in ipcs:
      cell = cells.get(str(ipc))
      values.append('-' if cell is None else f'{cell["mean"]:.2f} ± {cell["std"]:.2f}')
    lines.append(f'| {name} | ' + ' | '.join(values) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher_dir', default='')
  parser.add_argument('--teacher_dirs', default='',
                      help='comma-separated teachers: the table over each, in '
                           '<root>/<teacher_label(dir)>/, and <root>/over_teachers.{json,md}')
  parser.add_argument('--root', default='runs/methods')
  parser.add_argument('--ipcs', default='1,10,50')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--rows', default=','.join(r[0] for r in ROWS))
  parser.add_argument('--extra', default='',
                      help='space-separated extra main flags for every run, e.g. '
                           '--config.evaluate.stack_students=0')
  parser.add_argument('--baselines', default=None,
                      help='comma-separated evaluate baselines of the sre2l row (default: '
                           'every one available: random, hard_label, coreset)')
  parser.add_argument('--dry_run', action='store_true')
  parser.add_argument('--collect', action='store_true',
                      help='run nothing: write the table from the (row, IPC) runs finished')
  args = parser.parse_args(argv)
  teachers = [t for t in args.teacher_dirs.split(',') if t]
  if bool(teachers) == bool(args.teacher_dir):
    parser.error('give --teacher_dir (one teacher) or --teacher_dirs (several), not both.')
  rows = [r for r in args.rows.split(',') if r]
  unknown = set(rows) - {r[0] for r in ROWS}
  if unknown:
    parser.error(f'unknown rows {sorted(unknown)}; valid: {[r[0] for r in ROWS]}')
  if 'teachers' in rows and not (args.dry_run or args.collect):
    for teacher_dir in teachers or [args.teacher_dir]:
      if squeeze_extra_teachers(teacher_dir) is None:
        parser.error(f'the teachers row trains its extra teachers beside --teacher_dir, which '
                     f'must be <workdir>/squeeze/teacher; got {teacher_dir}')
  if not teachers:
    return run_table(args, args.teacher_dir, args.root, rows)
  labels = teacher_labels(teachers)
  tables = {label: run_table(args, teacher_dir, os.path.join(args.root, label), rows)
            for label, teacher_dir in zip(labels, teachers)}
  if args.dry_run:
    return {}
  summary = over_teachers(tables)
  summary['teacher_dirs'] = dict(zip(labels, map(os.path.abspath, teachers)))
  os.makedirs(args.root, exist_ok=True)
  with open(os.path.join(args.root, 'over_teachers.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  ipcs = sorted({int(i) for cells in summary['rows'].values() for i in cells})
  text = over_teachers_markdown(summary, ipcs)
  with open(os.path.join(args.root, 'over_teachers.md'), 'w') as f:
    f.write(text)
  print(text, flush=True)
  return summary


def teacher_labels(teacher_dirs: list[str]) -> list[str]:
  """A folder name per teacher: its run's workdir name for `<workdir>/squeeze/teacher`
  (runs/fm/squeeze/teacher -> 'fm'), else its own folder name; numbered where two agree."""
  labels = []
  for teacher_dir in teacher_dirs:
    path = os.path.normpath(os.path.abspath(teacher_dir))
    squeeze = os.path.dirname(path)
    labels.append(os.path.basename(os.path.dirname(squeeze))
                  if os.path.basename(squeeze) == 'squeeze' else os.path.basename(path))
  return [f'{k}_{label}' if labels.count(label) > 1 else label
          for k, label in enumerate(labels)]


def over_teachers(tables: dict) -> dict:
  """Per row and IPC over the teachers' tables ({label: main's output}): each teacher's mean,
  their mean and std (ddof 0) over teachers, and on how many teachers the row is ahead of the
  random subset and of the coreset (their rows of the same teacher), and on how many by more
  than the two stds over seeds combined."""
  random_title = dict(BASELINE_VARIANTS)['random']
  coreset_title = dict(BASELINE_VARIANTS)['coreset']
  rows = {}
  for title in dict.fromkeys(t for table in tables.values() for t in table['rows']):
    for ipc in sorted({i for table in tables.values() for i in table['rows'].get(title, {})},
                      key=int):
      means = {label: table['rows'][title][ipc]['mean'] for label, table in tables.items()
               if ipc in table['rows'].get(title, {})}
      cell = {'per_teacher': means, 'teachers': len(means),
              'mean': sum(means.values()) / len(means)}
      cell['std'] = (sum((m - cell['mean']) ** 2 for m in means.values()) / len(means)) ** 0.5
      for name, baseline in (('random', random_title), ('coreset', coreset_title)):
        pairs = [(tables[label]['rows'][title][ipc], tables[label]['rows'][baseline][ipc])
                 for label in means if ipc in tables[label]['rows'].get(baseline, {})]
        if pairs and title != baseline:
          ahead = [row['mean'] > base['mean'] for row, base in pairs]
          # The issue's goal: ahead by more than the two seeds' stds combined.
          clear = [row['mean'] - base['mean'] > row['std'] + base['std'] for row, base in pairs]
          cell[f'ahead_of_{name}'] = f'{sum(ahead)}/{len(ahead)}'
          cell[f'clear_of_{name}'] = f'{sum(clear)}/{len(clear)}'
      rows.setdefault(title, {})[ipc] = cell
  return {'rows': rows, 'unit': 'test top-1 %: per teacher the mean over seeds; mean and std '
                                '(ddof 0) over teachers'}


def over_teachers_markdown(summary: dict, ipcs: list[int]) -> str:
  """Mean +- std over teachers (%), the number of teachers, and on how many of them the row
  is ahead of the random subset / the coreset, and by more than the stds combined; '-' where
  not measured."""
  lines = ['| row | ' + ' | '.join(f'IPC {i}' for i in ipcs) + ' |',
           '|---|' + '---|' * len(ipcs)]
  for title, cells in summary['rows'].items():
    values = []
    for ipc in ipcs:
      cell = cells.get(str(ipc))
      if cell is None:
        values.append('-')
        continue
      ahead, clear = (', '.join(f'{cell[f"{kind}_{b}"]} {b}' for b in ('random', 'coreset')
                                if f'{kind}_{b}' in cell) for kind in ('ahead_of', 'clear_of'))
      values.append(f'{cell["mean"]:.2f} ± {cell["std"]:.2f} ({cell["teachers"]} teachers'
                    + (f'; ahead of: {ahead}; by more than the stds: {clear}' if ahead else '')
                    + ')')
    lines.append(f'| {title} | ' + ' | '.join(values) + ' |')
  return '\n'.join(lines) + '\n'


def run_table(args, teacher_dir: str, root: str, rows: list[str]) -> dict:
  """The table of `rows` over `args.ipcs` with one teacher, in `root` (see the module's
  docstring); returns what it writes to `<root>/methods_table.json`."""
  baselines = None if args.baselines is None else tuple(
      b for b in args.baselines.split(',') if b)
  ipcs = [int(i) for i in args.ipcs.split(',')]
  extra = tuple(args.extra.split())
  # Rows and IPCs of earlier invocations stay in the table (each cell is re-read below when
  # this invocation runs or finds it).
  out = {'rows': {}, 'runs': {}}
  previous = os.path.join(root, 'methods_table.json')
  if os.path.exists(previous):
    with open(previous) as f:
      out = json.load(f)
  current = {f'{r[0]}: {r[3]}' for r in ROWS} | {title for _, title in BASELINE_VARIANTS}
  out['rows'] = {k: v for k, v in out['rows'].items() if k in current}  # renamed rows go
  out.update(teacher_dir=os.path.abspath(teacher_dir), seeds=args.seeds,
             unit='test top-1 %, mean and std (ddof 0) over seeds')
  ipcs_all = sorted({int(i) for cells in out['rows'].values() for i in cells} | set(ipcs))
  if 'teachers' in rows and not (args.dry_run or args.collect):
    squeeze = squeeze_extra_teachers(teacher_dir)
    print(shlex.join(squeeze), flush=True)
    subprocess.run(squeeze, cwd=REPO, check=True)
  for ipc in ipcs:
    # The baseline row first: it trains the baselines the other rows are read against.
    for row in sorted(rows, key=lambda r: r != BASELINE_ROW):
      argv, workdir = command(row, ipc, args.seeds, teacher_dir, root, extra, baselines)
      if not args.collect:
        print(shlex.join(argv), flush=True)
      if args.dry_run:
        continue
      start = time.time()
      # The baseline row asked for baselines it lacks runs again (evaluate trains only those).
      wanted = ({'distilled'} if row != BASELINE_ROW or args.collect else expected_variants(
          available_baselines() if baselines is None else baselines))
      result = finished(workdir, args.seeds, wanted)
      if result is None and args.collect:
        continue
      ran_now = result is None
      if ran_now:
        subprocess.run(argv, cwd=REPO, check=True)
        result = finished(workdir, args.seeds, wanted)
        if result is None:
          raise RuntimeError(f'{workdir}: evaluate finished without {args.seeds} seeds')
      ran = out['runs'].get(f'{row}/ipc{ipc}', {})
      if ran_now or 'command' not in ran:  # wall seconds only of a run this one made
        ran = {'command': shlex.join(argv),
               'wall_seconds': round(time.time() - start, 1) if ran_now else None}
      ran['stage_seconds'] = stage_seconds(workdir)
      out['runs'][f'{row}/ipc{ipc}'] = ran
      variants = result['variants']
      label = next(r[3] for r in ROWS if r[0] == row)
      out['rows'].setdefault(f'{row}: {label}', {})[str(ipc)] = percent(variants['distilled'])
      if row == BASELINE_ROW:
        for name, title in BASELINE_VARIANTS:
          if name in variants:
            out['rows'].setdefault(title, {})[str(ipc)] = percent(variants[name])
      _write(root, out, ipcs_all)
  return out


def _write(root: str, out: dict, ipcs: list[int]) -> None:
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, 'methods_table.json'), 'w') as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(root, 'methods_table.md'), 'w') as f:
    f.write(markdown(out['rows'], ipcs))
  print(markdown(out['rows'], ipcs), flush=True)


if __name__ == '__main__':
  main()
