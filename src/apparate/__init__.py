"""apparate: early-exit ML serving (see apparate.api for the Python API)."""

__version__ = "0.1.0"

from apparate.api import compare, prepare, serving  # noqa: E402  (light: each imports what it needs when called)

__all__ = ["__version__", "compare", "prepare", "serving"]
