"""The pack imports like ComfyUI imports it: cheaply, and with well-formed node classes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pack_helpers import import_pack

REPO = Path(__file__).resolve().parents[1]

IMPORT_AS_COMFYUI = textwrap.dedent(
    f"""
    import importlib.util, json, sys
    spec = importlib.util.spec_from_file_location(
        "comfyui_wan_s2v_trainer", {str(REPO / "__init__.py")!r},
        submodule_search_locations=[{str(REPO)!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft", "av") if m in sys.modules)
    print(json.dumps({{"heavy": heavy, "nodes": sorted(pack.NODE_CLASS_MAPPINGS),
                       "names": pack.NODE_DISPLAY_NAME_MAPPINGS, "web": pack.WEB_DIRECTORY}}))
    """
)


def load_pack_report() -> dict:
    import json

    result = subprocess.run([sys.executable, "-c", IMPORT_AS_COMFYUI], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_complete():
    report = load_pack_report()
    assert report["heavy"] == [], f"importing the pack pulled in {report['heavy']}"
    assert report["nodes"], "no nodes exported"
    assert set(report["names"]) == set(report["nodes"])
    assert (REPO / report["web"]).is_dir()


def test_node_classes_follow_the_classic_api():
    pack = import_pack("comfyui_wan_s2v_trainer_t")
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = cls.INPUT_TYPES()
        assert set(inputs) <= {"required", "optional", "hidden"}, name
        for section_name, section in inputs.items():
            if section_name == "hidden":  # ComfyUI compares hidden specs as plain strings ("UNIQUE_ID")
                assert all(isinstance(v, str) for v in section.values()), name
                continue
            for input_name, spec_tuple in section.items():
                assert isinstance(spec_tuple, tuple) and spec_tuple, (name, input_name)
                type_or_choices = spec_tuple[0]
                assert isinstance(type_or_choices, (str, list)), (name, input_name)
                assert len(spec_tuple) > 1 and "tooltip" in spec_tuple[1], f"{name}.{input_name} has no tooltip"
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert hasattr(cls, cls.FUNCTION), f"{name}.{cls.FUNCTION} missing"
        assert cls.CATEGORY.startswith("Wan S2V Trainer"), name


def test_training_settings_nodes_are_exported_with_plain_names():
    report = load_pack_report()
    expected = {
        "WanS2VTreadSettings": "Wan S2V TREAD Settings",
        "WanS2VCrepaSettings": "Wan S2V CREPA Settings",
        "WanS2VMemorySettings": "Wan S2V Memory Settings",
        "WanS2VValidationSettings": "Wan S2V Validation Settings",
        "WanS2VTrainLora": "Train Wan S2V LoRA",
    }
    assert {k: report["names"].get(k) for k in expected} == expected
    assert (REPO / report["web"] / "validation_preview.js").is_file()


MISSING_PACKAGE = textwrap.dedent(
    f"""
    import importlib.util, json, sys
    sys.modules["diffusers"] = None  # as if ComfyUI's Python lacked it
    spec = importlib.util.spec_from_file_location(
        "comfyui_wan_s2v_trainer", {str(REPO / "__init__.py")!r},
        submodule_search_locations=[{str(REPO)!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = pack
    spec.loader.exec_module(pack)
    inputs = {{name: cls.INPUT_TYPES() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}}
    loader = pack.NODE_CLASS_MAPPINGS["WanS2VLoadTransformer"]()
    try:
        loader.load("(tiny random test model)", "float32", "official")
        error = None
    except Exception as exc:
        error = [type(exc).__name__, str(exc)]
    print(json.dumps({{"nodes": len(inputs), "error": error}}))
    """
)


def test_a_missing_package_registers_the_nodes_and_fails_the_node_in_one_line():
    result = subprocess.run([sys.executable, "-c", MISSING_PACKAGE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["nodes"] == len(load_pack_report()["nodes"])
    kind, message = report["error"]
    assert kind == "MissingPackageError" and "\n" not in message
    assert "'diffusers'" in message and "requirements.txt" in message


def test_the_tests_run_in_a_checkout_named_like_the_pack(tmp_path):
    """`python -m pytest` in a clone named comfyui-wan-s2v-trainer (not a Python identifier):
    pytest imports the root `__init__.py` as a plain file there."""
    import shutil

    clone = tmp_path / "comfyui-wan-s2v-trainer"
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".git", "output", "__pycache__", ".pytest_cache"))
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/test_dependencies.py"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:]
