"""Shared by the serving tests: run the real ``mlflow models serve`` of a registered model from a directory
outside the checkout, in an environment that hides this repository (no PYTHONPATH to it, the editable
install's path entries and finders removed, and an audit hook that refuses and records every file opened
under its ``overlock``/``stages``/``pipelines``), and send it images over HTTP."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT = 240

HIDE_REPO = textwrap.dedent('''
    """Test-only sitecustomize: hide the overlock repositories from this interpreter and its children."""
    import json, os, sys

    _roots = json.loads(os.environ["HIDDEN_REPOS"])
    _forbidden = [os.path.join(r, d) for r in _roots for d in ("overlock", "stages", "pipelines")]
    _log = os.environ["HIDDEN_REPOS_LOG"]

    def _inside(path, dirs):
        path = os.path.abspath(path)
        return any(path == d or path.startswith(d + os.sep) for d in dirs)

    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) not in _roots
                   and not _inside(p or os.getcwd(), _forbidden)]
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]

    def _refuse(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if _inside(path, _forbidden):
                with open(_log, "a") as fh:
                    fh.write(f"{os.getpid()} {path}\\n")
                raise PermissionError(f"test: {path} is in the hidden repository")

    sys.addaudithook(_refuse)
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hidden_env(base: Path, uri: str) -> dict[str, str]:
    """The environment of a process that cannot see this repository (``base/hidden_opens.log`` records tries)."""
    import overlock

    site = base / "hide_repo"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HIDE_REPO)
    roots = sorted({str(ROOT), str(Path(overlock.__file__).resolve().parents[1])})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OVERLOCK", "MLFLOW"))}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", HIDDEN_REPOS=json.dumps(roots),
               HIDDEN_REPOS_LOG=str(base / "hidden_opens.log"), MLFLOW_TRACKING_URI=uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}")
    return env


@contextlib.contextmanager
def served(model_uri: str, base: Path, uri: str):
    """``mlflow models serve -m <model_uri> --env-manager local`` from ``base/elsewhere`` with :func:`hidden_env`;
    yields {"url", "env", "workdir", "log"} once ``/ping`` answers; stops the server's process group after."""
    workdir = base / "elsewhere"
    workdir.mkdir(exist_ok=True)
    env = hidden_env(base, uri)
    port = free_port()
    log_path = base / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
           "-p", str(port), "-h", "127.0.0.1"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited ({proc.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no answer on {url}/ping after {SERVER_START_TIMEOUT}s:\n"
                            f"{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield {"url": url, "env": env, "workdir": workdir, "log": log_path}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def invoke(url: str, images: list[bytes], params: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    """POST encoded images to ``/invocations`` (one ``image`` column, base64); (HTTP status, JSON answer)."""
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b).decode("ascii")] for b in images]}}
    if params:
        body["params"] = params
    req = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")
