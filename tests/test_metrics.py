"""Metric writers (TensorBoard events + metrics.jsonl, no TensorFlow) and the progress line."""

import json
import logging
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from sre2l_jax import metric_writers
from sre2l_jax import train_lib


def _crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), bit by bit: independent of the writer's table."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
  crc = _crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir) -> list:
  """Every Event of the events files in `logdir`, CRCs checked (TFRecord framing)."""
  _, event_pb2, _ = metric_writers._tensorboardx()
  events = []
  for name in sorted(os.listdir(logdir)):
    if not name.startswith('events.out.tfevents.'):
      continue
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    at = 0
    while at < len(data):
      header = data[at:at + 8]
      (length,) = struct.unpack('<Q', header)
      assert struct.unpack('<I', data[at + 8:at + 12])[0] == _masked(header)
      body = data[at + 12:at + 12 + length]
      assert struct.unpack('<I', data[at + 12 + length:at + 16 + length])[0] == _masked(body)
      events.append(event_pb2.Event.FromString(body))
      at += 16 + length
  return events


def scalars_of(events) -> dict:
  """{tag: [(step, value), ...]} of the scalar summaries."""
  out = {}
  for event in events:
    for value in event.summary.value:
      if value.HasField('simple_value'):
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_writer_writes_events_and_jsonl_without_tensorflow(tmp_path):
  logdir = tmp_path / 'logs'
  writer = metric_writers.create_writer(str(logdir))
  writer.write_hparams({'squeeze': {'lr': 0.1, 'augment': 'flip', 'pad': None},
                        'seed': 3, 'stages': ('squeeze', 'recover')}, metrics=('accuracy',))
  writer.write_scalars(4, {'loss': jnp.float32(2.5), 'accuracy': np.float64(0.25)})
  writer.write_scalars(8, {'loss': 1.5, 'bn/bn0': 7.0})
  writer.write_images(8, {'grid': np.zeros((2, 6, 5, 3), np.uint8)})
  writer.write_texts(8, {'note': 'hello'})
  writer.close()

  records = metric_writers.read_metrics(logdir / 'metrics.jsonl')
  assert records == [{'step': 4, 'loss': 2.5, 'accuracy': 0.25},
                     {'step': 8, 'loss': 1.5, 'bn/bn0': 7.0}]
  hparams = json.loads((logdir / 'hparams.json').read_text())
  assert hparams['squeeze']['lr'] == 0.1 and hparams['seed'] == 3

  events = read_events(logdir)
  assert events[0].file_version == 'brain.Event:2'
  assert scalars_of(events) == {'loss': [(4, 2.5), (8, 1.5)], 'accuracy': [(4, 0.25)],
                                'bn/bn0': [(8, 7.0)]}
  tags = {v.tag: v for e in events for v in e.summary.value}
  assert tags['grid/0'].image.height == 6 and tags['grid/1'].image.width == 5
  assert 'note' in ''.join(tags)  # tensorboardX names text summaries '<tag>/text_summary'
  plugins = {v.metadata.plugin_data.plugin_name for e in events for v in e.summary.value}
  assert 'hparams' in plugins
  session = next(v for e in events for v in e.summary.value
                 if v.tag == '_hparams_/session_start_info')
  # The flattened config is in TensorBoard's HParams tab.
  assert b'squeeze.lr' in session.metadata.plugin_data.content
  assert b'squeeze.augment' in session.metadata.plugin_data.content
  # The experiment names the run's metric, so the tab shows the last `accuracy` per run.
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=g-import-not-at-top
  experiment = next(v for e in events for v in e.summary.value
                    if v.tag == '_hparams_/experiment')
  data = plugin_hparams_pb2.HParamsPluginData.FromString(experiment.metadata.plugin_data.content)
  assert [m.name.tag for m in data.experiment.metric_infos] == ['accuracy']
  # In a fresh interpreter: other tests of this process may import TensorFlow themselves
  # (the ImageNet builder's tests), so this process's sys.modules proves nothing.
  code = ('import sys; from sre2l_jax import metric_writers as m; w = m.create_writer(sys.argv[1]); '
          'w.write_scalars(1, {"loss": 1.0}); w.write_hparams({"a": 1}); w.close(); '
          'print(sorted(k for k in ("tensorflow", "torch", "clu") if k in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'fresh')], check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == '[]'


def test_resumed_writer_appends(tmp_path):
  for step in (1, 2):
    writer = metric_writers.create_writer(tmp_path)
    writer.write_scalars(step, {'loss': float(step)})
    writer.close()
  assert [r['step'] for r in metric_writers.read_metrics(tmp_path / 'metrics.jsonl')] == [1, 2]
  assert [s for s, _ in scalars_of(read_events(tmp_path))['loss']] == [1, 2]
  # A run resumed from an earlier checkpoint writes step 2 again: the later line wins.
  writer = metric_writers.create_writer(tmp_path)
  writer.write_scalars(2, {'loss': 5.0, 'lr': 0.1})
  writer.close()
  assert metric_writers.read_metrics(tmp_path / 'metrics.jsonl') == [
      {'step': 1, 'loss': 1.0}, {'step': 2, 'loss': 5.0, 'lr': 0.1}]


def test_remote_files_are_rewritten_whole_on_flush(tmp_path, monkeypatch):
  """Object stores cannot append: the content is uploaded whole, starting from what exists."""
  monkeypatch.setattr(metric_writers, 'is_remote', lambda path: True)
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1}\n')
  f = metric_writers.AppendFile(metric_writers.epath.Path(path))
  f.write(b'{"step": 2}\n')
  assert path.read_text() == '{"step": 1}\n'  # nothing uploaded before a flush
  f.flush()
  assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
  f.write(b'{"step": 3}\n')
  f.close()
  assert path.read_text().splitlines()[-1] == '{"step": 3}'


