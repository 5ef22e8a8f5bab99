"""Training in child processes: how the ComfyUI training node trains on N GPUs.

A ComfyUI node runs inside the server process, which cannot become N data-parallel ranks.
`train_in_subprocess` therefore starts the ranks as child processes and turns their output
back into the callbacks the node already uses:

* it claims the run's folder (`trainer.train.runs.prepare_run`: ``output_dir``, or
  ``<output_dir>_2``, ... when that holds another run) unless given one, writes
  ``<run folder>/launch.json`` (the `TrainConfig`, a `ModelSource`, the data to train on and
  the run) and starts ``python -m trainer.train.launcher child launch.json --stop-file F``,
  through ``python -m torch.distributed.run --standalone --nproc_per_node N -m ...`` when
  N > 1 (nccl on CUDA, gloo on CPU; see `trainer.distributed`);
* a reader thread follows the children's stdout; rank 0 prints one JSON object per line,
  prefixed ``WAN_S2V_TRAIN `` (the CLI's ``--json-progress`` format): ``{"event": "step",
  ...}`` after every optimizer step, ``{"event": "validation", "step", "paths"}`` when a
  validation render is written, ``{"event": "done", ...}`` at the end;
* the calling thread turns those into ``progress(step, loss, lr, eta_s)``, ``on_log(record)``
  and ``on_validation(step, paths)`` calls, and polls ``should_stop()``: once it returns
  True the stop file is created, and every rank writes a checkpoint and the LoRA and exits
  after the step it is in;
* a child that fails raises `TrainingProcessError` with the child's error and the tail of
  its stderr.

The children cannot receive in-memory objects. `ModelSource` says how a child rebuilds the
transformer from disk (the loader node attaches one to the model it returns, see
`attach_model_source` / `model_source_of`); the data is either the windows of an already
cached dataset (``dataset=``: the children read the same cache shards, no encoder is
loaded), a `DatasetConfig` (cached by rank 0 with the encoders named in the config's
``vae_path`` / ``text_encoder_path`` / ``audio_encoder_path``), or the config's own
``dataset`` name (``synthetic`` or a folder, as ``python -m trainer train``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.config import DatasetConfig
from ..io_utils import atomic_write
from .config import TrainConfig

if TYPE_CHECKING:
    from .runs import RunFolder

#: Line prefix of the JSON events on the children's stdout (as ``python -m trainer train --json-progress``).
PREFIX = "WAN_S2V_TRAIN "
#: Attribute of a loaded transformer holding its `ModelSource`.
SOURCE_ATTRIBUTE = "_wan_s2v_model_source"
TINY = "tiny"
REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_NAME = "launch.json"

ProgressFn = Callable[[int, float, float, float], None]


# --------------------------------------------------------------------------- model source


@dataclass(frozen=True)
class ModelSource:
    """What a child process needs to rebuild the transformer the parent holds.

    `path`: a Diffusers folder or a single ComfyUI/original ``.safetensors`` file (what
    `trainer.model.load_transformer` takes), or ``"tiny"`` for the built-in tiny random model
    built with `seed`. `dtype`: "bfloat16", "float16" or "float32" (fp8-scaled files are
    dequantized to it, unless `load` keeps them for fp8 training). `numerics`: "official" or
    "comfyui". Memory settings (device, base model precision, offload, checkpointing) travel
    in `TrainConfig.memory`.
    """

    path: str
    dtype: str = "bfloat16"
    numerics: str = "official"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.numerics not in ("official", "comfyui"):
            raise ValueError(f"numerics must be 'official' or 'comfyui', got {self.numerics!r}")

    @property
    def is_tiny(self) -> bool:
        return self.path == TINY

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        return cls(**data)

    def load(self, device: str = "cpu", keep_fp8: bool = False):
        """Build the transformer (frozen, eval mode) on `device`; `keep_fp8`: a scaled-fp8
        file's e4m3 weights stay as shipped (`load_transformer`), for fp8 training."""
        import torch

        if self.is_tiny:
            from ..model.tiny import build_tiny_transformer

            model = build_tiny_transformer(self.seed)
            model.numerics = self.numerics
            return model.to(device)
        from ..model.transformer_io import load_transformer

        return load_transformer(self.path, dtype=getattr(torch, self.dtype), device=device, numerics=self.numerics,
                                keep_fp8=keep_fp8)


