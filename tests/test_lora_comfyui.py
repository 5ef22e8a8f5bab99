"""ComfyUI's own LoraLoaderModelOnly applies our LoRA file to the native S2V model: every
tensor is used (zero "lora key not loaded"), every targeted weight is patched, and the
patched weights equal peft's merge of the same adapter. Needs a ComfyUI checkout (set
COMFYUI_PATH, see README "End-to-end check against a real ComfyUI"); skipped otherwise."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

# golden-like size: ComfyUI derives num_heads = dim // 128, text 4096, audio 1024
CONFIG = dict(num_attention_heads=2, attention_head_dim=128, ffn_dim=512, num_layers=5, text_dim=4096,
              audio_dim=1024, audio_inject_layers=[0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39])
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"]

CHECK = textwrap.dedent(
    """
    import json, logging, sys, torch
    comfy_root, model_path, lora_dir, merged_path = sys.argv[1:5]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_root)
    messages = []
    class Capture(logging.Handler):
        def emit(self, record): messages.append(record.getMessage())
    logging.getLogger().addHandler(Capture()); logging.getLogger().setLevel(logging.INFO)
    import comfy.options; comfy.options.enable_args_parsing()
    import comfy.cli_args; comfy.cli_args.args.cpu = True
    import comfy.sd, comfy.utils, folder_paths, nodes
    folder_paths.add_model_folder_path("loras", lora_dir, is_default=True)
    model = comfy.sd.load_diffusion_model(model_path)
    (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "check.safetensors", 1.0)
    patched.patch_model()
    sd = patched.model.diffusion_model.state_dict()
    merged = torch.load(merged_path)
    base = comfy.utils.load_torch_file(model_path)
    print(json.dumps({
        "model": type(patched.model.diffusion_model).__name__,
        "not_loaded": [m for m in messages if "not loaded" in m.lower()],
        "patches": len(patched.patches),
        "changed": sum(1 for k in merged if not torch.equal(base[k], sd[k])),
        "max_diff": max((sd[k].float() - v.float()).abs().max().item() for k, v in merged.items()),
    }))
    """
)


@pytest.mark.comfyui
def test_comfyui_lora_loader_applies_every_key(tmp_path):
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        pytest.skip("COMFYUI_PATH is not set: no ComfyUI checkout to check the LoRA against")
    import comfyui_server  # scripts/
    from peft.tuners.tuners_utils import BaseTunerLayer

    from trainer.lora.io import save_lora
    from trainer.model import WanS2VTransformer3DModel, save_transformer
    from trainer.model.convert import convert_state_dict_to_original

    torch.manual_seed(0)
    model = WanS2VTransformer3DModel(**CONFIG)
    model_path = save_transformer(model, tmp_path / "s2v.safetensors", layout="comfyui")
    model.add_adapter(LoraConfig(r=4, lora_alpha=2.0, target_modules=TARGETS, init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    lora_dir = tmp_path / "loras"
    path = save_lora(model, lora_dir / "check.safetensors", fmt="comfyui")
    modules = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for m in modules:
        m.merge()
    merged = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    torch.save(convert_state_dict_to_original(merged), tmp_path / "merged.pt")

    root = comfyui_server.resolve_comfyui_path(comfyui)
    python = comfyui_server.comfyui_python(root)
    env = dict(os.environ)
    preload = comfyui_server.resolve_preload(python)
    if preload:
        env["LD_PRELOAD"] = ":".join(str(p) for p in preload)
    proc = subprocess.run([python, "-c", CHECK, str(root), str(model_path), str(lora_dir), str(tmp_path / "merged.pt")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    n_modules = len(modules)  # 5 blocks x (4 self + 4 cross + 2 ffn) + 12 injectors x 4 = 98
    assert report["model"] == "WanModel_S2V"
    assert report["not_loaded"] == []
    assert report["patches"] == n_modules == 98 and report["changed"] == n_modules
    assert report["max_diff"] <= 1e-6, report
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert len(list(f.keys())) == 3 * n_modules  # lora_A, lora_B, alpha per module