def test_other_processes_write_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(metric_writers.jax, 'process_index', lambda: 1)
  writer = metric_writers.create_writer(tmp_path / 'logs')
  writer.write_scalars(1, {'loss': 1.0})
  writer.write_hparams({'a': 1})
  writer.close()
  assert not (tmp_path / 'logs').exists()


def test_unknown_backend_is_refused():
  with pytest.raises(ValueError, match='valid: tensorboardx, clu'):
    metric_writers.set_default_backend('tf')


def test_run_loop_writes_named_vector_metrics_and_prints_progress(tmp_path, caplog):
  """The loop writes every interval's means (a vector metric under the names given), the lr
  and throughput, and prints about `progress_lines` lines with steps/s and the ETA."""
  writer = train_lib.create_writer(tmp_path)
  loop = train_lib.Loop(name='toy', total_steps=40, log_every=2, writer=writer,
                        examples_per_step=5, schedule=lambda s: 0.5 / s,
                        vector_names={'per_layer': ('bn/a', 'bn/b')},
                        show=('loss', 'bn'), progress_lines=4)

  def step_fn(state, step):
    per_layer = jnp.array([step, 2.0 * step], jnp.float32)
    return state + 1, {'loss': jnp.float32(1.0 / step), 'bn': per_layer.sum(),
                       'per_layer': per_layer, 'other': jnp.arange(3.0)}

  with caplog.at_level(logging.INFO):
    state, result = train_lib.run_loop(loop, jnp.int32(0), 0, step_fn)
  writer.close()
  assert int(state) == 40
  records = metric_writers.read_metrics(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in records] == list(range(2, 41, 2))
  assert records[0]['bn/a'] == pytest.approx(1.5) and records[0]['bn/b'] == pytest.approx(3.0)
  assert records[0]['other_02'] == 2.0 and 'per_layer_00' not in records[0]
  assert records[-1]['lr'] == pytest.approx(0.5 / 40)
  assert records[-1]['examples_per_second'] > 0
  assert result.means['bn/a'] == pytest.approx(20.5)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith('toy: step')]
  assert 3 <= len(lines) <= 5, lines
  assert lines[-1].startswith('toy: step 40/40 (100%) loss ')
  assert ' bn ' in lines[-1] and 'steps/s | ETA 0:00' in lines[-1]
  assert all('ETA' in line for line in lines)


def test_progress_line_and_eta(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metric_writers.time, 'perf_counter', lambda: clock[0])
  progress = metric_writers.Progress('recover round 1/1', 1000, lines=4)
  progress.start(1)
  clock[0] += 99.0  # 99 steps in 99 s after the first
  line = progress.line(100, {'loss': 0.123456, 'bn_loss': 3.0, 'accuracy': 1.0})
  assert line == ('recover round 1/1: step 100/1000 (10%) loss 0.1235 accuracy 1 | '
                  '1 steps/s | ETA 15:00')
  assert metric_writers.format_seconds(3725) == '1:02:05'


def test_progress_lines_0_prints_nothing(caplog):
  progress = metric_writers.Progress('continual step 1/5', 10, lines=0)
  progress.start(1)
  with caplog.at_level(logging.INFO):
    assert not any(progress.update(step, {'loss': 1.0}) for step in range(2, 11))
  assert not caplog.records


def test_student_writers_split_a_stacks_metrics_by_student(tmp_path):
  """A stacked loop's metric with a leading student axis goes entry i to student i's
  writer under its own name, scalars to every writer; a plain writer names the entries
  <name>_00, <name>_01 (no names given)."""
  writers = metric_writers.StudentWriters(
      [train_lib.create_writer(tmp_path / f's{i}') for i in range(2)], step_offset=10)
  loop = train_lib.Loop(name='stack', total_steps=4, log_every=2, writer=writers,
                        show=('loss',), progress_lines=0)

  def step_fn(state, step):
    return state, {'loss': jnp.array([1.0, 2.0]) * step}

  _, result = train_lib.run_loop(loop, jnp.int32(0), 0, step_fn)
  writers.close()
  np.testing.assert_allclose(result.means['loss'], [2.5, 5.0])
  for i in range(2):
    records = metric_writers.read_metrics(tmp_path / f's{i}' / 'metrics.jsonl')
    assert [r['step'] for r in records] == [12, 14]
    assert [r['loss'] for r in records] == [1.5 * (i + 1), 3.5 * (i + 1)]
    assert set(records[0]) == {'step', 'loss', 'examples_per_second'}
  plain = train_lib.create_writer(tmp_path / 'plain')
  plain.write_scalars(1, {'loss': np.array([1.0, 2.0]), 'lr': 0.5})
  plain.close()
  assert metric_writers.read_metrics(tmp_path / 'plain' / 'metrics.jsonl') == [
      {'step': 1, 'loss_00': 1.0, 'loss_01': 2.0, 'lr': 0.5}]