NO_SOURCE_MESSAGE = (
    "this transformer was not loaded from a file by 'Load Wan S2V Transformer', so training processes "
    "cannot load it again: connect the training node's transformer input directly to a Load Wan S2V "
    "Transformer node (or train in this process, with 1 process)"
)


def attach_model_source(model, source: ModelSource):
    """Record on `model` where it was loaded from; returns `model`."""
    # A plain attribute (not a submodule or buffer): it never enters state_dict or .to().
    object.__setattr__(model, SOURCE_ATTRIBUTE, source)
    return model


def model_source_of(transformer, *, required: bool = False) -> ModelSource | None:
    """The `ModelSource` recorded by the loader node on `transformer`; None when it has none
    (a model built or changed in memory), or `ValueError` with the reason when `required`."""
    source = getattr(transformer, SOURCE_ATTRIBUTE, None)
    if source is None and required:
        raise ValueError(NO_SOURCE_MESSAGE)
    return source


# --------------------------------------------------------------------------- datasets


def _dataset_spec(dataset=None, dataset_config: DatasetConfig | None = None) -> dict[str, Any] | None:
    """JSON description of the data a child trains on (None: the config's own dataset name)."""
    if dataset is not None:
        inner = dataset
        while not hasattr(inner, "entries") and hasattr(inner, "dataset"):
            inner = inner.dataset  # e.g. the training node's inference-mode wrapper
        if not (hasattr(inner, "entries") and hasattr(inner, "store")):
            raise TypeError(f"{type(dataset).__name__} is not a cached S2V dataset (needs .entries and .store)")
        windows = [{"keys": dict(e.keys), "caption": e.clip.caption, "source": str(e.clip.video),
                    "window_index": e.window_index, "bucket": list(e.clip.bucket)} for e in inner.entries]
        return {"kind": "cached", "cache_dir": str(inner.store.root), "windows": windows}
    if dataset_config is not None:
        return {"kind": "folder", "config": dataset_config.to_dict()}
    return None


class CachedWindows:
    """The windows of an `S2VDataset`, read from its cache by a child process: the same items
    in the same order, without scanning the folder or loading an encoder."""

    def __init__(self, cache_dir: str, windows: list[dict[str, Any]]):
        from ..data.cache import CacheStore

        self.store = CacheStore(cache_dir)
        self.windows = windows
        missing = sorted({k for w in windows for k in w["keys"].values() if not self.store.has(k)})
        if missing:
            raise FileNotFoundError(f"{len(missing)} cache shard(s) missing in {cache_dir} (e.g. {missing[0]}); "
                                    "run the dataset node again to rebuild the cache")

    def __len__(self) -> int:
        return len(self.windows)

    def bucket_of(self, index: int) -> tuple[int, int]:
        return tuple(self.windows[index]["bucket"])

    def __getitem__(self, index: int) -> dict[str, Any]:
        window = self.windows[index]
        keys, load = window["keys"], self.store.get
        return {
            "latents": load(keys["latents"])["latents"],
            "reference_latents": load(keys["reference"])["reference_latents"],
            "audio_embeds": load(keys["audio"])["audio_embeds"],
            "text_embeds": load(keys["text"])["text_embeds"],
            "caption": window["caption"],
            "source": window["source"],
            "window_index": window["window_index"],
            "bucket": tuple(window["bucket"]),
        }


