"""qframe's Hydra config tree (a package so it ships with qframe and compose() finds it)."""
