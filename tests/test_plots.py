"""The report's plots, drawn from metrics files written here in the documented format."""

import json
import os
import zipfile
from unittest import mock

import ml_collections
import numpy as np
from PIL import Image

from sre2l_jax import config_lib
from sre2l_jax import export
from sre2l_jax import metric_writers
from sre2l_jax import report
from sre2l_jax.data import datasets


def _write_jsonl(path, rows, tail=''):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows) + tail)


def _write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(data, f)


def _fake_run(workdir, ipc=10, accs=None, seeds=2):
  """A workdir as the stages leave it: config.json, evaluate/result.json naming each
  variant's folder, the students' and recover's metrics.jsonl."""
  accs = accs or {'distilled': 0.80, 'random': 0.83}
  _write_json(os.path.join(workdir, 'config.json'),
              {'dataset': {'name': 'fashion_mnist'}, 'recover': {'ipc': ipc}})
  variants = {}
  for k, (name, final) in enumerate(accs.items()):
    directory = f'evaluate/{name}/digest{k}'
    for seed in range(seeds):
      top1 = [final - 0.3, final - 0.1 + 0.01 * seed, final + 0.01 * seed]
      rows = []
      for step, acc in zip((100, 200, 300), top1):
        rows += [{'step': step, 'train_loss': 1.0 / step}, {'step': step, 'test_top1': acc}]
      _write_jsonl(os.path.join(workdir, directory, f'seed{seed}', 'logs', 'metrics.jsonl'),
                   rows)
    variants[name] = {'dir': directory, 'seeds': seeds, 'labels': 'soft', 'images': 10 * ipc,
                      'test_top1_mean': final + 0.005 * (seeds - 1), 'test_top1_std': 0.005,
                      'test_top1': [final + 0.01 * s for s in range(seeds)]}
  # Students of other settings beside the last run's: not plotted.
  _write_jsonl(os.path.join(workdir, 'evaluate/distilled/olddigest/seed0/metrics.jsonl'),
               [{'step': 1, 'test_top1': 0.1}])
  _write_json(os.path.join(workdir, 'evaluate/result.json'),
              {'stage': 'evaluate', 'dataset': 'fashion_mnist', 'ipc': ipc,
               'student': {'name': 'convnet', 'width': 64}, 'temperature': 4.0,
               'variants': variants})
  bn_rows = [{'step': s, 'loss': 9.0, 'bn/conv0': 8.0 / s, 'bn/conv1': 4.0 / s}
             for s in (1, 2, 4)]
  _write_jsonl(os.path.join(workdir, 'recover/logs/metrics.jsonl'), bn_rows)


def _png_size(path):
  with Image.open(path) as image:
    image.load()  # decodes the whole file: a truncated PNG fails here
    return image.size


