"""CUDA check that training leaves the cached transformer alone (tests/test_train_isolation.py
covers the CPU modes; this covers what only runs on a GPU: device moves, bf16 autocast,
compiled blocks, converted layers moved to the GPU, pinned block offload with prefetch on a
side stream).

One tiny transformer, as the loader node leaves it (CPU, created under inference mode;
ComfyUI caches it for every prompt), goes through the training node's runner: a normal run
(the reference), an int8-quanto run, an fp8 run, a block-offload run and a normal run again,
whose LoRA must equal the reference's; afterwards the model must hold the same tensor
objects, on the CPU, with the same values, modules and attributes.

    python bench/check_isolation_cuda.py [--device cpu]
"""

from __future__ import annotations

import argparse
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
    problems = [f"module {k}" for k, kind in before["types"].items() if now["types"].get(k) is not kind]
    problems += [f"attributes of {k}" for k, names in before["attributes"].items()
                 if now["attributes"].get(k) != names]
    for key, (tensor, value) in before["tensors"].items():
        current = now["tensors"].get(key, (None,))[0]
        if current is not tensor or current.device.type != "cpu" or not torch.equal(current, value):
            problems.append(f"tensor {key}")
    return problems


def lora_difference(a, b) -> float:
    if a.state.keys() != b.state.keys():
        return float("inf")
    return max((a.state[k].float() - b.state[k].float()).abs().max().item() for k in a.state)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cpu: the same runs without a GPU (a dry run)")
    device = parser.parse_args().device
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
    def defaults(node) -> dict:
        return {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items() if "default" in v[1]}

    settings = defaults(train_nodes.WanS2VTrainLora)
    for key in ("output_name", "save_to", "resume_from_checkpoint"):
        settings.pop(key)
    settings.update(max_train_steps=3, checkpoint_step_interval=0,
                    mixed_precision="no" if device == "cpu" else "bf16")
    memory_defaults = {**defaults(train_nodes.WanS2VMemorySettings), "device": device}

    def run(name: str, **memory):
        fields = {**memory_defaults, **memory}
        with torch.inference_mode():
            (mem,) = train_nodes.WanS2VMemorySettings().build(fields.pop("checkpointing_policy"), **fields)
            (lora_settings,) = train_nodes.WanS2VLoraSettings().build(4, 4.0, 0.0, "to_q,to_k,to_v,to_out.0")
            started = time.perf_counter()
            lora, _, losses = train_nodes.WanS2VTrainLora().train(
                model, data, name, save_to="output", resume_from_checkpoint="none",
                lora_settings=lora_settings, memory_settings=mem, **settings)
        seconds = time.perf_counter() - started
        print(f"{name}: {seconds:.1f} s, losses {[round(x, 4) for x in losses['loss']]}", flush=True)
        return lora

    reference = run("reference")
    runs = {"int8": run("int8", base_model_precision="int8-quanto"),
            "fp8": run("fp8", base_model_precision="fp8"),
            "blocks": run("blocks", offload="blocks", checkpointing_policy="attention",
                          offload_activations=True),
            "after": run("after")}
    for name, lora in runs.items():
        print(f"{name}: max |LoRA - reference| = {lora_difference(lora, reference):.3g}", flush=True)
    failures = []
    if lora_difference(runs["after"], reference) != 0.0:
        failures.append("the normal run after the others trained another LoRA than the reference")
    if lora_difference(runs["int8"], reference) == 0.0:
        failures.append("the int8 run trained the reference LoRA: it did not quantize")
    problems = unchanged(model, before)
    print(f"cached model unchanged (same tensors on the CPU, values, modules): {not problems}", flush=True)
    failures += problems[:10]
    for failure in failures:
        print("FAIL", failure)
    print(f"isolation on {device}:", "FAIL" if failures else "ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
