"""Node functions report a missing package in one line instead of a bare ModuleNotFoundError.

The pack registers its nodes even when a required package is missing from ComfyUI's Python
(importing the pack needs none of them); the first node that needs the package then fails
with a message naming it and the install command.
"""

from __future__ import annotations

import functools
from typing import Any

from ..trainer.dependencies import PACKAGES, MissingPackageError, missing_package_message


def _explained(function: Any) -> Any:
    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if isinstance(exc, MissingPackageError) or top not in PACKAGES:
                raise
            raise MissingPackageError(missing_package_message(top)) from exc

    return run


def explain_missing_packages(node_classes: dict[str, type]) -> dict[str, type]:
    """Wrap each node class's `FUNCTION` (in place); returns the mapping."""
    for cls in node_classes.values():
        name = cls.FUNCTION
        setattr(cls, name, _explained(getattr(cls, name)))
    return node_classes
