"""Run folders: every training run owns one folder, and resumes only checkpoints that fit it.

A run is identified by its run id (``<name>-<YYYYmmdd-HHMMSS>-<6 hex>``), written in
``run.json`` in its folder together with its identity (`RunIdentity`: model file, LoRA
shape, dataset fingerprint, optimizer), and in every checkpoint's ``state.json``.

Where a run trains (`prepare_run`), for ``output_dir = .../<name>``:

* ``resume_from_checkpoint = "none"``: a new run, in ``<name>`` when that folder holds no
  run yet, else in the first free ``<name>_2``, ``<name>_3``, ... (the folder is claimed by
  creating its ``run.json`` exclusively, so two runs never get the same folder). Nothing
  of another run is ever deleted or replaced.
* ``"latest"``: the most recently saved checkpoint, among the runs of ``<name>`` (the
  folders above whose ``run.json`` names ``<name>``), whose identity matches this run; the
  run continues in that checkpoint's folder under its run id. Every checkpoint passed over
  is logged with the reason (another LoRA rank, another dataset, an older version's
  pickle file, ...). No match: a new run as for "none".
* a checkpoint folder (absolute, or relative to ``<name>/checkpoints``): it must match, else
  `IncompatibleCheckpointError` names what differs; a checkpoint of one of ``<name>``'s runs
  continues that run, any other starts a new run of ``<name>`` from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..paths import is_inside
from .checkpoint import (
    CHECKPOINT_DIR,
    OLDER_VERSION,
    STATE_JSON,
    CheckpointError,
    CheckpointNotFoundError,
    OlderCheckpointError,
    checkpoint_root,
    list_checkpoints,
    read_summary,
)
from .config import TrainConfig

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
#: Cache kinds that make up a training item (other kinds, such as CREPA's teacher frames,
#: are extra inputs of the same items).
_ITEM_KINDS = ("latents", "reference", "audio", "text")


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint was saved by a run of another model, LoRA shape, dataset or optimizer."""


# --------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with a run to be resumed by it."""

    model: str
    lora_rank: int
    lora_alpha: float
    lora_target_modules: tuple[str, ...]
    dataset: str
    optimizer: str
    use_ema: bool = False
    crepa: bool = False

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["lora_target_modules"] = list(self.lora_target_modules)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunIdentity:
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["lora_target_modules"] = tuple(values.get("lora_target_modules") or ())
        return cls(**values)

    def mismatches(self, saved: RunIdentity) -> list[str]:
        """What differs between a checkpoint's identity (`saved`) and this run's, in words."""
        problems = []
        for name, label in (("model", "model"), ("lora_rank", "LoRA rank"), ("lora_alpha", "LoRA alpha"),
                            ("lora_target_modules", "LoRA target modules"), ("dataset", "dataset"),
                            ("optimizer", "optimizer")):
            mine, theirs = getattr(self, name), getattr(saved, name)
            if name == "lora_target_modules":
                mine, theirs = sorted(mine), sorted(theirs)
            if mine != theirs:
                problems.append(f"{label}: checkpoint {_show(theirs)}, this run {_show(mine)}")
        if self.use_ema and not saved.use_ema:
            problems.append("use_ema is on but the checkpoint has no EMA weights")
        if self.crepa and not saved.crepa:
            problems.append("CREPA is on but the checkpoint has no CREPA projector")
        return problems


def _show(value: Any) -> str:
    return ",".join(value) if isinstance(value, list) else str(value)


