"""LoRA files made elsewhere, applied to the tiny S2V model.

Small real safetensors files are written here in each layout Wan users meet, from the real key
patterns (the names are spelled out below, not produced by the loader): ComfyUI / original Wan
names (``lora_A``/``lora_B`` and ``lora_down``/``lora_up``, with and without ``.alpha`` and the
``diffusion_model.`` prefix), kohya / musubi-tuner (``lora_unet_``, also Wan Fun's
``lora_unet__``), Diffusers (``transformer.`` / ``diffusion_model.`` prefix, peft config in the
header), DiffSynth-Studio (``lora_A.default``, ``pipe.dit.``), step-distill files with full
differences (``.diff``, ``.diff_b``) and ``lora_B.bias``, a Wan T2V and a Wan 2.1 I2V LoRA on
S2V, files for other models, and broken files. The weight change each one makes is checked
against ``strength * alpha / rank * B @ A`` (or ``strength * diff``) on exactly the modules
named, and the model is bit-identical afterwards.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file

from trainer.lora.io import LoraFileError, load_lora, read_lora_file
from trainer.lora.keys import WAN_MODULES, resolve_module
from trainer.model.tiny import build_tiny_transformer
from trainer.sample.lora import LoraSpec, applied_loras

# Our module -> its original Wan / ComfyUI path (spelled out: the test's own reference).
ORIGINAL = {
    "blocks.0.attn1.to_q": "blocks.0.self_attn.q",
    "blocks.1.attn1.to_out.0": "blocks.1.self_attn.o",
    "blocks.2.attn2.to_k": "blocks.2.cross_attn.k",
    "blocks.3.attn2.to_out.0": "blocks.3.cross_attn.o",
    "blocks.0.ffn.net.0.proj": "blocks.0.ffn.0",
    "blocks.3.ffn.net.2": "blocks.3.ffn.2",
    "audio_injector.injector.1.to_v": "audio_injector.injector.1.v",
    "audio_injector.injector_adain_layers.0.linear": "audio_injector.injector_adain_layers.0.linear",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.causal_audio_encoder.encoder.final_linear": "casual_audio_encoder.encoder.final_linear",
    "proj_out": "head.head",
}
RANKS = {module: 2 if module == "blocks.3.ffn.net.2" else 4 for module in ORIGINAL}
ALPHAS = {module: 2.0 if module == "blocks.0.attn1.to_q" else 8.0 for module in ORIGINAL}
STRENGTH = 0.7


@pytest.fixture(scope="module")
def model():
    return build_tiny_transformer()


def _linear(model, name: str) -> torch.nn.Linear:
    layer = model.get_submodule(name)
    return getattr(layer, "base_layer", layer)


def _pairs(model, modules, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Random (down [r, in], up [out, r]) for `modules`, shaped after the model's layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        layer, rank = _linear(model, module), RANKS.get(module, 4)
        out[module] = (torch.randn(rank, layer.in_features, generator=g) * 0.3,
                       torch.randn(layer.out_features, rank, generator=g) * 0.3)
    return out


def _kohya(original: str, prefix: str = "lora_unet_") -> str:
    return prefix + original.replace(".", "_")


# layout -> (key of down, key of up, key of alpha or None) for (our module, original path)
LAYOUTS = {
    "comfyui": lambda m, o: (f"diffusion_model.{o}.lora_A.weight", f"diffusion_model.{o}.lora_B.weight",
                             f"diffusion_model.{o}.alpha"),
    "comfyui_no_alpha": lambda m, o: (f"diffusion_model.{o}.lora_A.weight", f"diffusion_model.{o}.lora_B.weight",
                                      None),
    "original_down_up": lambda m, o: (f"{o}.lora_down.weight", f"{o}.lora_up.weight", f"{o}.alpha"),
    "kohya": lambda m, o: (f"{_kohya(o)}.lora_down.weight", f"{_kohya(o)}.lora_up.weight", f"{_kohya(o)}.alpha"),
    "kohya_wan_fun": lambda m, o: (f"{_kohya(o, 'lora_unet__')}.lora_down.weight",
                                   f"{_kohya(o, 'lora_unet__')}.lora_up.weight", f"{_kohya(o, 'lora_unet__')}.alpha"),
    "diffusers": lambda m, o: (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", None),
    "diffusers_pipeline_metadata": lambda m, o: (f"transformer.{m}.lora_A.weight",
                                                 f"transformer.{m}.lora_B.weight", None),
    "diffusers_no_metadata": lambda m, o: (f"diffusion_model.{m}.lora_A.weight",
                                           f"diffusion_model.{m}.lora_B.weight", None),
    "diffsynth": lambda m, o: (f"pipe.dit.{o}.lora_A.default.weight", f"pipe.dit.{o}.lora_B.default.weight", None),
    "diffsynth_prefix_removed": lambda m, o: (f"{o}.lora_A.default.weight", f"{o}.lora_B.default.weight", None),
}
FORMATS = {"comfyui": "comfyui", "comfyui_no_alpha": "comfyui", "original_down_up": "original", "kohya": "kohya",
           "kohya_wan_fun": "kohya", "diffusers": "diffusers", "diffusers_pipeline_metadata": "diffusers",
           "diffusers_no_metadata": "diffusers", "diffsynth": "diffsynth", "diffsynth_prefix_removed": "diffsynth"}


def _metadata(layout: str) -> dict[str, str]:
    """The peft config Diffusers writes: default alpha 8, one module's alpha in the pattern."""
    config = {"r": 4, "lora_alpha": 8.0, "alpha_pattern": {"blocks.0.attn1.to_q": 2.0},
              "rank_pattern": {"blocks.3.ffn.net.2": 2}, "target_modules": sorted(ORIGINAL)}
    if layout == "diffusers_pipeline_metadata":  # a pipeline's save_lora_weights prefixes the component
        config = {f"transformer.{k}": v for k, v in config.items()}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(config)}


