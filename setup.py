"""Build script: the package is described in pyproject.toml; this file only adds the optional C++/CUDA
extension ``fastgrpo._C`` (see csrc/README.md). ``FASTGRPO_NO_EXT=1`` skips it."""

from setuptools import setup

setup()