def _build_data(spec: dict[str, Any] | None, name: str | None, model, config: TrainConfig):
    if spec is None:
        from .cli import build_dataset

        return build_dataset(name, model, config)
    if spec["kind"] == "cached":
        return CachedWindows(spec["cache_dir"], spec["windows"])
    from ..data import Encoders
    from ..data import build_dataset as build_folder_dataset

    data_config = DatasetConfig.from_dict(spec["config"]).validate()
    paths = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if TINY in paths:  # where the dataset node keeps the tiny encoders
        encoders = Encoders.tiny(Path(data_config.cache_dir).parent / "_tiny_models")
    elif all(paths):
        encoders = Encoders(*paths)
    else:
        raise ValueError("a DatasetConfig needs vae_path, text_encoder_path and audio_encoder_path in the training "
                         "config to build its cache ('tiny' for the built-in tiny encoders)")
    return build_folder_dataset(data_config, encoders)


# --------------------------------------------------------------------------- parent side


class TrainingProcessError(RuntimeError):
    """The training child processes failed; the message holds their error and stderr tail."""

    def __init__(self, message: str, returncode: int, stderr_tail: str):
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


@dataclass
class LaunchResult:
    """What the children trained (paths are rank 0's files)."""

    global_step: int
    stopped: bool
    lora_path: Path | None
    diffusers_lora_path: Path | None
    checkpoint: Path | None
    #: (step, loss) of every step of the run, earlier runs included when resumed.
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    eval_history: list[tuple[int, float]] = field(default_factory=list)
    validations: list[tuple[int, list[Path]]] = field(default_factory=list)
    num_processes: int = 1
    run_dir: Path | None = None
    run_id: str | None = None

    def lora_file(self):
        """The saved LoRA as a `trainer.lora.io.LoraFile` (peft keys)."""
        from ..lora.io import read_lora_file

        path = self.lora_path or self.diffusers_lora_path
        if path is None:
            raise FileNotFoundError("the training run saved no LoRA file")
        return read_lora_file(path)


def child_command(spec_path: Path, num_processes: int, stop_file: Path, python: str | None = None) -> list[str]:
    """The command line that starts the children."""
    python = python or sys.executable
    child = ["-m", "trainer.train.launcher", "child", str(spec_path), "--stop-file", str(stop_file)]
    if num_processes == 1:
        return [python, *child]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}", *child]