def model_identity(model: Any) -> str:
    """The file a transformer was loaded from (name and size; `model` is a
    `trainer.train.launcher.ModelSource` or a model the loader recorded one on), or for a
    model built in memory its class and a hash of its config."""
    from .launcher import ModelSource, model_source_of

    source = model if isinstance(model, ModelSource) else model_source_of(model)
    if source is not None:
        if source.is_tiny:
            return f"tiny random model (seed {source.seed})"
        path = Path(source.path)
        files = [path] if path.is_file() else sorted(path.rglob("*.safetensors")) if path.is_dir() else []
        size = sum(f.stat().st_size for f in files)
        return f"{path.name} ({size:,} bytes)" if files else path.name
    # not the private entries: diffusers' `_use_default_values` lists a set, in an order that changes per process
    config = {k: v for k, v in dict(getattr(model, "config", None) or {}).items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{type(model).__name__} built in memory (config {digest})"


def dataset_fingerprint(dataset: Any) -> str:
    """A cheap identity of the training items, in their order: the cache keys of every
    window (content hashes of the media and encoders, `trainer.data`), read from the dataset
    (or from the windows list the launcher hands its processes, which gives the same
    value); a dataset's own ``fingerprint()``; else the item count and buckets."""
    inner = dataset
    while not any(hasattr(inner, a) for a in ("entries", "windows", "fingerprint")) and hasattr(inner, "dataset"):
        inner = inner.dataset  # wrappers such as the training node's inference-mode view
    if callable(getattr(inner, "fingerprint", None)):
        return str(inner.fingerprint())
    if hasattr(inner, "entries"):
        keys = [entry.keys for entry in inner.entries]
    elif hasattr(inner, "windows"):
        keys = [window["keys"] for window in inner.windows]
    else:
        getter = getattr(inner, "bucket_of", None)
        buckets = [str(getter(i)) if callable(getter) else "" for i in range(len(inner))]
        digest = hashlib.sha256(json.dumps([type(inner).__name__, buckets]).encode()).hexdigest()[:16]
        return f"{len(buckets)} items ({digest})"
    items = [[k.get(kind) for kind in _ITEM_KINDS] for k in keys]
    return f"{len(items)} windows ({hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]})"


def run_identity(config: TrainConfig, model: Any, dataset: Any) -> RunIdentity:
    lora = config.lora
    return RunIdentity(
        model=model_identity(model), lora_rank=lora.lora_rank, lora_alpha=float(lora.lora_alpha),
        lora_target_modules=tuple(lora.lora_target_modules), dataset=dataset_fingerprint(dataset),
        optimizer=config.optimizer.optimizer, use_ema=config.use_ema, crepa=config.crepa.crepa_enabled,
    )


# --------------------------------------------------------------------------- the run folder


@dataclass
class RunFolder:
    """Where a run trains and what it resumes (`prepare_run`)."""

    path: Path
    run_id: str
    name: str
    identity: RunIdentity
    #: The checkpoint the run starts from (None: from scratch).
    resume: Path | None = None

    def record(self) -> dict[str, Any]:
        """What each checkpoint's state.json keeps of the run."""
        return {"run_id": self.run_id, "name": self.name, "identity": self.identity.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        return {**self.record(), "path": str(self.path), "resume": None if self.resume is None else str(self.resume)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunFolder:
        return cls(Path(data["path"]), data["run_id"], data["name"], RunIdentity.from_dict(data["identity"]),
                   None if data.get("resume") is None else Path(data["resume"]))


def prepare_run_everywhere(config: TrainConfig, model: Any, dataset: Any, dist: Any) -> RunFolder:
    """`prepare_run` on rank 0 of `dist` (a `trainer.distributed.Dist`), its run on every rank;
    its error (a checkpoint that does not fit, a missing one) raised on every rank, so that
    none waits for the others forever."""
    if not dist.enabled:
        return prepare_run(config, run_identity(config, model, dataset))
    outcome: Any = None
    if dist.is_main:
        try:
            outcome = prepare_run(config, run_identity(config, model, dataset))
        except (CheckpointError, OSError) as error:
            outcome = error
    outcome = dist.broadcast_object(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def prepare_run(config: TrainConfig, identity: RunIdentity) -> RunFolder:
    """The folder, run id and checkpoint of a run with `config` (see the module doc); a new
    run's folder is claimed (its run.json written) before this returns."""
    base = Path(os.path.abspath(config.output_dir))
    value = config.resume_from_checkpoint
    mode = "none" if value is None or str(value).strip().lower() in ("", "none", "false") else str(value).strip()
    roots = config.roots()
    family = _family(base, roots)
    resume = None
    if mode.lower() == "latest":
        resume = _newest_compatible(family, identity, roots)
        if resume is not None:
            return _continue(resume, base.name, identity)
    elif mode != "none":
        resume = _locate(mode, base)
        summary = read_summary(resume)  # OlderCheckpointError for an older version's
        problems = _problems(summary, identity)
        if problems:
            raise IncompatibleCheckpointError(f"checkpoint {resume} does not fit this run: {'; '.join(problems)}")
        if resume.parent.name == CHECKPOINT_DIR and resume.parent.parent in family:
            return _continue(resume, base.name, identity)
    return _claim_new(base, identity, resume, roots)


def _locate(value: str, base: Path) -> Path:
    path = Path(value)
    if not path.is_absolute() and not path.exists():
        path = checkpoint_root(base) / value
    if not (path / STATE_JSON).is_file():
        raise CheckpointNotFoundError(f"resume_from_checkpoint: '{value}' is not a complete checkpoint folder "
                                      f"(no {STATE_JSON})")
    return Path(os.path.abspath(path))


def read_run_file(folder: Path) -> dict[str, Any] | None:
    """A folder's run.json (None: none, unreadable, or a link, which this trainer never writes
    and which may lead outside the allowed folders)."""
    path = folder / RUN_FILE
    if path.is_symlink():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _family(base: Path, roots: tuple[Path, ...]) -> list[Path]:
    """`base` and its numbered siblings ``<name>_<n>`` whose run.json names `base`'s name
    (folders that resolve outside `roots` are left out, unread)."""
    folders = [base] if is_inside(base, roots) else []
    pattern = re.compile(re.escape(base.name) + r"_(\d+)$")
    if base.parent.is_dir():
        numbered = sorted((int(m.group(1)), p) for p in base.parent.iterdir()
                          if (m := pattern.match(p.name)) and p.is_dir() and is_inside(p, roots))
        folders += [p for _, p in numbered if (read_run_file(p) or {}).get("name") == base.name]
    return folders


def _problems(summary: dict[str, Any], identity: RunIdentity) -> list[str]:
    run = summary.get("run")
    if not isinstance(run, dict) or not isinstance(run.get("identity"), dict):
        return ["its state.json records no run (not saved by this trainer)"]
    try:
        saved = RunIdentity.from_dict(run["identity"])
    except (TypeError, ValueError):
        return ["its state.json holds an unreadable run identity"]
    return identity.mismatches(saved)


def _newest_compatible(family: list[Path], identity: RunIdentity, roots: tuple[Path, ...]) -> Path | None:
    """The most recently saved checkpoint of `family` that fits; logs why each other one does not
    (a checkpoints folder that resolves outside `roots` is skipped unread)."""
    best, best_key = None, None
    for folder in family:
        root = checkpoint_root(folder)
        if not is_inside(root, roots):
            logger.warning("resume 'latest': skipped %s: it resolves to %s, outside the allowed folders (not read)",
                           root, root.resolve())
            continue
        for step, path in list_checkpoints(root):
            try:
                summary = read_summary(path)
            except OlderCheckpointError:
                logger.warning("resume 'latest': skipped checkpoint %s: %s", path, OLDER_VERSION)
                continue
            except CheckpointError as error:
                logger.warning("resume 'latest': skipped checkpoint %s: %s", path, error)
                continue
            problems = _problems(summary, identity)
            if problems:
                logger.warning("resume 'latest': skipped checkpoint %s: it does not fit this run (%s)", path,
                               "; ".join(problems))
                continue
            key = (_saved_at(summary, path), step)
            if best_key is None or key > best_key:
                best, best_key = path, key
    return best


def _saved_at(summary: dict[str, Any], path: Path) -> float:
    try:
        return float(summary["saved_at"])
    except (KeyError, TypeError, ValueError):
        return (path / STATE_JSON).stat().st_mtime


def _continue(checkpoint: Path, name: str, identity: RunIdentity) -> RunFolder:
    """Continue the run that owns `checkpoint`'s folder (adopting the checkpoint's run id
    when the folder has no run.json, e.g. checkpoints copied in by hand)."""
    folder = checkpoint.parent.parent
    info = read_run_file(folder)
    if info is None or not info.get("run_id"):
        saved = read_summary(checkpoint).get("run") or {}
        info = {"run_id": saved.get("run_id") or new_run_id(name), "name": name, "identity": identity.to_dict()}
        if not _create_run_file(folder, info):
            info = read_run_file(folder) or info
    run = RunFolder(folder, str(info["run_id"]), str(info.get("name") or name), identity, checkpoint)
    logger.info("run %s resumes from %s", run.run_id, checkpoint)
    return run


def _claim_new(base: Path, identity: RunIdentity, resume: Path | None, roots: tuple[Path, ...]) -> RunFolder:
    for n in range(1, 1_000_000):
        folder = base if n == 1 else base.with_name(f"{base.name}_{n}")
        if _holds_a_run(folder, roots):
            continue
        run_id = new_run_id(base.name)
        info = {"run_id": run_id, "name": base.name, "identity": identity.to_dict(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_from": None if resume is None else str(resume)}
        if not _create_run_file(folder, info):
            continue  # another run claimed it just now
        if folder != base:
            logger.warning("%s holds another run; this run (id %s) writes to %s", base, run_id, folder)
        return RunFolder(folder, run_id, base.name, identity, resume)
    raise RuntimeError(f"no free run folder next to {base}")


def _holds_a_run(folder: Path, roots: tuple[Path, ...]) -> bool:
    """A run.json, or what a run of an older version left (checkpoints, logs, LoRA files); a
    folder or checkpoints folder that links outside `roots` counts as taken, unread."""
    checkpoints = folder / CHECKPOINT_DIR
    if not (is_inside(folder, roots) and is_inside(checkpoints, roots)):
        return True
    if (folder / RUN_FILE).exists():
        return True
    return ((checkpoints.is_dir() and any(checkpoints.iterdir())) or (folder / "logs").exists()
            or (folder.is_dir() and any(folder.glob("*.safetensors"))))


def _create_run_file(folder: Path, info: dict[str, Any]) -> bool:
    """Write `folder`/run.json unless it exists (atomic claim); False when it existed."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder / RUN_FILE, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(info, indent=2))
        handle.flush()
        os.fsync(handle.fileno())
    return True


def new_run_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def check_checkpoint_lora(path: Path, saved: dict[str, Any], params: dict[str, Any]) -> None:
    """`IncompatibleCheckpointError` unless the checkpoint's LoRA tensors have exactly the
    names and shapes of this run's LoRA parameters (what its run record claims, verified)."""
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    shapes = [f"{n}: checkpoint {list(saved[n].shape)}, this run {list(params[n].shape)}"
              for n in params if n in saved and tuple(saved[n].shape) != tuple(params[n].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} LoRA weight(s) of this run are not in it (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"it has {len(unexpected)} LoRA weight(s) this run does not (e.g. {unexpected[0]})")
    if shapes:
        problems.append(f"{len(shapes)} LoRA weight(s) differ in shape (e.g. {shapes[0]})")
    if problems:
        raise IncompatibleCheckpointError(f"checkpoint {path} does not fit this run's LoRA: {'; '.join(problems)}")
