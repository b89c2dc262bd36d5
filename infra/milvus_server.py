"""A real Milvus server (standalone: every coordinator and node in one process, with embedded etcd,
RocksMQ and local storage), run without Docker from the `milvus` package on PyPI.

That package (2.3.5 is its newest Linux wheel) carries the server binary and its libraries,
LZMA-compressed, plus a config template. It is installed once into its own virtual environment
under the cache (`<cache>/milvus-server/<version>/venv`), apart from ragbus's: only the binary is
used, and ragbus's own pymilvus is the client. The binary and libraries are unpacked once beside
it (`bin/`); each server gets its own data folder (config, logs, etcd, RocksMQ, segments) and ports.

Milvus 2.3 has no BM25 function and no sparse vectors: the chunk store creates a dense-only
collection there and hybrid retrieval falls back to dense search (processors/store.py says so once).

Measured here (2 cores): ready in 2.5-4.5 s; a restart on the same data folder 8-9 s, after a
SIGKILL too (its etcd sessions are taken over, not waited out); `stop()` about 10 s: SIGTERM, and
the config's graceful-stop limit is 10 s instead of the package's 1800 s, during which the nodes
only retry the coordinators that stopped first.

Two servers on one machine: the embedded etcd listens on 2379/2380 whatever the template says, so
each server here gets an etcd config of its own ports (configs/embedEtcd.yaml); the package's own
launcher has none, and its start-up wait loops for 180 s on a server that already died of the
clash (a "second start hangs"). The binary's lock on /run/milvus/standalone.pid does not keep two
servers apart (two ran side by side here).

    python -m infra.milvus_server install        # the venv and the unpacked binary, once (bootstrap)
    python -m infra.milvus_server run DIR PORT   # a server in the foreground until Ctrl+C
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.procs import OwnedProcess, ServiceError, port_in_use, tail
from infra.settings import MilvusSettings

log = logging.getLogger(__name__)

#: The version the settings name (`milvus_server_version`; 2.3.5 is the package's newest Linux wheel).
DEFAULT_VERSION: str = MilvusSettings.model_fields["milvus_server_version"].default
_DONE = ".installed"

#: How long a SIGTERM'd server may take to stop (the package's default is 1800 s: its nodes keep
#: retrying the coordinators that stopped first); `stop()` kills it a little after that.
GRACEFUL_STOP_S = 10

#: The template's port keys besides the proxy's (the one clients use); each gets a free port.
INTERNAL_PORTS = (
    "etcd_port",
    "root_coord_port",
    "proxy_internal_port",
    "query_coord_port",
    "query_node_port",
    "index_coord_port",
    "index_node_port",
    "data_coord_port",
    "data_node_port",
)


def install_dir(cache: Path, version: str) -> Path:
    return cache / "milvus-server" / version


def _base_python() -> str:
    """A Python to create the server's venv with (any Python 3 runs the package's code; only its
    data files are used)."""
    for name in ("python3.11", "python3.12", "python3"):
        found = shutil.which(name)
        if found:
            return found
    return sys.executable


def ensure_installed(cache: Path, version: str = DEFAULT_VERSION) -> Path:
    """The folder of Milvus `version`: `venv/` with the `milvus` package and `bin/` with the
    unpacked server; installed when missing. A file lock makes concurrent callers wait for one
    installation instead of racing."""
    root = install_dir(cache, version)
    if (root / _DONE).exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / _DONE).exists():
            return root
        started = time.monotonic()
        venv = root / "venv"
        log_path = root / "install.log"
        log.info("installing the Milvus %s server into %s", version, root)
        with open(log_path, "w") as out:
            steps = [
                [_base_python(), "-m", "venv", "--clear", str(venv)],
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"milvus=={version}"],
            ]
            for step in steps:
                if subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, check=False).returncode != 0:
                    raise ServiceError(
                        f"installing the Milvus {version} server failed ({' '.join(step[-3:])}):\n"
                        f"{tail(log_path, 10)}\nPyPI must be reachable once; or set RAGBUS_MILVUS_URI "
                        "to a running Milvus server, or leave it empty for Milvus Lite",
                        log_path,
                    )
        _unpack(_package_data(venv), root / "bin")
        (root / _DONE).write_text(version + "\n")
        log.info("Milvus %s server installed in %.0f s", version, time.monotonic() - started)
    return root


def _package_data(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/milvus/data"))
    if not found:
        raise ServiceError(f"the `milvus` package is missing from {venv}; delete {venv.parent} and retry")
    return found[0]


def _unpack(data: Path, bin_dir: Path) -> None:
    """Decompress the server binary and its libraries, and copy the config template."""
    tmp = bin_dir.with_name("bin.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for packed in (data / "bin").glob("*.lzma"):
        target = tmp / packed.name.removesuffix(".lzma")
        with lzma.open(packed) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        target.chmod(0o755)
    shutil.copy(data / "config.yaml.template", tmp / "milvus.yaml.template")
    shutil.copy(data / "glog.conf", tmp / "glog.conf")
    shutil.rmtree(bin_dir, ignore_errors=True)
    tmp.rename(bin_dir)


_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*(?:\((\w+)\))?\s*(?::\s*([^}]*?))?\s*\}\}")


def render_config(template: str, values: dict[str, object]) -> str:
    """Fill the package's config template: `{{ key }}`, `{{ key(type): default }}`; a key without a
    value takes its default; a key with neither is an error (the template changed)."""

    def fill(m: re.Match[str]) -> str:
        key, default = m.group(1), m.group(3)
        value = values.get(key, default)
        if value is None:
            raise ServiceError(f"the Milvus config template needs a value for {key!r}")
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)

    return _PLACEHOLDER.sub(fill, template)


class LocalMilvus(OwnedProcess):
    """One Milvus standalone server on 127.0.0.1 with its data under `root`."""

    #: A SIGTERM releases the etcd sessions (a restart need not wait out their TTL).
    stop_timeout = GRACEFUL_STOP_S + 10

    def __init__(
        self,
        root: Path,
        *,
        cache: Path,
        port: int = 19530,
        metrics_port: int | None = None,
        version: str = DEFAULT_VERSION,
        host: str = "127.0.0.1",
    ) -> None:
        self.root = root
        self.cache = cache
        self.port = port
        self.metrics_port = metrics_port
        self.version = version
        self.host = host
        self.label = f"Milvus {version}"

    # --- layout ----------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.root / "configs" / "milvus.yaml"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def log_path(self) -> Path:
        """The server's own log (each start writes standalone-N.log; this is stdout/stderr)."""
        return self.log_dir / "milvus-stdout.log"

    @property
    def pid_path(self) -> Path:
        return self.root / "milvus.pid"

    @property
    def _metrics_port_path(self) -> Path:
        return self.root / "metrics.port"

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def _ports_path(self) -> Path:
        return self.root / "ports.json"

    def _ports(self) -> dict[str, int]:
        """The internal ports, chosen free once and kept with the data (etcd remembers its peer URL),
        re-chosen only when one of them is taken."""
        from infra.procs import free_port

        with contextlib.suppress(OSError, ValueError):
            kept = {k: int(v) for k, v in json.loads(self._ports_path.read_text()).items()}
            if set(kept) == {*INTERNAL_PORTS, "etcd_peer_port"} and not any(
                port_in_use(p, self.host) for p in kept.values()
            ):
                return kept
        ports = {key: free_port(self.host) for key in (*INTERNAL_PORTS, "etcd_peer_port")}
        self._ports_path.write_text(json.dumps(ports))
        return ports

    def prepare(self) -> Path:
        """Install (once), write this server's config; returns the binary's folder."""
        from infra.procs import free_port

        bin_dir = ensure_installed(self.cache, self.version) / "bin"
        data = self.root / "data"
        for d in (self.root / "configs", self.log_dir, data):
            d.mkdir(parents=True, exist_ok=True)
        if self.metrics_port is None:
            self.metrics_port = free_port(self.host)
        ports = self._ports()
        values: dict[str, object] = {key: ports[key] for key in INTERNAL_PORTS}
        values |= {
            "proxy_port": self.port,
            "etcd_log_path": str(self.log_dir / "etcd.log"),
            "etcd_data_dir": str(data / "etcd.data"),
            "local_storage_dir": str(data),
            "rocksmq_data_dir": str(data / "rocksmq"),
            "system_log_path": str(self.log_dir),
        }
        template = (bin_dir / "milvus.yaml.template").read_text()
        config, found = re.subn(
            r"gracefulStopTimeout: \d+",
            f"gracefulStopTimeout: {GRACEFUL_STOP_S}",
            render_config(template, values),
        )
        if not found:
            raise ServiceError("the Milvus config template has no common.gracefulStopTimeout to set")
        self.config_path.write_text(config)
        shutil.copy(bin_dir / "glog.conf", self.config_path.with_name("glog.conf"))
        # Embedded etcd listens on 2379/2380 unless told otherwise, which keeps a second server
        # on the machine from starting; this gives it this server's own ports.
        client = f"http://{self.host}:{ports['etcd_port']}"
        peer = f"http://{self.host}:{ports['etcd_peer_port']}"
        self.etcd_config_path.write_text(
            f"name: ragbus-milvus\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
            f"initial-cluster: ragbus-milvus={peer}\n"
        )
        return bin_dir

    @property
    def etcd_config_path(self) -> Path:
        return self.root / "configs" / "embedEtcd.yaml"

    def start(self, *, timeout: float = 120.0) -> None:
        if self.running:
            with contextlib.suppress(OSError, ValueError):
                self.metrics_port = int(self._metrics_port_path.read_text())
            self.wait_ready(timeout)
            return
        for port in (self.port, self.metrics_port):
            if port is not None and port_in_use(port, self.host):
                raise ServiceError(
                    f"port {port} on {self.host} is taken by another process; free it or choose another"
                )
        bin_dir = self.prepare()
        env = dict(
            os.environ,
            DEPLOY_MODE="STANDALONE",
            ETCD_CONFIG_PATH=str(self.etcd_config_path),
            METRICS_PORT=str(self.metrics_port),
            LD_LIBRARY_PATH=":".join(p for p in (str(bin_dir), os.environ.get("LD_LIBRARY_PATH")) if p),
        )
        started = time.monotonic()
        # cwd: the binary finds configs/milvus.yaml under its working directory.
        proc = self._spawn([str(bin_dir / "milvus"), "run", "standalone"], env=env, cwd=self.root)
        self._metrics_port_path.write_text(f"{self.metrics_port}\n")
        log.info("milvus starting (pid %d) on %s, logs in %s", proc.pid, self.uri, self.log_dir)
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        log.info("milvus ready on %s in %.1f s", self.uri, time.monotonic() - started)

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until /healthz answers OK and a pymilvus client can list collections."""
        self._wait_until(
            lambda: self._healthy() and self._lists_collections(),
            timeout,
            interval=0.5,
            exited=f"the Milvus server exited during start-up (full logs: {self.log_dir}/standalone-*.log)",
            timed_out=(
                f"the Milvus server did not become ready in {timeout:.0f} s. After a crash its etcd "
                "sessions block a restart for their TTL (30 s): wait and retry, or start it on a fresh "
                f"data folder; its full logs: {self.log_dir}/standalone-*.log"
            ),
        )

    def _healthy(self) -> bool:
        url = f"http://{self.host}:{self.metrics_port}/healthz"
        with urllib.request.urlopen(url, timeout=5) as resp:
            return b"OK" in resp.read()

    def _lists_collections(self) -> bool:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=self.uri, timeout=5)
        try:
            client.list_collections()
            return True
        finally:
            client.close()


def _cache_default() -> Path:
    """The tests' cache (tests/conftest.py), where their `milvus_server` fixture looks."""
    return Path(os.environ.get("RAGBUS_TEST_CACHE") or Path.home() / ".cache" / "ragbus")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m infra.milvus_server", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=_cache_default())
    parser.add_argument("--version", default=DEFAULT_VERSION)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="install the server once into the cache")
    run = sub.add_parser("run", help="run a server in the foreground until interrupted")
    run.add_argument("data_dir", type=Path)
    run.add_argument("port", type=int, nargs="?", default=19530)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "install":
        print(ensure_installed(args.cache, args.version))
        return 0
    server = LocalMilvus(args.data_dir, cache=args.cache, port=args.port, version=args.version)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM stops it like Ctrl+C; SIGINT too when a shell started it in the background (ignored).
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    server.start()
    print(f"Milvus {args.version} on {server.uri}; Ctrl+C stops it", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while server.running:
            time.sleep(1)
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
