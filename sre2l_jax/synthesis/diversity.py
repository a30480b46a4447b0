"""Which of a class's images are optimised when: DELT's early-late schedule
(recover.diversity='early_late') and refining only part of the set (recover.refine_fraction).

DELT (Shen, Sherif, Yin, Shao, "DELT: A Simple Diversity-driven EarlyLate Training for Dataset
Distillation", CVPR 2025) splits each class's IPC into sub-tasks that start optimising at
different iterations from different real images, so the images of a class end at different
distances from their starting points instead of all collapsing to the same mode. Here: the image
at ipc index i belongs to stage s = floor(i * S / ipc), S = min(recover.early_late.stages, ipc),
and gets gradients only from step s * iterations / S on; before that its gradient is zero, so
Adam leaves it untouched (its moments stay zero). Stage 0 (the first ipc indices: with
init='scored' and scored.coverage=False, the teacher's best-scored images) runs all the
iterations, stage S-1 the last 1/S of them, at the cosine schedule's tail.

`recover.refine_fraction` f < 1 optimises only the last ceil(f * ipc) ipc indices of each class
and keeps the others as they started (their gradient is always zero): with init='scored' those
are the images the teacher scores lowest, the hardest, refined, and the best-scored kept real
(they still count in their group's BatchNorm statistics, which the refined ones complete).
Both work with any method (the mask is applied to the gradients in `optimize.local_step`).
"""

import math

import jax.numpy as jnp

DIVERSITY = ('none', 'early_late')


def start_steps(uids, num_classes: int, cfg):
  """The step from which each image is optimised: (G, B) int32 like uids.

  uids: `optimize.group_layout`'s image ids (ipc index * num_classes + class); padding
  images (ipc index >= ipc) are put in the last stage.
  """
  stages = min(cfg.early_late.stages, cfg.ipc)  # at least one ipc index per stage
  ipc_index = uids // num_classes
  stage = jnp.minimum(ipc_index * stages // cfg.ipc, stages - 1)
  return (stage * cfg.iterations) // stages


def refined(uids, num_classes: int, cfg):
  """Whether each image is ever optimised (`recover.refine_fraction`): (G, B) bool like uids.
  Padding images (ipc index >= ipc) are."""
  kept = cfg.ipc - math.ceil(cfg.refine_fraction * cfg.ipc)
  return uids // num_classes >= kept


def mask_gradients(grads, uids, step, num_classes: int, cfg):
  """grads (G, B, H, W, C) with the images not optimised at `step` zeroed: those that have
  not started yet (early-late) and those kept as they started (refine_fraction < 1)."""
  validate(cfg)
  if cfg.diversity == 'none' and cfg.refine_fraction == 1:
    return grads
  active = jnp.ones(uids.shape, bool)
  if cfg.diversity == 'early_late':
    active = step >= start_steps(uids, num_classes, cfg)
  if cfg.refine_fraction != 1:
    active = active & refined(uids, num_classes, cfg)
  return jnp.where(active[:, :, None, None, None], grads, jnp.zeros_like(grads))


def validate(cfg) -> None:
  if cfg.diversity not in DIVERSITY:
    raise ValueError(f'recover.diversity={cfg.diversity!r}; valid: {DIVERSITY}.')
  if cfg.diversity == 'early_late' and cfg.early_late.stages < 1:
    raise ValueError(f'recover.early_late.stages={cfg.early_late.stages} must be >= 1 (at '
                     f'most ipc are used: a stage holds at least one ipc index).')
  if not 0 < cfg.refine_fraction <= 1:
    raise ValueError(f'recover.refine_fraction={cfg.refine_fraction} must be in (0, 1] (the '
                     f'share of each class\'s images that is optimised; 1: all).')
  if cfg.refine_fraction < 1 and cfg.init == 'noise':
    raise ValueError(f'recover.refine_fraction={cfg.refine_fraction} keeps some images as they '
                     f"start, and init='noise' starts them as noise: use init='scored' or "
                     f"'real' (or refine_fraction=1).")
