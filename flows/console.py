"""What reaches the user's terminal: the one place where errors, interruptions and library noise are handled.

- `quiet(verbose)`: library progress bars and warnings off, Prefect's console log off (its API log, what
  the Prefect UI shows, stays), livo's own warnings as `livo: warning: ...` lines. `--verbose` keeps all.
- `report(exc)`: any exception that ends a command becomes ONE line on stderr and an exit code:
  LivoError (bad input, raised anywhere: CLI, Prefect task or flow) -> `livo: error: <problem>; <fix>`, 2;
  a full disk, a read-only or blocked output -> the same kind of line, 1; anything else (a bug) -> a line
  naming it, 1, with the traceback only under --verbose.
- `install_signal_handlers(hint)`: Ctrl-C / SIGTERM -> `livo: interrupted (SIGTERM); <how to continue>`,
  every child process (Prefect's ephemeral API server, Dask workers) stopped, exit 130 / 143. Nothing
  finished is lost: shards, checkpoints and logs are written atomically, so a kill leaves only temporary
  files that the next run cleans.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

from livo_core.errors import LivoError
from livo_core.files import os_error_line
from livo_core.secrets import redact

_state = {"verbose": False, "hint": "", "signal": None}


# --------------------------------------------------------------------------- quiet libraries
class _LivoLineHandler(logging.Handler):
    """livo's own log records as `livo: warning: ...` lines on stderr (and INFO too when verbose)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
            print(redact(f"livo: {level}{record.getMessage()}"), file=sys.stderr, flush=True)
        except Exception:  # a log line must never end a run
            pass


def quiet(verbose: bool = False) -> None:
    """Set up the process's output (call before Prefect, diffusers or transformers are imported)."""
    _state["verbose"] = verbose
    livo_log = logging.getLogger("livo")
    if not any(isinstance(h, _LivoLineHandler) for h in livo_log.handlers):
        livo_log.addHandler(_LivoLineHandler())
    livo_log.setLevel(logging.INFO if verbose else logging.WARNING)
    livo_log.propagate = False
    if verbose:
        os.environ["LIVO_VERBOSE"] = "1"
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"   # transformers' "Loading weights" bars read this too
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # Prefect: no console log (tracebacks of failed tasks, "Crash detected!"); the API log handler stays.
    os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "CRITICAL"
    warnings.filterwarnings("ignore")
    quiet_loaded_libraries()


def quiet_loaded_libraries() -> None:
    """The same for libraries already imported (tests import them before the CLI runs)."""
    if _state["verbose"]:
        return
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlog
        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    if "transformers" in sys.modules:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    for handler in logging.getLogger().handlers:   # Prefect's console handler, once Prefect set up logging
        if type(handler).__name__ == "PrefectConsoleHandler":
            handler.setLevel(logging.CRITICAL)


# --------------------------------------------------------------------------- errors
def find_livo_error(exc: BaseException) -> LivoError | None:
    """The LivoError behind `exc` (itself, or its cause/context: Prefect may wrap a task's error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, LivoError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report(exc: BaseException) -> int:
    """Print one line for the exception that ended a command; return the exit code."""
    if _state["signal"] is not None or isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal":
        signum = _state["signal"] or getattr(exc, "signal", None) or signal.SIGINT
        return _interrupted(int(signum))
    livo_error = find_livo_error(exc)
    if livo_error is not None:
        _line(f"livo: error: {livo_error}")
        return 2
    if isinstance(exc, OSError) and exc.errno is not None:
        if _state["verbose"]:
            raise exc
        _line(f"livo: error: {os_error_line(exc)}")
        return 1
    if _state["verbose"]:
        raise exc
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    _line(f"livo: error: unexpected {type(exc).__name__}{': ' + first if first else ''}; "
          "rerun with --verbose for the traceback and please report it")
    return 1


def _line(text: str) -> None:
    print(redact(text), file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- signals
def install_signal_handlers(hint: str = "") -> None:
    """Ctrl-C and SIGTERM end the command with one line (see the module docstring).

    `hint` says how to continue, e.g. "`livo resume runs/x` continues".
    """
    _state["hint"] = hint
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _on_signal)


WATCHDOG_S = 10.0   # after a signal, the longest Prefect may take to record the crash before livo exits anyway


def _on_signal(signum, frame) -> None:
    if _state["signal"] is not None:   # a second Ctrl-C while stopping: stop now
        stop_children(timeout_s=1.0)
        os._exit(128 + signum)
    _state["signal"] = signum
    import threading

    # The exception below lets Prefect mark the run as crashed; this makes sure livo ends even if that hangs.
    threading.Thread(target=_exit_after, args=(signum, WATCHDOG_S), daemon=True).start()
    # Prefect's flow engine raises its own exception for SIGTERM inside a flow; outside one, this does.
    raise KeyboardInterrupt


def _exit_after(signum: int, seconds: float) -> None:
    import time

    time.sleep(seconds)
    _interrupted(signum)


def stop_children(timeout_s: float = 3.0) -> None:
    """Terminate every process this one started (Prefect's ephemeral server, Dask workers), then kill the rest."""
    try:
        import psutil
    except ImportError:
        return
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for c in children:
        try:
            c.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    for c in alive:
        try:
            c.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


_exiting = __import__("threading").Lock()


def _interrupted(signum: int) -> int:
    if not _exiting.acquire(blocking=False):   # the watchdog and the main thread: one line, one exit
        import time

        time.sleep(60)
        os._exit(128 + signum)
    name = signal.Signals(signum).name
    hint = f"; {_state['hint']}" if _state["hint"] else ""
    _line(f"livo: interrupted ({name}){hint}")
    stop_children()
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit now: worker threads may be in the middle of a render, and every finished result is on disk already.
    os._exit(128 + signum)
