"""CUDA check that training leaves the cached transformer alone (the CPU tests cover the CPU
modes; this covers what only runs on a GPU: device moves, bf16 autocast, compiled blocks,
layers converted on the GPU, pinned block offload with prefetch on a side stream).

One tiny transformer, as the loader node leaves it (CPU, created under inference mode;
ComfyUI caches it for every prompt), goes through the training node's runner on CUDA:
a normal run (the reference), an int8-quanto run, an fp8 run, a block-offload run and a
normal run again, whose LoRA must equal the reference's; afterwards the model must hold the
same tensor objects, on the CPU, with the same values and module types. Then the tiny model
in bf16 is converted to int8 / fp8 (and fp8 back to bf16) on the CPU and on the GPU: the
converted weights must be the same bytes.

    python bench/check_isolation_cuda.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
PACK = "wan_s2v_pack"


def snapshot(model: torch.nn.Module) -> dict:
    state = model.state_dict(keep_vars=True)
    return {"tensors": {k: (v, v.detach().clone()) for k, v in state.items()},
            "types": {name: type(m) for name, m in model.named_modules()},
            "attributes": {name: sorted(m.__dict__) for name, m in model.named_modules()}}


def unchanged(model: torch.nn.Module, before: dict) -> list[str]:
    now = snapshot(model)
    problems = [f"module {k}" for k in before["types"] if now["types"].get(k) is not before["types"][k]]
    problems += [f"attributes of {k}" for k in before["attributes"] if now["attributes"].get(k) != before["attributes"][k]]
    for key, (tensor, value) in before["tensors"].items():
        current = now["tensors"].get(key, (None,))[0]
        if current is not tensor or current.device.type != "cpu" or not torch.equal(current, value):
            problems.append(f"tensor {key}")
    return problems


def lora_difference(a, b) -> float:
    if a.state.keys() != b.state.keys():
        return float("inf")
    return max((a.state[k].float() - b.state[k].float()).abs().max().item() for k in a.state)


def converted_on_gpu_equal_cpu() -> list[str]:
    from trainer.memory.quantize import apply_precision
    from trainer.model.tiny import build_tiny_transformer

    failures = []
    for precision, start in (("int8-quanto", None), ("fp8", None), ("no_change", "fp8")):
        models = []
        for device in (None, torch.device("cuda")):
            model = build_tiny_transformer(0).to(torch.bfloat16)
            if start:
                apply_precision(model, start)
            apply_precision(model, precision, device)
            models.append({k: v.detach().cuda() for k, v in model.to("cuda").state_dict().items()})
        cpu, gpu = models
        differ = [k for k in cpu if cpu[k].dtype != gpu[k].dtype
                  or not torch.equal(cpu[k].reshape(-1).view(torch.uint8), gpu[k].reshape(-1).view(torch.uint8))]
        name = precision if start is None else f"{start} -> {precision}"
        print(f"{name}: converted on the GPU == on the CPU: {not differ}", flush=True)
        failures += [f"{name}: {k}" for k in differ]
    return failures


def main() -> int:
    from pack_helpers import import_pack

    from trainer.train.synthetic import SyntheticTalkingDataset

    root = Path(tempfile.mkdtemp(prefix="isolation_"))
    for name in ("output", "loras", "input", "models"):
        os.environ[f"WAN_S2V_{name.upper()}_DIR"] = str(root / name)
    import_pack(PACK)
    from wan_s2v_pack.nodes import model_nodes, train_nodes

    with torch.inference_mode():
        (model,) = model_nodes.WanS2VLoadTransformer().load(model_nodes.TINY, "float32", "official")
    before = snapshot(model)
    data = SyntheticTalkingDataset(text_len=64)
    settings = {k: v[1]["default"] for k, v in train_nodes.WanS2VTrainLora.INPUT_TYPES()["required"].items()
                if "default" in v[1] and k not in ("output_name", "save_to", "resume_from_checkpoint")}
    settings.update(max_train_steps=3, checkpoint_step_interval=0, mixed_precision="bf16")
    memory_defaults = {k: v[1]["default"] for k, v in train_nodes.WanS2VMemorySettings.INPUT_TYPES()["required"].items()
                       if "default" in v[1]}
    memory_defaults.update(device="cuda")

    def run(name: str, **memory):
        fields = {**memory_defaults, **memory}
        with torch.inference_mode():
            (mem,) = train_nodes.WanS2VMemorySettings().build(fields.pop("checkpointing_policy"), **fields)
            (lora_settings,) = train_nodes.WanS2VLoraSettings().build(4, 4.0, 0.0, "to_q,to_k,to_v,to_out.0")
            started = time.perf_counter()
            lora, _, losses = train_nodes.WanS2VTrainLora().train(
                model, data, name, save_to="output", resume_from_checkpoint="none", lora_settings=lora_settings,
                memory_settings=mem, **settings)
        print(f"{name}: {time.perf_counter() - started:.1f} s, losses {[round(x, 4) for x in losses['loss']]}",
              flush=True)
        return lora

    reference = run("reference")
    runs = {"int8": run("int8", base_model_precision="int8-quanto"),
            "fp8": run("fp8", base_model_precision="fp8"),
            "blocks": run("blocks", offload="blocks", checkpointing_policy="attention", offload_activations=True),
            "after": run("after")}
    for name, lora in runs.items():
        print(f"{name}: max |LoRA - reference| = {lora_difference(lora, reference):.3g}", flush=True)
    failures = []
    if lora_difference(runs["after"], reference) != 0.0:
        failures.append("the normal run after the others trained another LoRA than the reference")
    if lora_difference(runs["int8"], reference) == 0.0:
        failures.append("the int8 run trained the reference LoRA: it did not quantize")
    problems = unchanged(model, before)
    print(f"cached model unchanged (same tensors, on the CPU, same values and modules): {not problems}", flush=True)
    failures += problems[:10]
    failures += converted_on_gpu_equal_cpu()
    for failure in failures:
        print("FAIL", failure)
    print("isolation on CUDA:", "FAIL" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
