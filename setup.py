"""Build script. Pure-Python metadata lives in pyproject.toml; this file only adds the C++ extension
when torch is importable at build time (see pyproject.toml for why torch is not a build requirement)."""
from setuptools import setup

setup()