def _expected_alpha(layout: str, module: str) -> float:
    if layout.startswith(("diffusers_no", "diffsynth", "comfyui_no")):
        return float(RANKS[module])  # no alpha anywhere: scale 1
    return ALPHAS[module]


def _write_layout(path, layout: str, pairs) -> None:
    tensors = {}
    for module, (down, up) in pairs.items():
        down_key, up_key, alpha_key = LAYOUTS[layout](module, ORIGINAL[module])
        tensors[down_key], tensors[up_key] = down, up
        if alpha_key is not None:
            tensors[alpha_key] = torch.tensor(ALPHAS[module])
    metadata = _metadata(layout) if layout in ("diffusers", "diffusers_pipeline_metadata") else None
    save_file(tensors, str(path), metadata=metadata)


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Base parameters by their plain names (peft's ``base_layer.`` dropped, adapters left out)."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if "lora_" not in k}


def _lora_delta(model, module: str) -> torch.Tensor:
    """[out, in] what the module's adapters add to its weight, seen through its forward."""
    layer = model.get_submodule(module)
    x = torch.eye(layer.base_layer.in_features)
    with torch.no_grad():
        return (layer(x) - layer.base_layer(x)).T


def _wrapped(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_changes_exactly_the_named_weights(tmp_path, model, layout):
    pairs = _pairs(model, ORIGINAL)
    path = tmp_path / f"{layout}.safetensors"
    _write_layout(path, layout, pairs)

    lora = read_lora_file(path)
    assert lora.format == FORMATS[layout]
    assert lora.report.made_for == "wan-s2v"  # the audio injector and audio encoder keys say so
    assert sum(lora.report.lora_modules.values()) == len(ORIGINAL) and not lora.report.unmatched
    assert lora.report.dim == 64
    before = _snapshot(model)
    with applied_loras(model, [LoraSpec(path, STRENGTH)]):
        assert _wrapped(model) == set(ORIGINAL)
        for module, (down, up) in pairs.items():
            expected = STRENGTH * _expected_alpha(layout, module) / RANKS[module] * (up @ down)
            torch.testing.assert_close(_lora_delta(model, module), expected, atol=1e-5, rtol=1e-4)
        assert all(torch.equal(before[k], v) for k, v in _snapshot(model).items())  # no weight patched
    after = _snapshot(model)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not _wrapped(model)


def test_t2v_lora_applies_to_the_blocks_s2v_shares(tmp_path, model):
    """A musubi-tuner Wan T2V LoRA (self/cross attention and feed-forward of every block) on
    S2V: the shared blocks take it, blocks the model lacks are skipped and said, the report
    says what it was made for."""
    blocks = 6  # the tiny model has 4
    tensors, pairs = {}, {}
    g = torch.Generator().manual_seed(3)
    for b in range(blocks):
        for original, module, (out, inp) in (
            *((f"blocks.{b}.self_attn.{p}", f"blocks.{b}.attn1.{d}", (64, 64)) for p, d in
              (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
            *((f"blocks.{b}.cross_attn.{p}", f"blocks.{b}.attn2.{d}", (64, 64)) for p, d in
              (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
            (f"blocks.{b}.ffn.0", f"blocks.{b}.ffn.net.0.proj", (96, 64)),
            (f"blocks.{b}.ffn.2", f"blocks.{b}.ffn.net.2", (64, 96)),
        ):
            down, up = torch.randn(4, inp, generator=g), torch.randn(out, 4, generator=g)
            name = _kohya(original)
            tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                            f"{name}.alpha": torch.tensor(4.0)})
            pairs[module] = (down, up)
    path = tmp_path / "wan21_t2v_style.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora_wan"})

    lora = read_lora_file(path)
    report = lora.report
    assert report.made_for == "wan-t2v" and report.format == "kohya"
    assert report.lora_modules == {"self-attention": 24, "cross-attention": 24, "feed-forward": 12}
    text = report.text()
    assert "T2V" in text and "applies to the blocks S2V shares with it (self-attention, cross-attention, feed-forward)" in text
    messages = []
    with applied_loras(model, [LoraSpec(path, -0.5)], log=messages.append):
        in_model = {m for m in pairs if int(m.split(".")[1]) < 4}
        assert _wrapped(model) == in_model
        for module in ("blocks.0.attn1.to_q", "blocks.3.attn2.to_v", "blocks.2.ffn.net.2"):
            down, up = pairs[module]
            torch.testing.assert_close(_lora_delta(model, module), -0.5 * (up @ down), atol=1e-5, rtol=1e-4)
    (message,) = messages
    assert "applied 40 LoRA pairs" in message and "skipped 20" in message and "blocks.4.attn1.to_q: not in this model" in message


def test_an_s2v_lora_on_the_shared_blocks_only_is_known_by_its_header(tmp_path, model):
    from trainer.lora.io import save_lora

    pairs = _pairs(model, ["blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj"])
    state = {f"{m}.lora_{s}.weight": t for m, (down, up) in pairs.items() for s, t in (("A", down), ("B", up))}
    report = read_lora_file(save_lora(state, tmp_path / "ours.safetensors", alphas={"*": 4.0})).report
    assert report.made_for == "wan-s2v" and "the file says wan2.2-s2v-14b/lora" in report.text()


def test_wan21_i2v_lora_skips_the_image_modules_s2v_lacks(tmp_path, model):
    g = torch.Generator().manual_seed(4)
    tensors = {}
    for original in ("blocks.0.self_attn.q", "blocks.1.cross_attn.k", "blocks.0.cross_attn.k_img",
                     "blocks.0.cross_attn.v_img", "img_emb.proj.1"):
        tensors[f"diffusion_model.{original}.lora_A.weight"] = torch.randn(4, 64, generator=g)
        tensors[f"diffusion_model.{original}.lora_B.weight"] = torch.randn(64, 4, generator=g)
    tensors["diffusion_model.blocks.0.cross_attn.norm_k_img.diff"] = torch.randn(64, generator=g)
    path = tmp_path / "i2v.safetensors"
    save_file(tensors, str(path))

    report = read_lora_file(path).report
    assert report.made_for == "wan-i2v"
    assert sorted(report.not_in_s2v) == sorted(k for k in tensors if "img" in k) and len(report.not_in_s2v) == 7
    assert report.lora_modules == {"self-attention": 1, "cross-attention": 1} and not report.unmatched
    assert "I2V" in report.text() and "not in S2V (7 keys, skipped)" in report.text()
    with applied_loras(model, [LoraSpec(path, 1.0)]):
        assert _wrapped(model) == {"blocks.0.attn1.to_q", "blocks.1.attn2.to_k"}
        up, down = (tensors[f"diffusion_model.blocks.1.cross_attn.k.lora_{s}.weight"] for s in "BA")
        torch.testing.assert_close(_lora_delta(model, "blocks.1.attn2.to_k"), up @ down, atol=1e-5, rtol=1e-4)


def _distill_tensors(g: torch.Generator) -> dict[str, torch.Tensor]:
    """A step-distill release's layout (lightx2v): LoRA pairs next to full differences of
    biases, norms, modulation, head and patch embedding (shaped for the tiny model)."""
    p = "diffusion_model."
    return {
        f"{p}blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 64, generator=g),
        f"{p}blocks.0.self_attn.q.lora_up.weight": torch.randn(64, 4, generator=g),
        f"{p}blocks.0.self_attn.q.alpha": torch.tensor(8.0),
        f"{p}blocks.0.self_attn.q.diff_b": torch.randn(64, generator=g),
        f"{p}blocks.0.self_attn.norm_q.diff": torch.randn(64, generator=g),
        f"{p}blocks.1.cross_attn.norm_k.diff": torch.randn(64, generator=g),
        f"{p}blocks.1.norm3.diff": torch.randn(64, generator=g),
        f"{p}blocks.1.norm3.diff_b": torch.randn(64, generator=g),
        f"{p}blocks.2.modulation.diff": torch.randn(1, 6, 64, generator=g),
        f"{p}blocks.2.ffn.0.diff_b": torch.randn(96, generator=g),
        f"{p}head.head.diff": torch.randn(64, 64, generator=g),
        f"{p}head.head.diff_b": torch.randn(64, generator=g),
        f"{p}head.modulation.diff": torch.randn(1, 2, 64, generator=g),
        f"{p}patch_embedding.diff": torch.randn(64, 16, 1, 2, 2, generator=g),
        f"{p}patch_embedding.diff_b": torch.randn(64, generator=g),
        f"{p}text_embedding.0.diff_b": torch.randn(64, generator=g),
        f"{p}time_projection.1.diff_b": torch.randn(384, generator=g),
        f"{p}cond_encoder.diff_b": torch.randn(64, generator=g),
        f"{p}blocks.3.diff_m": torch.randn(1, 6, 64, generator=g),  # LightX2V's name for blocks.3.modulation.diff
        f"{p}blocks.0.cross_attn.o.lokr_w1": torch.randn(8, 8, generator=g),  # LyCORIS LoKr: reported
    }


# file key -> our parameter it changes
DISTILL_TARGETS = {
    "blocks.0.self_attn.q.diff_b": "blocks.0.attn1.to_q.bias",
    "blocks.0.self_attn.norm_q.diff": "blocks.0.attn1.norm_q.weight",
    "blocks.1.cross_attn.norm_k.diff": "blocks.1.attn2.norm_k.weight",
    "blocks.1.norm3.diff": "blocks.1.norm2.weight",
    "blocks.1.norm3.diff_b": "blocks.1.norm2.bias",
    "blocks.2.modulation.diff": "blocks.2.scale_shift_table",
    "blocks.3.diff_m": "blocks.3.scale_shift_table",
    "blocks.2.ffn.0.diff_b": "blocks.2.ffn.net.0.proj.bias",
    "head.head.diff": "proj_out.weight",
    "head.head.diff_b": "proj_out.bias",
    "head.modulation.diff": "scale_shift_table",
    "patch_embedding.diff": "patch_embedding.weight",
    "patch_embedding.diff_b": "patch_embedding.bias",
    "text_embedding.0.diff_b": "condition_embedder.text_embedder.linear_1.bias",
    "time_projection.1.diff_b": "condition_embedder.time_proj.bias",
    "cond_encoder.diff_b": "condition_embedder.pose_embedder.bias",
}


def test_full_differences_and_lora_biases_take_the_strength(tmp_path, model):
    g = torch.Generator().manual_seed(5)
    distill = _distill_tensors(g)
    distill_path = tmp_path / "distill.safetensors"
    save_file(distill, str(distill_path))
    # peft with lora_bias=True (Diffusers keys): the bias is scaled like the pair (alpha 8 / r 4)
    # and a kohya LoCon pair on the patch embedding (a Conv3d), merged into its weight
    down_k, up_k, bias_k = torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g), torch.randn(64, generator=g)
    conv_down, conv_up = torch.randn(2, 16, 1, 2, 2, generator=g), torch.randn(64, 2, 1, 1, 1, generator=g)
    biased = {"transformer.blocks.0.attn1.to_k.lora_A.weight": down_k,
              "transformer.blocks.0.attn1.to_k.lora_B.weight": up_k,
              "transformer.blocks.0.attn1.to_k.lora_B.bias": bias_k,
              "lora_unet_patch_embedding.lora_down.weight": conv_down,
              "lora_unet_patch_embedding.lora_up.weight": conv_up,
              "lora_unet_patch_embedding.alpha": torch.tensor(1.0)}
    biased_path = tmp_path / "biased.safetensors"
    save_file(biased, str(biased_path), metadata={"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8.0})})

    report = read_lora_file(distill_path).report
    assert sum(report.differences.values()) == len(DISTILL_TARGETS) and report.made_for == "wan-s2v"
    assert report.unmatched == [("diffusion_model.blocks.0.cross_attn.o.lokr_w1", "LoKr weight (not supported)")]
    before = _snapshot(model)
    strengths = (0.5, 0.25, -2.0)  # the distill file twice: its differences add up
    specs = [LoraSpec(distill_path, strengths[0]), LoraSpec(distill_path, strengths[1]),
             LoraSpec(biased_path, strengths[2])]
    with applied_loras(model, specs):
        now = _snapshot(model)
        expected = dict(before)
        for key, target in DISTILL_TARGETS.items():
            expected[target] = before[target] + (strengths[0] + strengths[1]) * distill[f"diffusion_model.{key}"]
        expected["blocks.0.attn1.to_k.bias"] = before["blocks.0.attn1.to_k.bias"] + strengths[2] * 2.0 * bias_k
        conv = (conv_up.flatten(1) @ conv_down.flatten(1)).reshape(64, 16, 1, 2, 2) * (1.0 / 2)
        expected["patch_embedding.weight"] = expected["patch_embedding.weight"] + strengths[2] * conv
        changed = {k for k in now if not torch.equal(now[k], before[k])}
        assert changed == set(DISTILL_TARGETS.values()) | {"blocks.0.attn1.to_k.bias"}
        for name in changed:
            torch.testing.assert_close(now[name], expected[name], atol=1e-6, rtol=1e-6, msg=name)
        # the LoRA pairs go through peft: q from the distill file (both strengths), k from the other
        up, down = distill["diffusion_model.blocks.0.self_attn.q.lora_up.weight"], \
            distill["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
        torch.testing.assert_close(_lora_delta(model, "blocks.0.attn1.to_q"), 0.75 * 2.0 * (up @ down),
                                   atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(_lora_delta(model, "blocks.0.attn1.to_k"), -2.0 * 2.0 * (up_k @ down_k),
                                   atol=1e-5, rtol=1e-4)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_differences_only_file_needs_no_adapter(tmp_path, model):
    g = torch.Generator().manual_seed(6)
    path = tmp_path / "norms.safetensors"
    diff = torch.randn(64, generator=g)
    save_file({"diffusion_model.blocks.3.norm3.diff": diff}, str(path))
    before = _snapshot(model)
    with applied_loras(model, [LoraSpec(path, 3.0)]) as added:
        assert added == [] and not _wrapped(model)
        assert torch.equal(_snapshot(model)["blocks.3.norm2.weight"], before["blocks.3.norm2.weight"] + 3.0 * diff)
    assert torch.equal(_snapshot(model)["blocks.3.norm2.weight"], before["blocks.3.norm2.weight"])


def test_a_weight_kept_in_fp8_is_skipped_and_said(tmp_path):
    from trainer.memory.quantize import Fp8Linear

    model = build_tiny_transformer()
    model.proj_out = Fp8Linear.from_linear(model.proj_out, torch.float32)
    g = torch.Generator().manual_seed(10)
    diff_b = torch.randn(64, generator=g)
    path = tmp_path / "head.safetensors"
    save_file({"diffusion_model.head.head.diff": torch.randn(64, 64, generator=g),
               "diffusion_model.head.head.diff_b": diff_b}, str(path))
    weight, bias = model.proj_out.weight.detach().clone(), model.proj_out.bias.detach().clone()
    messages = []
    with applied_loras(model, [LoraSpec(path, 1.0)], log=messages.append):
        assert torch.equal(model.proj_out.weight, weight) and torch.equal(model.proj_out.bias, bias + diff_b)
    assert "proj_out.weight: the model keeps this weight quantized (fp8 / int8)" in messages[0]
    assert torch.equal(model.proj_out.bias, bias)


def test_every_key_is_used_or_reported(tmp_path):
    g = torch.Generator().manual_seed(7)
    tensors = _distill_tensors(g)
    tensors.update({
        "diffusion_model.blocks.1.self_attn.k.lora_A.weight": torch.randn(4, 64, generator=g),  # no lora_B
        "lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.randn(4, 64, generator=g),  # same module again
        "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.randn(64, 4, generator=g),
        "diffusion_model.blocks.2.self_attn.v.lora_A.weight": torch.randn(4, 64, generator=g),
        "diffusion_model.blocks.2.self_attn.v.lora_B.weight": torch.randn(64, 4, generator=g),
        "diffusion_model.blocks.2.self_attn.v.dora_scale": torch.randn(64, 1, generator=g),
        "diffusion_model.blocks.2.self_attn.norm_q.lora_A.weight": torch.randn(4, 64, generator=g),
        "diffusion_model.blocks.2.self_attn.norm_q.lora_B.weight": torch.randn(64, 4, generator=g),
        "diffusion_model.img_emb.proj.1.lora_A.weight": torch.randn(4, 64, generator=g),
        "diffusion_model.vace_blocks.0.after_proj.lora_A.weight": torch.randn(4, 64, generator=g),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 64, generator=g),
    })
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    lora = read_lora_file(path)
    report = lora.report
    used = 2 * len(lora.modules) + 1 + len(lora.diffs) + len(lora.biases)  # one .alpha key
    assert used + len(report.not_in_s2v) + len(report.unmatched) == report.num_keys == len(tensors)
    reasons = dict(report.unmatched)
    assert reasons["diffusion_model.blocks.1.self_attn.k.lora_A.weight"] == "its lora_B (up) weight is missing"
    assert reasons["lora_unet_blocks_0_self_attn_q.lora_down.weight"].startswith("a second key for ")
    assert reasons["diffusion_model.blocks.2.self_attn.v.dora_scale"] == "DoRA magnitude (not supported)"
    assert "norm" in reasons["diffusion_model.blocks.2.self_attn.norm_q.lora_A.weight"]
    assert reasons["diffusion_model.vace_blocks.0.after_proj.lora_A.weight"] == "names no Wan 2.1/2.2 14B module"
    assert report.not_in_s2v == ["diffusion_model.img_emb.proj.1.lora_A.weight"]
    # a DoRA module is not half-applied: its pair stays out with its magnitude
    assert reasons["diffusion_model.blocks.2.self_attn.v.lora_B.weight"] == "part of a DoRA module (not supported)"
    assert lora.modules == ["blocks.0.attn1.to_q"]


@pytest.mark.parametrize("kind, keys, guess", [
    ("flux", ["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
              "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight",
              "diffusion_model.single_blocks.3.linear1.lora_A.weight"], "Flux"),
    ("sdxl", ["lora_unet_input_blocks_4_1_proj_in.lora_down.weight", "lora_unet_input_blocks_4_1_proj_in.alpha",
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"], "Stable Diffusion / SDXL"),
    ("vace", ["diffusion_model.vace_blocks.0.after_proj.lora_A.weight",
              "diffusion_model.vace_blocks.0.after_proj.lora_B.weight"], "Wan VACE"),
    ("i2v_only", ["diffusion_model.blocks.0.cross_attn.k_img.lora_A.weight",
                  "diffusion_model.blocks.0.cross_attn.k_img.lora_B.weight"], "I2V"),
])
def test_a_file_that_matches_nothing_is_an_error(tmp_path, kind, keys, guess):
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: torch.ones(4) * 0.1 if k.endswith("alpha") else torch.randn(4, 8) for k in keys}, str(path))
    with pytest.raises(LoraFileError) as error:
        read_lora_file(path)
    message = str(error.value)
    assert str(path) in message and "names a Wan 2.2 S2V module" in message and guess in message


def test_nothing_fitting_this_model_is_an_error(tmp_path, model):
    """A Wan 1.3B LoRA (hidden size 1536) names S2V modules but fits none of this model's."""
    g = torch.Generator().manual_seed(8)
    path = tmp_path / "wan_1.3b.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 1536, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(1536, 4, generator=g),
               "diffusion_model.blocks.0.self_attn.norm_q.diff": torch.randn(1536, generator=g)}, str(path))
    report = read_lora_file(path).report
    assert report.dim == 1536 and "1536 (1.3B)" in report.text()
    before = _snapshot(model)
    with pytest.raises(ValueError, match="nothing of LoRA wan_1.3b fits this model") as error, \
            applied_loras(model, [LoraSpec(path, 1.0)]):
        pass
    assert "does not fit" in str(error.value)
    assert not _wrapped(model) and all(torch.equal(before[k], v) for k, v in _snapshot(model).items())


def _truncated(path):
    save_file({"blocks.0.self_attn.q.lora_A.weight": torch.randn(4, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _nan(path):
    a = torch.randn(4, 64)
    a[1, 3] = math.nan
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_A.weight": a,
               "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.randn(64, 4)}, str(path))


def _inf(path):
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.full((64,), math.inf)}, str(path))


@pytest.mark.parametrize("name, make, words", [
    ("empty_file.safetensors", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    ("garbage.safetensors", lambda p: p.write_bytes(b"\x00" * 7 + b"PK\x03\x04" * 40), "not a readable safetensors"),
    ("truncated.safetensors", _truncated, "truncated"),
    ("no_tensors.safetensors", lambda p: save_file({}, str(p)), "holds no tensors"),
    ("nan.safetensors", _nan, "NaN or inf"),
    ("inf.safetensors", _inf, "NaN or inf"),
    ("pickle.ckpt", lambda p: p.write_bytes(b"\x80\x04"), "pickle"),
    ("weights.pt", lambda p: p.write_bytes(b"\x80\x04"), "pickle"),
    ("lora.gguf", lambda p: p.write_bytes(b"GGUF"), "not a .safetensors file"),
    ("missing.safetensors", lambda p: None, "not found"),
])
def test_broken_files_give_an_error_naming_the_file(tmp_path, name, make, words):
    path = tmp_path / name
    make(path)
    with pytest.raises(LoraFileError) as error:
        read_lora_file(path)
    assert str(path) in str(error.value) and words in str(error.value)


def test_load_lora_keeps_refusing_what_an_adapter_cannot_hold(tmp_path, model):
    path = tmp_path / "distill.safetensors"
    save_file(_distill_tensors(torch.Generator().manual_seed(9)), str(path))
    with pytest.raises(ValueError, match="more than LoRA pairs"):
        load_lora(build_tiny_transformer(), path)


def test_kohya_names_map_back_through_the_known_module_paths():
    """Every module of the 14B layout (40 blocks, 12 injectors) in original, Diffusers and
    underscore form resolves to exactly one module of ours, the same for all forms."""
    for module in WAN_MODULES:
        indices = range(40) if "{n}" in module.original else [None]
        for n in indices:
            original = module.original.replace("{n}", str(n))
            ours = module.diffusers.replace("{n}", str(n))
            for path, separator in ((original, "."), (original.replace(".", "_"), "_"), (ours, "."),
                                    (ours.replace(".", "_"), "_")):
                matches = resolve_module(path, separator)
                assert [m.name for m in matches] == [ours], (path, matches)


def test_every_weight_of_the_model_has_a_known_module(model):
    for name in model.state_dict():
        module = name.rsplit(".", 1)[0] if name.endswith((".weight", ".bias")) else name
        assert resolve_module(module) or resolve_module(name), name


def test_the_load_node_outputs_the_report(tmp_path, monkeypatch, model):
    from pack_helpers import import_pack

    import_pack("comfyui_wan_s2v_trainer_lf")
    from comfyui_wan_s2v_trainer_lf.nodes import sample_nodes as sn

    good, bad = tmp_path / "t2v.safetensors", tmp_path / "flux.safetensors"
    _write_layout(good, "kohya", _pairs(model, ["blocks.0.attn1.to_q", "blocks.0.ffn.net.0.proj"]))
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.randn(4, 8)}, str(bad))
    monkeypatch.setattr(sn.comfy_adapter, "model_file_path", lambda kind, name: tmp_path / name)
    assert sn.WanS2VLoadLoRA.RETURN_TYPES[1] == "STRING"
    stack, report = sn.WanS2VLoadLoRA().load("t2v.safetensors", 0.8)
    assert len(stack) == 1 and stack[0].strength == 0.8 and stack[0].source.format == "kohya"
    assert report.startswith("LoRA t2v.safetensors: kohya") and "T2V" in report
    assert "self-attention 1, feed-forward 1" in report
    with pytest.raises(ValueError, match="flux.safetensors"):  # the pack's own LoraFileError class
        sn.WanS2VLoadLoRA().load("flux.safetensors", 1.0, loras=stack)
