"""Builds the optional compiled kernels (csrc/) into wmdd._C. Until they exist this installs the
pure-Python package only; the stages fall back to POT / plain torch."""
from setuptools import setup

setup()
