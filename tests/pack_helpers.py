"""Import the pack as ComfyUI does: its folder's `__init__.py` as a package of its own name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def import_pack(name: str) -> ModuleType:
    """Execute the pack's `__init__.py` as package `name` (registered in `sys.modules`, so
    `name.nodes...` imports resolve) and return it."""
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    return pack
