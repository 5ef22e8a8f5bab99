"""End-to-end checks of the pack inside a real ComfyUI server.

Runs every check of `scripts/comfyui_e2e.py` (one test each) against one server started for
this module. Needs a ComfyUI checkout: set COMFYUI_PATH (see README, "End-to-end check
against a real ComfyUI"); skipped otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import comfyui_e2e as e2e  # scripts/ is not a package

pytestmark = pytest.mark.comfyui


@pytest.mark.parametrize("check", [check for _, check in e2e.CHECKS], ids=[name for name, _ in e2e.CHECKS])
def test_comfyui_e2e(comfyui_ctx: e2e.E2EContext, check: e2e.Check) -> None:
    try:
        check(comfyui_ctx)
    except e2e.CheckSkipped as err:
        pytest.skip(str(err))
    except e2e.CheckFailed as err:
        pytest.fail(str(err), pytrace=False)
