"""Build script. Metadata lives in pyproject.toml; this file exists to build native extensions
(csrc/) against the installed torch. Today qframe is pure Python, so it builds none."""

from setuptools import setup

setup()
