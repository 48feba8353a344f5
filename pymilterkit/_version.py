"""The package version, in one place: `pymilterkit.__version__` and the build both read it.

A module of its own so the package's modules can name the version without importing the package's
`__init__` (which imports them).
"""

__version__ = "0.1.0"
