"""Start a real ComfyUI server with this pack installed, and talk to it.

Used by the end-to-end checks and the probe (`scripts/comfyui_e2e.py`, `scripts/comfyui_probe.py`,
their tests) and by hand::

    python scripts/comfyui_server.py serve --comfyui /tmp/ComfyUI --port 8188
    python scripts/comfyui_server.py stub      # build the CUDA stub, print the LD_PRELOAD value

What `ComfyUIServer.start()` does:

1. with `isolate=True` (the default) gives the server a temporary base directory
   (`--base-directory`: its own models, custom_nodes, input, output, temp and user folders,
   all removed on `stop()`) and links the repository root into its `custom_nodes/` only, so
   the given ComfyUI checkout is left exactly as it was (packs installed there are not
   loaded); with `isolate=False` the link goes into `<comfyui>/custom_nodes/` and is removed
   again on `stop()` when this server created it;
2. checks that the interpreter that will run ComfyUI has ComfyUI's requirements (it is
   `--python`, else COMFYUI_PYTHON, else a venv inside the checkout, else this one) and fails
   in one line naming what is missing otherwise;
3. if `torchvision` does not import next to the installed torch (PyPI's torchvision and
   torchaudio are CUDA builds, torch here is a CPU build), builds the CUDA symbol stub from
   `scripts/comfyui_stub/` into a cache folder outside the repository and preloads it
   (test server only: the pack never relies on it);
4. starts `main.py --cpu` on a free local port;
5. polls `/object_info` until the server answers (with a deadline), then fails with the log
   excerpt if the log says that this pack failed to import.

Only the standard library is required; `websocket-client` is used for `wait_for` when it is
installed, otherwise `wait_for` polls `/history`.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
STUB_DIR = Path(__file__).resolve().parent / "comfyui_stub"
PACK_LINK_NAME = "comfyui-wan-s2v-trainer"
STUB_LIBRARIES = ("libc10_cuda.so", "libtorch_cuda.so")

StubMode = Literal["auto", "always", "never"]
PromptStatus = Literal["success", "error", "interrupted"]


class ComfyUIError(RuntimeError):
    """The server could not be started, or answered an API call with an error."""


class PackImportError(ComfyUIError):
    """ComfyUI started but logged IMPORT FAILED for this pack."""


class PromptFailed(ComfyUIError):
    """A queued prompt ended with an execution error or was interrupted."""

    def __init__(self, message: str, result: PromptResult):
        super().__init__(message)
        self.result = result


@dataclass
class PromptResult:
    """How one queued prompt ended.

    `history` is the prompt's `/history/<id>` entry (keys "prompt", "outputs", "status",
    "meta"); `events` are the websocket messages seen for it, in order, as
    `{"type": ..., "data": ...}` (binary frames, e.g. previews, as `{"type": "binary",
    "data": bytes}`); empty when websocket-client is not installed.
    """

    prompt_id: str
    status: PromptStatus
    history: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def outputs(self) -> dict[str, Any]:
        """Per-node UI outputs ({node_id: {"images": [...], ...}})."""
        return dict(self.history.get("outputs", {}))

    @property
    def status_messages(self) -> list[tuple[str, dict[str, Any]]]:
        """ComfyUI's own status messages (execution_start, execution_error, ...)."""
        messages = self.history.get("status", {}).get("messages", [])
        return [(str(name), dict(data)) for name, data in messages]

    @property
    def error(self) -> dict[str, Any] | None:
        """The `execution_error` data (node_id, node_type, exception_message, traceback)."""
        for name, data in self.status_messages:
            if name == "execution_error":
                return data
        return None

    def events_of_type(self, event_type: str) -> list[dict[str, Any]]:
        """The `data` of every websocket event of one type (e.g. a custom event name)."""
        return [e["data"] for e in self.events if e.get("type") == event_type]


# --------------------------------------------------------------------------------------
# Setup helpers
# --------------------------------------------------------------------------------------


