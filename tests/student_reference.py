"""The single-student programs evaluate and continual ran before students were stacked: the
reference "alone" of the equivalence tests (a student trained by itself, step by step, with
no student axis anywhere), against which `student`'s stacked steps are compared.

Each is `student.student_step` / `student.continual_step` of one state, jitted with the
batch sharded on 'data'; top-1 is `train_lib.top1` with `train_lib.create_eval_step`.
"""

import functools

import jax

from sre2l_jax import student
from sre2l_jax import views
from sre2l_jax.data import batching


def create_student_step(config, spec, teacher_model, mesh, target: str):
  """Jitted `student.student_step`: (state, images, labels, stored, key, teacher) ->
  (state, metrics), the state donated, the batch sharded on 'data'."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(student.student_step,
                        lesson=student.create_lesson(config, spec, teacher_model, target)),
      in_shardings=(replicated, sharded, sharded, sharded, replicated, replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def create_continual_step(config, spec, teacher_model, mesh):
  """Jitted `student.continual_step`: (state, images, labels, key, teacher, mask, lr)."""
  sharded, replicated = batching.data_sharding(mesh), batching.replicated(mesh)
  return jax.jit(
      functools.partial(student.continual_step,
                        lesson=student.continual_lesson(config, spec, teacher_model)),
      in_shardings=(replicated, sharded, sharded, replicated, replicated, replicated,
                    replicated),
      out_shardings=(replicated, replicated), donate_argnums=0)


def batch_fn(schedule: views.Schedule, images, labels, mesh, stored=None):
  """step (1-based) -> (images, labels, stored arrays or None, view key) of that step's
  batch of one image set, on the mesh."""
  sharded = batching.data_sharding(mesh)

  def get(step):
    epoch, b = schedule.position(step - 1)
    index = schedule.batch_indices(epoch, b)
    batch_stored = None
    if stored is not None:
      batch_stored = {k: jax.device_put(v[b], sharded) for k, v in stored.epoch(epoch).items()}
    return (jax.device_put(images[index], sharded), jax.device_put(labels[index], sharded),
            batch_stored, schedule.view_key(epoch, b))
  return get