def test_read_metrics_merges_a_step_and_skips_a_line_cut_by_a_kill(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  _write_jsonl(str(path), [{'step': 2, 'loss': 1.0}, {'step': 1, 'loss': 3.0},
                           {'step': 2, 'test_top1': 0.5}, {'step': 2, 'loss': 0.5}],
               tail='{"step": 3, "lo')
  assert metric_writers.read_metrics(path) == [{'step': 1, 'loss': 3.0},
                                               {'step': 2, 'loss': 0.5, 'test_top1': 0.5}]


def test_curves_come_from_the_last_evaluation_and_recover(tmp_path):
  workdir = str(tmp_path / 'run')
  _fake_run(workdir)
  curves = report.student_curves(workdir)
  assert sorted(curves) == ['distilled', 'random']
  assert len(curves['distilled']) == 2  # two seeds; the old digest's student left out
  steps, accs = curves['random'][1]
  assert steps == [100, 200, 300]
  np.testing.assert_allclose(accs, [0.53, 0.74, 0.84])
  bn = report.bn_curves(workdir)
  assert list(bn) == ['conv0', 'conv1']
  assert bn['conv1'] == ([1, 2, 4], [4.0, 2.0, 1.0])


def test_student_curves_name_the_architecture_when_there_are_several(tmp_path):
  workdir = tmp_path / 'run'
  _fake_run(str(workdir))
  result = json.loads((workdir / 'evaluate' / 'result.json').read_text())
  result['architectures'] = {'convnet': result['variants'],
                             'resnet18': {'distilled': result['variants']['distilled']}}
  (workdir / 'evaluate' / 'result.json').write_text(json.dumps(result))
  curves = report.student_curves(str(workdir))
  assert sorted(curves) == ['convnet distilled', 'convnet random', 'resnet18 distilled']


def test_report_writes_and_links_the_run_plots(tmp_path):
  workdir = str(tmp_path / 'run')
  _fake_run(workdir)
  config = config_lib.base_config()
  data = report.write(config, workdir)
  assert set(data['plots']) == {'student_accuracy', 'recover_bn'}
  for path in data['plots'].values():
    assert _png_size(path) == (720, 480)  # 6 x 4 inches at 120 dpi
  markdown = (tmp_path / 'run' / 'report.md').read_text()
  assert '](plots/student_accuracy.png)' in markdown
  assert '](plots/recover_bn.png)' in markdown


def test_a_run_without_metrics_gets_no_plots_and_no_error(tmp_path):
  assert report.write_plots(str(tmp_path)) == {}
  assert not os.path.exists(tmp_path / report.PLOTS)
  # A recover folder without metrics (a set written by another tool): no plot, no warning.
  os.makedirs(tmp_path / 'recover' / 'tfds' / 'distilled_images')
  with mock.patch.object(report.logging, 'warning') as warning:
    assert report.write_plots(str(tmp_path)) == {}
  warning.assert_not_called()


def test_metrics_are_found_below_the_stage_folder(tmp_path):
  path = tmp_path / 'recover' / 'rounds' / 'metrics.jsonl'
  os.makedirs(path.parent)
  path.write_text('')
  assert str(report.find_metrics(tmp_path / 'recover')) == str(path)


def test_command_line_plots_accuracy_against_ipc_over_workdirs(tmp_path):
  workdirs = []
  for ipc, accs in ((1, {'distilled': 0.67, 'random': 0.65}),
                    (10, {'distilled': 0.80, 'random': 0.83}),
                    (50, {'distilled': 0.87, 'random': 0.90})):
    workdirs.append(str(tmp_path / f'ipc{ipc}'))
    _fake_run(workdirs[-1], ipc=ipc, accs=accs, seeds=1)
  points = report.ipc_points(workdirs)
  assert points['fashion_mnist']['random'] == {1: (0.65, 0.005), 10: (0.83, 0.005),
                                               50: (0.90, 0.005)}
  out = tmp_path / 'docs'
  report.main([f'--workdirs={",".join(workdirs)}', f'--out_dir={out}'])
  written = sorted(os.listdir(out))
  assert written == sorted(['fashion_mnist_accuracy_vs_ipc.png'] + [
      f'fashion_mnist_ipc{ipc}_{name}.png' for ipc in (1, 10, 50)
      for name in ('student_accuracy', 'recover_bn')])
  assert _png_size(out / 'fashion_mnist_accuracy_vs_ipc.png') == (720, 480)


def test_grid_labels_its_rows_with_class_names(tmp_path):
  names = datasets.class_names(ml_collections.ConfigDict({'name': 'fashion_mnist'}))
  assert names[0] == 'T-shirt/top' and names[9] == 'Ankle boot' and len(names) == 10
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 2, 28, 28, 1), dtype=np.uint8)
  plain, labelled = str(tmp_path / 'plain.png'), str(tmp_path / 'labelled.png')
  export.write_grid(plain, images)
  export.write_grid(labelled, images, class_names=names[:3])
  with Image.open(plain) as a, Image.open(labelled) as b:
    a, b = np.asarray(a.convert('L')), np.asarray(b.convert('L'))
  assert a.shape[0] == b.shape[0] and b.shape[1] > a.shape[1]  # a margin for the names
  margin = b[:, :b.shape[1] - a.shape[1]]
  assert (margin < 128).any()  # text drawn in it
  np.testing.assert_array_equal(b[:, b.shape[1] - a.shape[1]:], a)  # the images unchanged


def test_tiny_imagenet_class_names_come_from_the_zip_else_indices(tmp_path):
  config = ml_collections.ConfigDict({'name': 'tiny_imagenet', 'manual_dir': str(tmp_path)})
  assert datasets.class_names(config)[:3] == ['0', '1', '2']  # no zip at hand
  wnids = [f'n{i:08d}' for i in range(200)]
  with zipfile.ZipFile(tmp_path / 'tiny-imagenet-200.zip', 'w') as archive:
    archive.writestr('tiny-imagenet-200/wnids.txt', '\n'.join(reversed(wnids)) + '\n')
    archive.writestr('tiny-imagenet-200/words.txt', ''.join(
        f'{w}\tname {i}, other name\n' for i, w in enumerate(wnids)) + 'n99999999\tunused\n')
  names = datasets.class_names(config)
  assert len(names) == 200 and names[:2] == ['name 0', 'name 1'] and names[-1] == 'name 199'
