"""Small helpers for the local services: free ports, port checks, pid files, stopping processes,
and `OwnedProcess`, what every process `ragbus` starts and leaves running has in common."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def terminate(pid: int, timeout: float = 30.0, sig: int = signal.SIGTERM) -> bool:
    """Send `sig`, wait up to `timeout` s, then SIGKILL. True when the process had to be killed."""
    if not pid_alive(pid):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


def tail(path: Path, lines: int = 20) -> str:
    try:
        data = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(data[-lines:])


class ServiceError(RuntimeError):
    """A local service could not be started or reached; the message names the log to read."""

    def __init__(self, message: str, log: Path | None = None) -> None:
        self.log = log
        super().__init__(f"{message} (log: {log})" if log else message)


class OwnedProcess:
    """A process ragbus starts and leaves running (a broker, a Milvus server, a component): it
    outlives the command that started it, so its pid goes to a file that later commands read; it
    appends to one log; it runs in a session of its own, so a terminal's Ctrl+C does not reach it.

    Subclasses name it (`label`) and place it (`pid_path`, `log_path`); `stop_group` stops the
    whole session (a component's own children, e.g. an engine) instead of the one process;
    `stop_timeout` is how long a stop waits for a graceful exit before SIGKILL.
    """

    label: str
    pid_path: Path
    log_path: Path
    stop_group: bool = False
    stop_timeout: float = 60.0
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        pid = read_pid(self.pid_path)
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def _spawn(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` with its output appended to the log after a dated banner, and record its pid."""
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            out.write(f"\n--- ragbus: starting {self.label} at {time.ctime()} ---\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                list(argv),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                start_new_session=True,
            )
        self.pid_path.write_text(f"{self._proc.pid}\n")
        return self._proc

    def _wait_until(
        self,
        ready: Callable[[], bool],
        timeout: float,
        *,
        interval: float,
        exited: str,
        timed_out: str,
    ) -> None:
        """Poll `ready` (an exception counts as not yet) until it answers True; ServiceError with the
        log's tail when the process exits first, or with `timed_out` and the last failure after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        last: object = "no answer yet"
        while time.monotonic() < deadline:
            if not self.running:
                raise ServiceError(f"{exited}:\n{tail(self.log_path, 15)}", self.log_path)
            try:
                if ready():
                    return
            except Exception as e:  # noqa: BLE001 - any failure is an answer here
                last = e
            time.sleep(interval)
        raise ServiceError(f"{timed_out} ({last})", self.log_path)

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (to the whole session with `stop_group`), SIGKILL after `timeout` (default
        `stop_timeout`) seconds."""
        timeout = self.stop_timeout if timeout is None else timeout
        pid = self.pid
        if pid is not None:
            if self.stop_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
            if terminate(pid, timeout):
                log.warning("%s (pid %d) did not stop in %.0f s and was killed", self.label, pid, timeout)
                if self.stop_group:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
        self._reap()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        pid = self.pid
        if pid is not None:
            terminate(pid, timeout=0, sig=signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=10)
            self._proc = None
        self.pid_path.unlink(missing_ok=True)