def resolve_comfyui_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The ComfyUI checkout: `path`, else env COMFYUI_PATH; must contain main.py."""
    raw = path if path is not None else os.environ.get("COMFYUI_PATH")
    if not raw:
        raise ComfyUIError("no ComfyUI path given (pass one or set COMFYUI_PATH)")
    root = Path(raw).expanduser().resolve()
    if not (root / "main.py").is_file():
        raise ComfyUIError(f"{root} is not a ComfyUI checkout (no main.py)")
    return root


def resolve_python(comfyui: Path, python: str | None = None) -> str:
    """The interpreter that runs the server.

    `python`, else env COMFYUI_PYTHON, else `<comfyui>/.venv/bin/python` or
    `<comfyui>/venv/bin/python` when present (a venv made with --system-site-packages keeps
    ComfyUI-only packages such as torchvision out of the interpreter the pack is tested
    with), else the current interpreter.
    """
    if python:
        return python
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for venv in (".venv", "venv"):
        candidate = comfyui / venv / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def comfyui_python(comfyui: str | os.PathLike[str], python: str | None = None) -> str:
    """The interpreter for ComfyUI (see `resolve_python`), checked to have its requirements."""
    root = resolve_comfyui_path(comfyui)
    chosen = resolve_python(root, python)
    check_comfyui_python(root, chosen)
    return chosen


#: ComfyUI requirement name -> import name, where they differ.
_IMPORT_NAMES = {"pyyaml": "yaml", "pillow": "PIL", "sqlalchemy": "sqlalchemy", "pydantic-settings": "pydantic_settings"}


def check_comfyui_python(comfyui: Path, python: str) -> None:
    """Fail in one line when `python` lacks packages of ComfyUI's requirements.txt (torch and
    its companions are left to the CUDA-stub probe, ComfyUI's front-end packages to ComfyUI)."""
    names = []
    for line in (comfyui / "requirements.txt").read_text().splitlines():
        name = line.split("#")[0].strip().split(";")[0]
        name = name.replace(">", "=").replace("<", "=").replace("~", "=").split("=")[0].strip().lower()
        if name and not name.startswith(("torch", "comfyui")):
            names.append(_IMPORT_NAMES.get(name, name.replace("-", "_")))
    code = ("import importlib.util, sys; "
            "print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))")
    proc = subprocess.run([python, "-c", code, *names], check=False, capture_output=True, text=True)
    missing = proc.stdout.split()
    if proc.returncode != 0 or missing:
        raise ComfyUIError(
            f"{python} lacks ComfyUI's requirements ({', '.join(missing) or proc.stderr.strip()[-200:]}): "
            "set COMFYUI_PYTHON (or --python) to the interpreter ComfyUI's requirements are installed in"
        )


def link_pack(comfyui: Path, pack_root: Path = REPO_ROOT, name: str = PACK_LINK_NAME) -> Path:
    """Symlink `pack_root` as `<base>/custom_nodes/<name>` (`comfyui` is the checkout or a
    base directory); returns the link path.

    An existing link to another folder is replaced (e.g. a CI clone elsewhere); a real
    folder of that name is left alone and is an error.
    """
    custom_nodes = comfyui / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    link = custom_nodes / name
    target = pack_root.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return link
        link.unlink()
    elif link.exists():
        raise ComfyUIError(f"{link} exists and is not a symlink; remove it to link this pack")
    tmp_link = custom_nodes / f".{name}.{uuid.uuid4().hex[:8]}"
    tmp_link.symlink_to(target, target_is_directory=True)
    os.replace(tmp_link, link)  # atomic, also when another process linked it meanwhile
    return link


def default_stub_cache() -> Path:
    """Where the CUDA stub is built: env COMFYUI_CUDA_STUB_CACHE, else ~/.cache/...."""
    env = os.environ.get("COMFYUI_CUDA_STUB_CACHE")
    if env:
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "comfyui-wan-s2v-trainer" / "cuda-stub"


