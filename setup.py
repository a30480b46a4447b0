"""setuptools' entry point; the metadata and dependencies are in setup.cfg.

configs/ stays at the top of the repository (one file per experiment, the design card) and
is installed as the package data folder `sre2l_jax/configs`, so that an installed wheel
loads a config by name: `sre2l-jax --config=fashion_mnist_ipc10:smoke` (config_lib).
"""

import setuptools

setuptools.setup(
    packages=setuptools.find_packages(include=['sre2l_jax', 'sre2l_jax.*']) +
    ['sre2l_jax.configs'],
    package_dir={'sre2l_jax.configs': 'configs'})
