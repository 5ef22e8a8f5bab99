"""First-step parity of our sampler with ComfyUI's native S2V path (`scripts/sampler_parity.py`).

The ComfyUI tests run the script's `run_parity` once against a real server (a few minutes on
CPU; the ~1 GB of random models are built once and kept in S2V_PARITY_DIR or the user cache).
They need a ComfyUI checkout in COMFYUI_PATH and are skipped otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import sampler_parity as parity  # scripts/ is not a package

from trainer.sample.pipeline import make_scheduler


def test_matched_shift_starts_at_sigma_one() -> None:
    """The script compares ComfyUI's first step (sigma 1, t = 1000) with ours at MATCHED_SHIFT:
    that only holds while our first sigma rounds to exactly 1.0 there."""
    settings = parity.ParitySettings()
    config, _ = parity.sampler_config(settings, "comfyui", 1.0, parity.MATCHED_SHIFT).resolved()
    scheduler = make_scheduler(config)
    assert float(scheduler.sigmas[0]) == 1.0
    assert float(scheduler.timesteps[0]) == 1000.0
    default, _ = parity.sampler_config(settings, "comfyui", 1.0, 0.0).resolved()
    assert float(make_scheduler(default).sigmas[0]) < 1.0  # the schedule-gap row really differs


@pytest.fixture(scope="module")
def report() -> parity.ParityReport:
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to compare the sampler with")
    return parity.run_parity(comfyui, parity.ParitySettings(), log=lambda message: None)


@pytest.mark.comfyui
def test_comfyui_numerics_match_comfyui_first_step(report: parity.ParityReport) -> None:
    """numerics="comfyui", cfg 1 and cfg > 1, with ComfyUI's own audio encoder and with ours
    fed to ComfyUI: the first-step x0 equals ComfyUI's to the tolerance."""
    asserted = [row for row in report.rows if row.tolerance is not None]
    assert {(row.cfg, row.case) for row in asserted} == {
        (cfg, f"matched schedule, audio {source}")
        for cfg in (1.0, report.settings.guidance)
        for source in parity.AUDIO_SOURCES
    }
    assert all(row.first_sigma == 1.0 for row in asserted)
    assert all(norm > 0.1 for norm in report.reference_norm.values())  # a real prediction, not zeros
    failed = [row for row in asserted if not row.passed]
    assert not failed, parity.format_report(report)


@pytest.mark.comfyui
def test_official_numerics_differ_measurably(report: parity.ParityReport) -> None:
    """The comparison is sensitive: the official audio alignment moves x0 far above the tolerance."""
    official = [row for row in report.rows if row.numerics == "official"]
    assert official
    assert all(row.rel_l2 > 100 * report.settings.tolerance for row in official), parity.format_report(report)


@pytest.mark.comfyui
def test_audio_encoder_hidden_states_match_comfyui(report: parity.ParityReport) -> None:
    """Our wav2vec2 hidden states (all 25) equal ComfyUI's AudioEncoderEncode output."""
    errors = report.audio_layer_rel_l2
    assert len(errors) == 25
    bad = {layer: error for layer, error in enumerate(errors) if not error <= 1e-5}
    assert not bad, f"layers whose relative L2 error exceeds 1e-5: {bad}"