def build_cuda_stub(cache_dir: Path | None = None) -> list[Path]:
    """Build the stub libraries (once per source version) and return their paths.

    The output folder is named after a hash of the stub sources, so an edited stub is
    rebuilt and a stale one is never preloaded.
    """
    digest = hashlib.sha256()
    for source in sorted(STUB_DIR.iterdir()):
        if source.is_file():
            digest.update(source.name.encode() + b"\0" + source.read_bytes())
    out_dir = (cache_dir or default_stub_cache()) / digest.hexdigest()[:16]
    libs = [out_dir / name for name in STUB_LIBRARIES]
    if all(lib.is_file() for lib in libs):
        return libs
    if shutil.which(os.environ.get("CC", "gcc")) is None:
        raise ComfyUIError("building the CUDA stub needs a C compiler (gcc, or set CC)")
    proc = subprocess.run(
        ["bash", str(STUB_DIR / "build.sh"), str(out_dir)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0 or not all(lib.is_file() for lib in libs):
        raise ComfyUIError(f"building the CUDA stub failed:\n{proc.stdout}\n{proc.stderr}")
    return libs


def _probe_imports(python: str, preload: list[Path]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if preload:
        env["LD_PRELOAD"] = _join_preload(preload, env.get("LD_PRELOAD"))
    # Import whichever of torchvision/torchaudio is installed, as ComfyUI would.
    code = (
        "import importlib.util, torch\n"
        "for name in ('torchvision', 'torchaudio'):\n"
        "    if importlib.util.find_spec(name) is not None:\n"
        "        __import__(name)\n"
    )
    return subprocess.run([python, "-c", code], check=False, capture_output=True, text=True, env=env)


def _join_preload(libs: list[Path], existing: str | None) -> str:
    parts = [str(lib) for lib in libs]
    if existing:
        parts.append(existing)
    return " ".join(parts)


def resolve_preload(python: str, mode: StubMode = "auto", cache_dir: Path | None = None) -> list[Path]:
    """Libraries to preload into the server: none if torchvision imports as it is.

    "auto" probes `import torchvision, torchaudio` in `python` and builds the stub only when
    that fails; "always"/"never" skip the probe. Raises if the stub does not fix the import.
    """
    if mode == "never":
        return []
    if mode == "auto" and _probe_imports(python, []).returncode == 0:
        return []
    libs = build_cuda_stub(cache_dir)
    probe = _probe_imports(python, libs)
    if probe.returncode != 0:
        raise ComfyUIError(
            "torchvision/torchaudio do not import even with the CUDA stub preloaded "
            f"({' '.join(map(str, libs))}):\n{probe.stderr[-3000:]}"
        )
    return libs


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def import_failure_excerpt(log: str, link: Path, context_lines: int = 60) -> str | None:
    """The log excerpt explaining why the pack at `link` failed to import, or None.

    ComfyUI logs the traceback, then "Cannot import <path> module for custom nodes: <exc>",
    and later "<secs> seconds (IMPORT FAILED): <path>" in its import-times table.
    """
    lines = log.splitlines()
    path = str(link)
    failed = [i for i, line in enumerate(lines) if "IMPORT FAILED" in line and line.rstrip().endswith(path)]
    if not failed:
        return None
    cannot = [i for i, line in enumerate(lines) if line.startswith(f"Cannot import {path} module")]
    if cannot:
        end = cannot[-1]
        start = end
        while start > 0 and end - start < context_lines and not lines[start].startswith("Traceback"):
            start -= 1
        excerpt = lines[start : end + 1]
    else:
        excerpt = lines[max(0, failed[-1] - context_lines) : failed[-1]]
    excerpt.append(lines[failed[-1]])
    return "\n".join(excerpt)


# --------------------------------------------------------------------------------------
# Websocket events
# --------------------------------------------------------------------------------------


class _EventStream:
    """Reads `/ws?clientId=` in a background thread and files events by prompt id.

    Events that carry no prompt id (custom events sent with `PromptServer.send_sync`,
    progress of older servers, binary previews) are filed under the prompt that is
    executing at that moment.
    """

    def __init__(self, url: str):
        import websocket  # websocket-client

        self._ws = websocket.create_connection(url, timeout=10)
        self._ws.settimeout(None)
        self._closed_exc = websocket.WebSocketConnectionClosedException
        self._cond = threading.Condition()
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._finished: set[str] = set()
        self._current: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="comfyui-ws", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                message = self._ws.recv()
            except (self._closed_exc, OSError):
                break
            except Exception:  # noqa: BLE001 - any read error ends the stream
                break
            if message is None or message == "":
                break
            self._file(message)
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _file(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            event: dict[str, Any] = {"type": "binary", "data": message}
            prompt_id = self._current
        else:
            try:
                event = json.loads(message)
            except json.JSONDecodeError:
                return
            data = event.get("data")
            prompt_id = data.get("prompt_id") if isinstance(data, dict) else None
            prompt_id = prompt_id or self._current
        with self._cond:
            if event.get("type") == "execution_start" and prompt_id:
                self._current = prompt_id
            if prompt_id:
                self._events.setdefault(prompt_id, []).append(event)
            data = event.get("data")
            # ComfyUI sends {"node": None, "prompt_id": id} once the prompt's history is saved.
            if (
                event.get("type") == "executing"
                and isinstance(data, dict)
                and data.get("node") is None
                and data.get("prompt_id")
            ):
                self._finished.add(data["prompt_id"])
                if self._current == data["prompt_id"]:
                    self._current = None
            self._cond.notify_all()

    def wait_finished(self, prompt_id: str, timeout: float) -> bool:
        """True once the prompt's final `executing` event arrived; False on timeout/close."""
        with self._cond:
            return self._cond.wait_for(lambda: prompt_id in self._finished or self._closed, timeout)

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    def events(self, prompt_id: str) -> list[dict[str, Any]]:
        with self._cond:
            return list(self._events.get(prompt_id, []))

    def close(self) -> None:
        # shutdown() drops the socket without a close handshake, which would race the
        # reader thread's recv(); the reader then sees the closed socket and ends.
        with contextlib.suppress(Exception):  # the socket may already be dead
            self._ws.shutdown()  # type: ignore[no-untyped-call]
        self._thread.join(timeout=5)


def _websocket_available() -> bool:
    try:
        import websocket  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------


class ComfyUIServer:
    """A ComfyUI server process with this pack linked in.

    Use as a context manager (`with ComfyUIServer(path) as server: ...`) or call
    `start()` / `stop()`. `isolate=True` runs the server on a temporary base directory (its
    own models/custom_nodes/input/output/temp/user folders and database), removed on
    `stop()` unless `keep_run_dir`; more model folders can come through `extra_args`, e.g.
    `["--extra-model-paths-config", yaml]`. `isolate=False` uses the checkout's folders.
    """

    def __init__(
        self,
        comfyui: str | os.PathLike[str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str | None = None,
        pack_root: Path = REPO_ROOT,
        link_name: str = PACK_LINK_NAME,
        cuda_stub: StubMode = "auto",
        stub_cache: Path | None = None,
        isolate: bool = True,
        keep_run_dir: bool = False,
        extra_args: list[str] | None = None,
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
    ):
        self.comfyui = resolve_comfyui_path(comfyui)
        self.host = host
        self.port = port
        self.python = resolve_python(self.comfyui, python)
        self.pack_root = pack_root
        self.link_name = link_name
        self.cuda_stub: StubMode = cuda_stub
        self.stub_cache = stub_cache
        self.isolate = isolate
        self.keep_run_dir = keep_run_dir
        self.extra_args = list(extra_args or [])
        self.startup_timeout = startup_timeout
        self.extra_env = dict(env or {})
        self.client_id = uuid.uuid4().hex
        self.pack_link: Path = self.comfyui / "custom_nodes" / link_name
        self.preload: list[Path] = []
        self.run_dir: Path | None = None
        self.log_path: Path | None = None
        self._final_log = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self._events: _EventStream | None = None
        self._remove_link_on_stop = False

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The server's exit code once it has exited by itself, else None."""
        return None if self._proc is None else self._proc.poll()

    def command(self) -> list[str]:
        """The server command line (without the environment)."""
        assert self.port is not None
        cmd = [self.python, "main.py", "--cpu", "--listen", self.host, "--port", str(self.port)]
        cmd += ["--disable-auto-launch"]
        if self.isolate:
            assert self.run_dir is not None
            cmd += [
                "--base-directory", str(self.run_dir),
                "--user-directory", str(self.run_dir / "user"),
                "--database-url", f"sqlite:///{self.run_dir / 'user' / 'comfyui.db'}",
            ]  # fmt: skip
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["PYTHONUNBUFFERED"] = "1"
        if self.preload:
            env["LD_PRELOAD"] = _join_preload(self.preload, env.get("LD_PRELOAD"))
        return env

    def start(self) -> ComfyUIServer:
        """Link the pack, start the server and wait until it answers; see the module doc."""
        if self._proc is not None:
            raise ComfyUIError("server already started")
        check_comfyui_python(self.comfyui, self.python)
        self.preload = resolve_preload(self.python, self.cuda_stub, self.stub_cache)
        if self.port is None:
            self.port = free_port(self.host)
        self.run_dir = Path(tempfile.mkdtemp(prefix="comfyui-e2e-"))
        if self.isolate:
            for sub in ("models", "custom_nodes", "input", "output", "temp", "user"):
                (self.run_dir / sub).mkdir()
            self.pack_link = link_pack(self.run_dir, self.pack_root, self.link_name)
        else:
            created = not (self.comfyui / "custom_nodes" / self.link_name).is_symlink()
            self.pack_link = link_pack(self.comfyui, self.pack_root, self.link_name)
            self._remove_link_on_stop = created
        self.log_path = self.run_dir / "server.log"
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            self.command(),
            cwd=self.comfyui,
            env=self.environment(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        try:
            self._wait_until_up()
            self.check_pack_import()
            if _websocket_available():
                ws_url = f"ws://{self.host}:{self.port}/ws?clientId={self.client_id}"
                self._events = _EventStream(ws_url)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def hears_events(self) -> bool:
        """Whether websocket events are collected (websocket-client is installed here)."""
        return self._events is not None

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise ComfyUIError(
                    f"ComfyUI exited with code {self._proc.returncode} while starting:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/object_info", timeout=30) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise ComfyUIError(
                    f"ComfyUI did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.25)

    def check_pack_import(self) -> None:
        """Raise PackImportError (with the traceback from the log) if our pack failed."""
        excerpt = import_failure_excerpt(self.log_text(), self.pack_link)
        if excerpt is not None:
            raise PackImportError(f"ComfyUI failed to import {self.pack_link}:\n{excerpt}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove the run folder."""
        if self._events is not None:
            self._events.close()
            self._events = None
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self.log_path is not None and self.log_path.is_file():
            self._final_log = self.log_path.read_text(errors="replace")
        if self._remove_link_on_stop and self.pack_link.is_symlink():
            self.pack_link.unlink()
            self._remove_link_on_stop = False
        if self.run_dir is not None and not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> ComfyUIServer:  # noqa: PYI034 - typing.Self needs Python 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- log -----------------------------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server printed so far (kept after `stop()`)."""
        if self.log_path is not None and self.log_path.is_file():
            return self.log_path.read_text(errors="replace")
        return self._final_log

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    # -- folders -------------------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """The folder holding models/, input/, output/ ... for this server."""
        return self.run_dir if self.isolate and self.run_dir else self.comfyui

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    # -- HTTP API ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        """Call the API; returns the decoded JSON (or text). Raises ComfyUIError on HTTP errors.

        The body is sent as Python's json writes it, NaN and Infinity included (ComfyUI's
        parser, Python's json, reads them back as floats)."""
        data = None if body is None else json.dumps(body).encode()
        return self._send(method, path, data, "application/json", timeout)

    def upload(self, filename: str, data: bytes, *, subfolder: str = "", kind: str = "input",
               overwrite: bool = False, timeout: float = 60.0) -> dict[str, Any]:
        """`POST /upload/image` as the front end sends it: any bytes, saved by ComfyUI as
        `<kind folder>/<subfolder>/<filename>` (`kind`: "input", "output" or "temp"); returns
        ComfyUI's answer ({"name", "subfolder", "type"})."""
        boundary = uuid.uuid4().hex
        fields = {"type": kind, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
                 for name, value in fields.items()]
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return dict(self._send("POST", "/upload/image", body, f"multipart/form-data; boundary={boundary}", timeout))

    def _send(self, method: str, path: str, data: bytes | None, content_type: str, timeout: float) -> Any:
        req = urllib.request.Request(f"{self.base_url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                content_type = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise ComfyUIError(f"{method} {path} -> HTTP {err.code}: {detail}") from err
        if "json" in content_type or raw[:1] in (b"{", b"["):
            return json.loads(raw)
        return raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """`GET /object_info` (all node classes) or `/object_info/<class>` (that one's entry)."""
        if node_class is None:
            return dict(self.get("/object_info"))
        info = self.get(f"/object_info/{urllib.parse.quote(node_class)}")
        if node_class not in info:
            raise KeyError(node_class)
        return dict(info[node_class])

    def queue_prompt(self, api_graph: dict[str, Any]) -> str:
        """Queue an API-format graph; returns its prompt id. Validation errors raise."""
        answer = self.request("POST", "/prompt", {"prompt": api_graph, "client_id": self.client_id})
        if answer.get("node_errors"):
            raise ComfyUIError(f"prompt rejected: {json.dumps(answer['node_errors'], indent=1)}")
        return str(answer["prompt_id"])

    def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The prompt's history entry, or None while it is queued or running."""
        answer = self.get(f"/history/{urllib.parse.quote(prompt_id)}")
        entry = answer.get(prompt_id) if isinstance(answer, dict) else None
        return dict(entry) if entry else None

    def interrupt(self) -> None:
        """Cancel the running prompt (the UI's Cancel button)."""
        self.request("POST", "/interrupt", {})

    def wait_for(self, prompt_id: str, timeout: float = 600.0, raise_on_error: bool = True) -> PromptResult:
        """Wait until the prompt finished; follows the websocket, else polls /history.

        Raises PromptFailed when it ended in an error or was interrupted (unless
        `raise_on_error` is False), ComfyUIError on timeout or when the server died.
        """
        deadline = time.monotonic() + timeout
        entry = None
        while entry is None:
            if not self.running:
                raise ComfyUIError(f"ComfyUI is not running:\n{self.log_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ComfyUIError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")
            if self._events is not None and not self._events.closed:
                # The final event comes after the history is saved; re-check history every
                # few seconds anyway in case the socket missed it.
                self._events.wait_finished(prompt_id, min(remaining, 5.0))
            else:
                time.sleep(min(remaining, 0.25))
            entry = self.history(prompt_id)  # written only once the prompt has finished
        events = self._events.events(prompt_id) if self._events is not None else []
        result = PromptResult(prompt_id, _prompt_status(entry), entry, events)
        if raise_on_error and result.status != "success":
            error = result.error or {}
            message = f"prompt {prompt_id} ended with {result.status}"
            if error:
                message += (
                    f" in node {error.get('node_id')} ({error.get('node_type')}): "
                    f"{error.get('exception_type')}: {error.get('exception_message')}\n"
                    + "".join(error.get("traceback", []))
                )
            raise PromptFailed(message, result)
        return result


def _prompt_status(entry: dict[str, Any]) -> PromptStatus:
    status = entry.get("status") or {}
    names = {str(message[0]) for message in status.get("messages", [])}
    if "execution_interrupted" in names:
        return "interrupted"
    if status.get("status_str") == "error" or "execution_error" in names:
        return "error"
    return "success"


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    server = ComfyUIServer(
        args.comfyui,
        python=args.python,
        host=args.host,
        port=args.port,
        cuda_stub=args.cuda_stub,
        isolate=args.isolate,
        startup_timeout=args.timeout,
    )
    server.start()
    print(f"ComfyUI is up at {server.base_url} (pack linked at {server.pack_link})")
    if server.preload:
        print(f"LD_PRELOAD={_join_preload(server.preload, None)}")
    print(f"log: {server.log_path}   (Ctrl-C stops it)", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while server.running and not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        code = server.returncode
        server.stop()
    if code is not None:
        print(f"ComfyUI exited with code {code}:\n{server.log_tail()}", file=sys.stderr)
        return 1
    return 0


def _stub(args: argparse.Namespace) -> int:
    libs = build_cuda_stub(Path(args.cache) if args.cache else None)
    print(_join_preload(libs, None))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start ComfyUI with this pack and keep it running")
    serve.add_argument("--comfyui", default=None, help="ComfyUI checkout (default: env COMFYUI_PATH)")
    serve.add_argument("--python", default=None, help="interpreter for the server (see resolve_python)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=None, help="default: a free port")
    serve.add_argument("--cuda-stub", choices=["auto", "always", "never"], default="auto")
    serve.add_argument(
        "--isolate", action="store_true", help="own input/output/temp/user folders in a temp dir"
    )
    serve.add_argument("--timeout", type=float, default=180.0, help="start-up deadline, seconds")
    serve.set_defaults(func=_serve)
    stub = sub.add_parser("stub", help="build the CUDA stub and print the LD_PRELOAD value")
    stub.add_argument("--cache", default=None, help="cache folder (default: ~/.cache/...)")
    stub.set_defaults(func=_stub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ComfyUIError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
