"""LoRA files: ComfyUI native Wan keys and Diffusers keys, bit-exact round trips, loading back."""

import json

import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open

from trainer.lora.io import load_lora, read_lora_file, save_lora
from trainer.model import TINY_TRANSFORMER_CONFIG, WanS2VTransformer3DModel
from trainer.model.convert import convert_state_dict_to_original

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _model(seed=0):
    torch.manual_seed(seed)
    return WanS2VTransformer3DModel(**TINY_TRANSFORMER_CONFIG).eval()


def _inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
        audio_embeds=torch.randn(1, 25, 48, 8, generator=g),
        reference_latents=torch.randn(1, 16, 1, 8, 8, generator=g),
    )


def _trained_lora_model(rank=4, alpha=8.0):
    m = _model()
    m.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def _lora_tensors(path):
    with safe_open(str(path), framework="pt") as f:
        # safe_open handles are not iterable: keys() is needed
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_comfyui_keys_cover_every_targeted_native_weight(tmp_path):
    m = _trained_lora_model()
    path = save_lora(m, tmp_path / "l.safetensors", fmt="comfyui", training_config={"lora_rank": 4})
    tensors, meta = _lora_tensors(path)
    base = _model()
    native = {"diffusion_model." + k for k in convert_state_dict_to_original(base.state_dict())}
    prefixes = set()
    for key in tensors:
        assert key.startswith("diffusion_model.")
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if key.endswith(suffix):
                prefixes.add(key[: -len(suffix)])
                break
        else:
            raise AssertionError(key)
    # ComfyUI's generic key map: "diffusion_model.<path>" -> "diffusion_model.<path>.weight"
    assert all(p + ".weight" in native for p in prefixes)
    n_blocks, n_inj = TINY_TRANSFORMER_CONFIG["num_layers"], len(TINY_TRANSFORMER_CONFIG["audio_inject_layers"])
    assert len(prefixes) == 4 * (2 * n_blocks + n_inj)
    assert "diffusion_model.blocks.0.self_attn.q" in prefixes and "diffusion_model.blocks.3.cross_attn.o" in prefixes
    assert "diffusion_model.audio_injector.injector.1.v" in prefixes
    assert all(tensors[p + ".alpha"].item() == 8.0 for p in prefixes)
    assert json.loads(meta["wan_s2v_training_config"]) == {"lora_rank": 4} and meta["lora_rank"] == "4"


def test_comfyui_patch_formula_reproduces_the_peft_model():
    """Merge the ComfyUI file the way ComfyUI's LoRAAdapter does (W + up @ down * alpha / r,
    with up = lora_B, down = lora_A) into a plain model: same output as the peft model."""
    from trainer.lora.io import adapter_alphas, adapter_state_dict, to_comfyui

    m = _trained_lora_model(rank=4, alpha=2.0)
    tensors = to_comfyui(adapter_state_dict(m), adapter_alphas(m))
    base = _model()
    sd = convert_state_dict_to_original(base.state_dict())
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        prefix = key[: -len(".lora_B.weight")]
        up, down = tensors[key], tensors[prefix + ".lora_A.weight"]
        alpha = tensors[prefix + ".alpha"].item() / down.shape[0]
        weight_key = prefix[len("diffusion_model."):] + ".weight"
        sd[weight_key] = sd[weight_key] + (up @ down) * alpha
    from trainer.model.convert import convert_state_dict_to_diffusers

    base.load_state_dict(convert_state_dict_to_diffusers(sd))
    with torch.no_grad():
        expected, merged, plain = m(**_inputs()).sample, base(**_inputs()).sample, _model()(**_inputs()).sample
    assert (expected - plain).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(merged, expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["comfyui", "diffusers"])
def test_round_trip_is_bit_exact(tmp_path, fmt):
    m = _trained_lora_model(rank=4, alpha=8.0)
    path = save_lora(m, tmp_path / f"{fmt}.safetensors", fmt=fmt)
    if fmt == "diffusers":
        keys = _lora_tensors(path)[0]
        assert all(k.startswith(("transformer.blocks.", "transformer.audio_injector.")) for k in keys)
    loaded = _model()
    lora = load_lora(loaded, path)
    assert lora.format == fmt
    from trainer.lora.io import adapter_state_dict

    a, b = adapter_state_dict(m), adapter_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(m(**_inputs()).sample, loaded(**_inputs()).sample)
    # and a second save of the loaded model is byte-identical in its tensors
    again = save_lora(loaded, tmp_path / f"again_{fmt}.safetensors", fmt=fmt)
    t1, t2 = _lora_tensors(path)[0], _lora_tensors(again)[0]
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1)


def test_state_dict_source_bf16_and_rank_pattern(tmp_path):
    from trainer.lora.io import adapter_state_dict

    m = _trained_lora_model(rank=4, alpha=4.0)
    state = adapter_state_dict(m)
    # a different rank for one module: loader must build a rank pattern
    state["blocks.0.attn1.to_q.lora_A.weight"] = torch.randn(2, 64)
    state["blocks.0.attn1.to_q.lora_B.weight"] = torch.randn(64, 2)
    path = save_lora(state, tmp_path / "s.safetensors", alphas={"*": 4.0}, dtype="bf16")
    lora = read_lora_file(path)
    assert lora.rank("blocks.0.attn1.to_q") == 2 and lora.alphas["blocks.0.attn1.to_q"] == 4.0
    loaded = _model()
    load_lora(loaded, path)
    assert loaded.blocks[0].attn1.to_q.r["default"] == 2 and loaded.blocks[0].attn1.to_k.r["default"] == 4
    assert loaded.blocks[0].attn1.to_q.scaling["default"] == 2.0  # alpha 4 / r 2


def test_unknown_module_is_an_error(tmp_path):
    path = save_lora({"blocks.99.attn1.to_q.lora_A.weight": torch.zeros(2, 64),
                      "blocks.99.attn1.to_q.lora_B.weight": torch.zeros(64, 2)},
                     tmp_path / "x.safetensors", alphas={"*": 2.0})
    with pytest.raises(ValueError, match="does not have"):
        load_lora(_model(), path)