def train_in_subprocess(
    config: TrainConfig,
    *,
    num_processes: int,
    model_source: ModelSource,
    dataset_config: DatasetConfig | None = None,
    dataset=None,
    eval_dataset=None,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_log: Callable[[dict[str, Any]], None] | None = None,
    on_validation: Callable[[int, list[Path]], None] | None = None,
    env: dict[str, str] | None = None,
    poll_seconds: float = 0.2,
    run: RunFolder | None = None,
) -> LaunchResult:
    """Train a LoRA in `num_processes` data-parallel child processes; see the module doc.

    Args:
        config: the run's settings; ``train_batch_size`` is per process (global batch =
            ``train_batch_size x num_processes``). ``output_dir`` receives ``launch.json``.
        num_processes: ranks (one per GPU on CUDA; CPU processes with gloo otherwise).
        model_source: how the children load the transformer.
        dataset_config / dataset: the training data (see the module doc); both None: the
            config's ``dataset`` name. `eval_dataset`: a cached dataset for the eval loss
            (else the config's ``eval_dataset`` name, if any).
        progress, on_log, on_validation: called in this thread for every event of rank 0.
        should_stop: polled about every `poll_seconds`; True stops the run after a checkpoint.
        env: extra environment variables for the children.
        run: the run's `trainer.train.runs.RunFolder` when already prepared (the training node
            writes its validation inputs into it first). None: prepared here for a cached
            `dataset`, else by the children once the data is built (rank 0 then copies
            launch.json into the run folder).

    Raises:
        TrainingProcessError: a child failed (its error and the tail of stderr in the text).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    config.validate()
    if run is None and dataset is not None:
        from .runs import prepare_run, run_identity

        run = prepare_run(config, run_identity(config, model_source, dataset))
    out = config.confine(run.path, what="output_dir") if run is not None else Path(tempfile.mkdtemp(prefix="wan_s2v_launch-"))
    out.mkdir(parents=True, exist_ok=True)
    spec_path = _write_spec(out, config, model_source, dataset, dataset_config, eval_dataset, run)
    stop_file = out / f".stop-{uuid.uuid4().hex[:12]}"
    children = _Children.start(child_command(spec_path, num_processes, stop_file), env)
    relay = _EventRelay(progress, on_log, on_validation)
    try:
        relay.follow(children.events, should_stop, stop_file, poll_seconds)
        returncode = children.proc.wait()
    except BaseException:
        _stop_group(children.proc)
        raise
    finally:
        children.join_readers()
        stop_file.unlink(missing_ok=True)
        if run is None:
            shutil.rmtree(out, ignore_errors=True)

    tail = "".join(children.stderr_tail)
    if returncode != 0 or relay.done is None:
        raise TrainingProcessError(_failure_message(returncode, tail, "".join(children.stdout_tail)), returncode, tail)
    return relay.result(num_processes)


def _write_spec(out: Path, config: TrainConfig, model_source: ModelSource, dataset, dataset_config: DatasetConfig | None,
                eval_dataset, run: RunFolder | None) -> Path:
    """Write ``<out>/launch.json``, everything the children need to train; returns its path."""
    spec = {
        "config": config.to_dict(),
        "model": model_source.to_dict(),
        "dataset": _dataset_spec(dataset, dataset_config),
        "eval_dataset": _dataset_spec(eval_dataset),
        "run": None if run is None else run.to_dict(),
    }
    spec_path = out / SPEC_NAME
    with atomic_write(spec_path) as tmp:
        tmp.write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return spec_path


@dataclass
class _Children:
    """The started child processes and the threads that read their stdout (rank 0's events)
    and stderr (kept as a tail for the error message)."""

    proc: subprocess.Popen
    events: queue.Queue
    stderr_tail: collections.deque[str]
    stdout_tail: collections.deque[str]
    readers: list[threading.Thread]

    @classmethod
    def start(cls, command: list[str], env: dict[str, str] | None) -> _Children:
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [child_env.get("PYTHONPATH")])])
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=child_env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True,  # its own process group: torchrun and its workers stop together
        )
        events: queue.Queue = queue.Queue()
        stderr_tail: collections.deque[str] = collections.deque(maxlen=400)
        stdout_tail: collections.deque[str] = collections.deque(maxlen=50)
        readers = [
            threading.Thread(target=_read_stdout, args=(proc.stdout, events, stdout_tail), daemon=True,
                             name="wan-s2v-train-stdout"),
            threading.Thread(target=_read_lines, args=(proc.stderr, stderr_tail), daemon=True,
                             name="wan-s2v-train-stderr"),
        ]
        for reader in readers:
            reader.start()
        return cls(proc, events, stderr_tail, stdout_tail, readers)

    def join_readers(self) -> None:
        for reader in self.readers:
            reader.join(timeout=10)


@dataclass
class _EventRelay:
    """Turns rank 0's events into the caller's callbacks, and keeps what the result needs."""

    progress: ProgressFn | None = None
    on_log: Callable[[dict[str, Any]], None] | None = None
    on_validation: Callable[[int, list[Path]], None] | None = None
    #: the ``done`` event (None until the children report their result)
    done: dict[str, Any] | None = None
    #: loss of every step seen, by step
    steps: dict[int, float] = field(default_factory=dict)
    validations: list[tuple[int, list[Path]]] = field(default_factory=list)

    def follow(self, events: queue.Queue, should_stop: Callable[[], bool] | None, stop_file: Path,
               poll_seconds: float) -> None:
        """Relay events until the children's stdout ends; poll `should_stop` about every
        `poll_seconds` and create `stop_file` once it returns True."""
        finished = False
        while not finished:
            try:
                event = events.get(timeout=poll_seconds)
            except queue.Empty:
                event = None
            if event is _EOF:
                finished = True
            elif event is not None:
                self.handle(event)
            if should_stop is not None and not stop_file.exists() and should_stop():
                stop_file.touch()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "step":
            record = {k: v for k, v in event.items() if k not in ("event", "eta", "max_steps", "world_size")}
            self.steps[int(event["step"])] = float(event["loss"])
            if self.on_log is not None:
                self.on_log(record)
            if self.progress is not None:
                self.progress(int(event["step"]), float(event["loss"]), float(event["lr"]),
                              float(event.get("eta", 0.0)))
        elif kind == "validation":
            paths = [Path(p) for p in event.get("paths", [])]
            self.validations.append((int(event["step"]), paths))
            if self.on_validation is not None:
                self.on_validation(int(event["step"]), paths)
        elif kind == "done":
            self.done = event

    def result(self, num_processes: int) -> LaunchResult:
        """The `LaunchResult` of the ``done`` event."""
        done = self.done
        history = [(int(s), float(v)) for s, v in done.get("loss_history") or sorted(self.steps.items())]

        def path(key: str) -> Path | None:
            return Path(done[key]) if done.get(key) else None

        return LaunchResult(
            global_step=int(done["step"]), stopped=bool(done["stopped"]), lora_path=path("lora_path"),
            diffusers_lora_path=path("diffusers_lora_path"), checkpoint=path("checkpoint"), loss_history=history,
            eval_history=[(int(s), float(v)) for s, v in done.get("eval_history") or []],
            validations=self.validations, num_processes=num_processes, run_dir=path("run_dir"),
            run_id=done.get("run_id"),
        )


_EOF = object()


def _read_stdout(stream, events: queue.Queue, tail: collections.deque) -> None:
    try:
        for line in stream:
            if line.startswith(PREFIX):
                try:
                    events.put(json.loads(line[len(PREFIX):]))
                    continue
                except json.JSONDecodeError:
                    pass
            tail.append(line)
    finally:
        events.put(_EOF)


def _read_lines(stream, tail: collections.deque) -> None:
    for line in stream:
        tail.append(line)


def _stop_group(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM the children's process group, SIGKILL what is left after `grace` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*")


def _failure_message(returncode: int, stderr: str, stdout: str) -> str:
    """First the children's own error line (not torchrun's summary), then the stderr tail."""
    lines = [line.rstrip() for line in stderr.splitlines()]
    # torchrun repeats each rank's traceback indented in its summary
    errors = [line.strip() for line in lines if _ERROR_LINE.match(line.strip()) and "ChildFailedError" not in line]
    head = f"training in child processes failed (exit code {returncode})"
    if errors:
        head += f": {errors[-1]}"
    elif returncode == 0:
        head += ": they exited without reporting a result"
    body = "\n".join(lines[-60:]) or stdout[-3000:]
    return f"{head}\n--- last lines of the children's stderr ---\n{body}"


# --------------------------------------------------------------------------- child side


def _emit(event: dict[str, Any]) -> None:
    print(PREFIX + json.dumps(event, default=str), flush=True)


def _child_main(spec_path: str, stop_file: str | None) -> int:
    import inspect

    from ..distributed import init_from_env, shutdown
    from .loop import NonFiniteLossError, set_threads_from_env, train

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    config = TrainConfig.from_dict(spec["config"])
    dist = init_from_env(config.memory.device)
    try:
        set_threads_from_env()
        from ..memory.quantize import keeps_fp8_on_load

        source = ModelSource.from_dict(spec["model"])
        model = attach_model_source(source.load(keep_fp8=keeps_fp8_on_load(config.memory)), source)
        with dist.main_process_first():  # rank 0 builds (and caches) first, the others then read
            dataset = _build_data(spec["dataset"], config.dataset, model, config)
            eval_dataset = (_build_data(spec["eval_dataset"], config.eval_dataset, model, config)
                            if spec["eval_dataset"] or config.eval_dataset else None)

        last: dict[str, Any] = {}

        def on_log(record: dict[str, Any]) -> None:
            last.clear()
            last.update(record)

        def progress(step: int, loss: float, lr: float, eta: float) -> None:
            record = last if last.get("step") == step else {"step": step, "loss": loss, "lr": lr}
            _emit({"event": "step", **record, "eta": eta, "max_steps": config.max_train_steps,
                   "world_size": dist.world_size})

        def on_validation(step: int, paths, *_rest) -> None:
            items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
            _emit({"event": "validation", "step": int(step), "paths": [str(p) for p in items]})

        kwargs: dict[str, Any] = {}
        parameters = inspect.signature(train).parameters
        if "on_validation" in parameters:  # validation renders, when the loop has them
            kwargs["on_validation"] = on_validation
        validation = getattr(config, "validation", None)
        if "validation_bundle" in parameters and validation is not None and validation.enabled and dist.is_main:
            kwargs["validation_bundle"] = _validation_bundle(model, source, config)
        from .runs import RunFolder, prepare_run_everywhere

        if spec.get("run"):
            kwargs["run"] = RunFolder.from_dict(spec["run"])
        else:  # the data is built now: the run's folder can be chosen, and keeps the launch spec
            kwargs["run"] = prepare_run_everywhere(config, model, dataset, dist)
            if dist.is_main:
                with atomic_write(kwargs["run"].path / SPEC_NAME) as tmp:
                    tmp.write_text(Path(spec_path).read_text(encoding="utf-8"), encoding="utf-8")
        should_stop = (lambda: os.path.exists(stop_file)) if stop_file else None
        try:
            result = train(model, dataset, config, eval_dataset=eval_dataset, progress=progress, on_log=on_log,
                           should_stop=should_stop, **kwargs)
        except NonFiniteLossError as error:
            if dist.is_main:
                print(f"NonFiniteLossError: {error}", file=sys.stderr, flush=True)
            return 2
        if dist.is_main:
            _emit({"event": "done", "step": result.global_step, "stopped": result.stopped,
                   "lora_path": str(result.lora_path or ""),
                   "diffusers_lora_path": str(result.diffusers_lora_path or ""),
                   "checkpoint": str(result.checkpoint or ""), "loss_history": result.loss_history,
                   "eval_history": result.eval_history, "run_dir": str(result.run_dir or ""),
                   "run_id": result.run_id})
        return 0
    finally:
        shutdown()


def _validation_bundle(model, source: ModelSource, config: TrainConfig):
    """The encoders rank 0 renders validation clips with: the config's encoder paths, or the
    tiny ones for the tiny model (as ``python -m trainer train``)."""
    from . import cli

    paths = (config.vae_path, config.text_encoder_path, config.audio_encoder_path)
    if not source.is_tiny and not all(paths):
        raise ValueError("validation renders in training processes need vae_path, text_encoder_path and "
                         "audio_encoder_path in the training config (the processes load the encoders themselves)")
    if source.is_tiny and not any(paths):
        config = dataclasses.replace(config, vae_path=TINY)
    return cli.build_validation_bundle(model, config)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.train.launcher",
                                     description="Child side of trainer.train.launcher.train_in_subprocess.")
    sub = parser.add_subparsers(dest="command", required=True)
    child = sub.add_parser("child", help="one training rank (started by train_in_subprocess, maybe via torchrun)")
    child.add_argument("spec", help="launch.json written by train_in_subprocess")
    child.add_argument("--stop-file", help="stop (checkpoint + LoRA written) once this file exists")
    args = parser.parse_args(argv)
    from torch.distributed.elastic.multiprocessing.errors import record

    # `record` hands a failing rank's traceback to torchrun, which repeats it in its summary.
    return record(_child_main)(args.spec, args.stop_file)


if __name__ == "__main__":
    sys.exit(main())
