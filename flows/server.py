"""The Prefect API a `livo` command talks to: the configured one, or a temporary server livo starts itself.

With PREFECT_API_URL set (a `prefect server start`, Prefect Cloud, the test harness) livo uses it. Without
it Prefect would start an "ephemeral" API server as a child in livo's own process group: Ctrl-C then kills
that server first, Prefect's crash report to it hangs, and a SIGKILLed livo leaves it running. So livo
starts the same server (uvicorn + prefect.server.api.server:create_app, UI off, on 127.0.0.1) itself:

- in its own session, so the terminal's Ctrl-C reaches only livo, which then stops it;
- with PR_SET_PDEATHSIG, so the kernel stops it when livo dies in any way, SIGKILL included;
- only when a command gets as far as running a flow (bad input fails before: no server, no wait).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from contextlib import closing

from livo_core.errors import LivoError

_server: subprocess.Popen | None = None


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel for SIGTERM when livo (the parent) dies.
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def ensure_api(timeout_s: float | None = None) -> str | None:
    """Make sure a Prefect API is there for the flows this process runs; returns its URL (None: configured).

    Call from the main thread, before the first flow runs.
    """
    global _server
    from prefect.settings import PREFECT_API_URL

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():   # configured (or a test harness's)
        return None
    if _server is not None and _server.poll() is None:
        return os.environ["PREFECT_API_URL"]
    import httpx

    timeout_s = timeout_s or float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", 120))
    port = _free_port()
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    import prefect

    _server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "error",
         "--lifespan", "on"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    atexit.register(stop_api)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + timeout_s
    with httpx.Client() as client:
        while True:
            if _server.poll() is not None:
                raise LivoError(f"the temporary Prefect API server exited at start (code {_server.returncode}); run "
                                "`prefect server start` and set PREFECT_API_URL, or rerun with --verbose")
            try:
                if client.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                stop_api()
                raise LivoError(f"the temporary Prefect API server did not answer within {timeout_s:g} s; raise "
                                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or start `prefect server start`")
            time.sleep(0.1)
    os.environ["PREFECT_API_URL"] = url
    _refresh_prefect_settings()
    return url


def _refresh_prefect_settings() -> None:
    # Prefect may have read its settings at import, before PREFECT_API_URL was set.
    try:
        import prefect.context

        prefect.context.refresh_global_settings_context()
    except (ImportError, AttributeError):
        pass


def stop_api() -> None:
    global _server
    if _server is None:
        return
    if _server.poll() is None:
        _server.terminate()
        try:
            _server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _server.kill()
            _server.wait()
    _server = None
