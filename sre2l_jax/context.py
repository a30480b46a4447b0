"""What every stage of one run shares, resolved once by the runner: the dataset's spec, the
mesh, where the teacher is.

`datasets.spec_of` lists and checks a user's image folder (and, with several processes,
waits at a barrier every process must reach), so it runs here once per run; stages read
`ctx.spec` instead.
"""

import dataclasses

import ml_collections
from jax.sharding import Mesh

from sre2l_jax import teacher
from sre2l_jax.data import batching
from sre2l_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class Context:
  """The run's resolved surroundings (`resolve`); a stage's `validate` and `run` take it."""
  spec: datasets.DatasetSpec
  mesh: Mesh
  teacher_dir: str  # where the teacher is read (and squeeze writes it)
  num_classes: int  # the dataset's (recover.num_classes may recover fewer)


def resolve(config: ml_collections.ConfigDict, workdir: str) -> Context:
  """The context of running `config` on `workdir`: call once per run, on every process."""
  spec = datasets.spec_of(config.dataset)
  return Context(spec=spec, mesh=batching.create_mesh(config.mesh_shape),
                 teacher_dir=teacher.teacher_dir(config, workdir), num_classes=spec.num_classes)
