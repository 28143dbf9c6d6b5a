"""qframe's Hydra config tree, installed as the package ``qframe.conf`` (see setup.py), so that it
ships with qframe and ``python -m qframe`` and ``compose(config_module="qframe.conf")`` find it."""
