"""Model zoo: `create_model(model_config, num_classes)`."""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from sre2l_jax.models import ensemble
from sre2l_jax.models.convnet import ConvNet
from sre2l_jax.models.ensemble import Ensemble
from sre2l_jax.models.layers import BN_INPUTS, iter_in_call_order
from sre2l_jax.models.resnet import ResNet, ResNet18, ResNet50, ResNet101
from sre2l_jax.models.zoo import MLP, AlexNet, LeNet, VGG11

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
MODELS = {
    'convnet': lambda c, n, dt: ConvNet(num_classes=n, width=c.get('width', 128),
                                        depth=c.get('depth', 3),
                                        pooling=c.get('pooling', 'avg'), dtype=dt),
    # The evaluation zoo (DC/DSA/MTT's students); no BatchNorm except resnet18_small.
    'convnet_in': lambda c, n, dt: ConvNet(num_classes=n, width=c.get('width', 128),
                                           depth=c.get('depth', 3),
                                           pooling=c.get('pooling', 'avg'), norm='instance',
                                           dtype=dt),
    'mlp': lambda c, n, dt: MLP(num_classes=n, width=c.get('width', 128),
                                depth=c.get('depth', 3), dtype=dt),
    'lenet': lambda c, n, dt: LeNet(num_classes=n, dtype=dt),
    'alexnet': lambda c, n, dt: AlexNet(num_classes=n, width=c.get('width', 128), dtype=dt),
    'vgg11': lambda c, n, dt: VGG11(num_classes=n, width=c.get('width', 128), dtype=dt),
    # ResNet-18 with the CIFAR stem (3x3/1 conv, no max-pool) whatever `stem` says.
    'resnet18_small': lambda c, n, dt: ResNet18(num_classes=n, stem='small',
                                                width=c.get('width', 64), dtype=dt),
    'resnet18': lambda c, n, dt: ResNet18(num_classes=n, stem=c.get('stem', 'imagenet'),
                                          width=c.get('width', 64), dtype=dt),
    'resnet50': lambda c, n, dt: ResNet50(num_classes=n, stem=c.get('stem', 'imagenet'),
                                          width=c.get('width', 64), dtype=dt),
    'resnet101': lambda c, n, dt: ResNet101(num_classes=n, stem=c.get('stem', 'imagenet'),
                                            width=c.get('width', 64), dtype=dt),
}


def create_model(config: ml_collections.ConfigDict, num_classes: int, dtype: Any = None):
  """Builds the Linen module named by `config.name` (see `MODELS`).

  `config` may carry `width`, `depth`, `pooling` (ConvNet, ConvNet-IN; MLP: width, depth),
  `width` (AlexNet, VGG-11; 128 = the papers' sizes) or `stem`, `width` (ResNets);
  `dtype` overrides `config.dtype` ('float32' or 'bfloat16').
  """
  if config.name not in MODELS:
    raise ValueError(f'Unknown model {config.name!r}; valid models: {sorted(MODELS)}.')
  if dtype is None:
    name = config.get('dtype', 'float32')
    if name not in _DTYPES:
      raise ValueError(f'Unknown model dtype {name!r}; valid: {sorted(_DTYPES)}.')
    dtype = _DTYPES[name]
  return MODELS[config.name](config, num_classes, dtype)


def from_spec(spec: str, base: ml_collections.ConfigDict,
              drop: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """'convnet:width=32,depth=2' -> a model config: `base` (without the keys in `drop`) with
  that name and those keys (converted to the type of `base`'s value); 'mlp' -> `base` named
  mlp. Keys must be keys of `base`; the name must be one of `MODELS`."""
  name, _, rest = spec.partition(':')
  out = ml_collections.ConfigDict({k: v for k, v in base.to_dict().items() if k not in drop})
  out.name = name.strip()
  if out.name not in MODELS:
    raise ValueError(f'Model spec {spec!r}: unknown model {out.name!r}; valid models: '
                     f'{sorted(MODELS)}.')
  for item in filter(None, (x.strip() for x in rest.split(','))):
    key, sep, value = item.partition('=')
    key = key.strip()
    if not sep or key not in out or key == 'name':
      raise ValueError(f'Model spec {spec!r}: {item!r} is not key=value with a model key '
                       f'({", ".join(sorted(k for k in out if k != "name"))}).')
    out[key] = type(out[key])(value.strip()) if out[key] is not None else value.strip()
  return out


def check_buildable(config: ml_collections.ConfigDict, num_classes: int, image_shape,
                    what: str) -> None:
  """Raises ValueError naming `what` (e.g. 'student') unless `config` builds a model that
  runs at `image_shape` (traced only: nothing is computed or allocated)."""
  try:
    abstract_variables(create_model(config, num_classes), image_shape)
  except Exception as e:  # pylint: disable=broad-except  # unknown names, keys, shapes
    text = ' '.join(str(e).split())[:300] or type(e).__name__
    raise ValueError(f'{what} {config.to_dict()} cannot be built: {text}') from None


def split_specs(specs) -> list[str]:
  """A list of model specs from a tuple, or from a comma-separated string where the commas
  inside a spec ('mlp:width=128,depth=2,lenet') stay with their spec; stripped, in order,
  each once."""
  if isinstance(specs, str):
    items = []
    for token in specs.split(','):
      if '=' in token and ':' not in token and items:
        items[-1] += ',' + token
      else:
        items.append(token)
    specs = items
  return list(dict.fromkeys(s.strip() for s in specs if s.strip()))


def model_signature(config: ml_collections.ConfigDict, num_classes: int,
                    image_shape) -> dict:
  """What must match for a checkpoint of this model to be reusable (JSON-serialisable)."""
  keys = ('name', 'width', 'depth', 'pooling', 'stem')
  return {'model': {k: config.get(k) for k in keys if config.get(k) is not None},
          'num_classes': int(num_classes), 'image_shape': [int(s) for s in image_shape]}


def abstract_variables(model, image_shape, sharding=None) -> dict:
  """{'params', 'batch_stats'} of `model` as `jax.ShapeDtypeStruct`s (nothing allocated),
  with `sharding` attached when given (an Orbax restore target)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + tuple(image_shape))))
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      {k: shapes.get(k, {}) for k in ('params', 'batch_stats')})  # {}: a model without BN


__all__ = ['AlexNet', 'BN_INPUTS', 'ConvNet', 'Ensemble', 'LeNet', 'MLP', 'MODELS', 'ResNet',
           'ResNet18', 'ResNet50', 'ResNet101', 'VGG11', 'abstract_variables', 'create_model',
           'ensemble', 'iter_in_call_order', 'model_signature']
