"""The probe's cases (refusals, clear errors, nothing outside touched, nothing lost) inside a
real ComfyUI server.

Runs every check of `scripts/comfyui_probe.py` (one test each) against one server started for
this module. Needs a ComfyUI checkout: set COMFYUI_PATH (see README, "End-to-end check
against a real ComfyUI"); skipped otherwise. The cases that need no server run as unit tests
(tests/test_paths.py, tests/test_train_runs.py, tests/test_train_isolation.py, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import comfyui_e2e as e2e  # scripts/ is not a package
import comfyui_probe as probe

pytestmark = pytest.mark.comfyui


@pytest.mark.parametrize("check", [check for _, check in probe.CHECKS], ids=[name for name, _ in probe.CHECKS])
def test_comfyui_probe(comfyui_ctx: e2e.E2EContext, check: e2e.Check) -> None:
    try:
        check(comfyui_ctx)
    except e2e.CheckFailed as err:
        pytest.fail(str(err), pytrace=False)
