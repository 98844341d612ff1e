"""A throwaway PostgreSQL server for tests and benchmarks, and the pytest fixture that starts it.

`TempPostgres` runs ``initdb`` and ``pg_ctl`` (Debian's ``postgresql`` package,
``/usr/lib/postgresql/<v>/bin``; ``make pg`` installs it) in a fresh directory under /tmp and
listens only on a Unix socket in that directory (no TCP port, so no collisions). PostgreSQL
refuses to run as root, so as root the server runs as the unprivileged ``postgres`` user (the
package creates it), and the directory is handed to it. Authentication: the superuser
``editserve`` trusts the socket (only processes on this machine can reach it);
`TempPostgres.add_password_role` adds a role that must log in with a password (SCRAM), to
test DSNs that carry one. Each test gets its own database (`create_database`); a background
thread keeps `spare` empty databases ready, because CREATE DATABASE (copying template1, ~8 MB)
takes 0.5-1 s on this loaded 2-core machine and overlaps well with a test's own work.

Tests run the server with ``fsync=off`` (they kill clients, never the machine, so durability
against power loss is not what they check; it spares the shared disk); `bench/ledger_bench.py`
runs it with PostgreSQL's durable defaults.

Test modules use it with ``from tests._pg import pg_server  # noqa: F401`` (no conftest.py):
one server per test module that asks for it, stopped at the module's end.
"""

from __future__ import annotations

import itertools
import os
import pwd
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN_ENV = "EDITSERVE_PG_BIN"
SUPERUSER = "editserve"


def pg_bin_dir() -> Path:
    """The directory holding initdb/pg_ctl: $EDITSERVE_PG_BIN, else the newest /usr/lib/postgresql/<v>/bin."""
    if os.environ.get(PG_BIN_ENV):
        return Path(os.environ[PG_BIN_ENV])
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise RuntimeError("PostgreSQL server binaries (initdb, pg_ctl) not found: run `make pg` "
                       "(apt-get install postgresql) or set $EDITSERVE_PG_BIN")


class TempPostgres:
    """A PostgreSQL server in a temporary directory, on a Unix socket there; `stop` removes everything."""

    def __init__(self, bin_dir: Path | None = None, fsync: bool = True, spare: int = 0) -> None:
        self.bin = bin_dir or pg_bin_dir()
        self.fsync = fsync
        self.spare = spare
        self._ready: queue.Queue[str | BaseException] = queue.Queue()
        self._wanted = threading.Semaphore(0)
        self._stopping = threading.Event()
        self._filler: threading.Thread | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="es-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.socket_dir = self.dir
        self._names = itertools.count(1)
        self._run_as: list[str] = []
        if os.geteuid() == 0:                      # initdb/postgres refuse root: run as `postgres`
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs the unprivileged `postgres` user to run the server "
                                   "(Debian's postgresql package creates it: `make pg`)") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.dir, 0o755)

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self._run_as, *args], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}): {proc.stdout[-2000:]} "
                               f"{proc.stderr[-2000:]}\n{log}")

    def start(self) -> TempPostgres:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth-local=trust",
                  "--auth-host=reject", "-E", "UTF8", "--locale=C", "--no-instructions", *(
                      [] if self.fsync else ["--no-sync"]))
        (self.data / "pg_hba.conf").write_text(
            f"local all {SUPERUSER} trust\n"
            "local all all scram-sha-256\n")
        self.start_server()
        if self.spare:
            for _ in range(self.spare):
                self._wanted.release()
            self._filler = threading.Thread(target=self._fill, name="pg-spare-databases", daemon=True)
            self._filler.start()
        return self

    def _fill(self) -> None:
        while True:
            self._wanted.acquire()
            if self._stopping.is_set():
                return
            try:
                self._ready.put(self._create())
            except BaseException as exc:      # handed to the test that asks for the database
                self._ready.put(exc)

    def stop(self) -> None:
        self._stopping.set()
        self._wanted.release()
        if self._filler is not None:
            self._filler.join(60)
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        finally:
            # Tens of databases are thousands of files (14 s to unlink on this loaded disk): remove them
            # in a detached process instead of holding up the test session.
            subprocess.run(["sh", "-c", 'rm -rf -- "$0" >/dev/null 2>&1 &', str(self.dir)], check=False)

    def start_server(self) -> None:
        """Start the postmaster on the existing data directory."""
        opts = [f"-k {self.socket_dir}", "-c listen_addresses=''", "-c max_connections=60",
                "-c shared_buffers=32MB", "-c log_min_messages=warning"]
        if not self.fsync:
            opts += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", " ".join(opts), "start")

    def stop_server(self, mode: str = "fast") -> None:
        """Stop the postmaster (its connections are cut), keeping the data for `start_server`."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", timeout=120)

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, password: str | None = None) -> str:
        auth = f"{user}:{password}" if password is not None else user
        return f"postgresql://{auth}@/{dbname}?host={self.socket_dir}"

    def execute(self, sql: str, dbname: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute(sql)

    def _create(self) -> str:
        name = f"ledger_{os.getpid()}_{next(self._names)}_{time.monotonic_ns() % 10**6}"
        self.execute(f'CREATE DATABASE "{name}" OWNER "{SUPERUSER}"')
        return name

    def create_database(self) -> str:
        """A new empty database (a spare one if ready); returns its name."""
        if self._filler is None:
            return self._create()
        got = self._ready.get(timeout=300)
        self._wanted.release()
        if isinstance(got, BaseException):
            raise got
        return got

    def add_password_role(self, role: str, password: str) -> None:
        """A login role that must authenticate with `password` (SCRAM over the socket)."""
        self.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{password}'")


@pytest.fixture(scope="module")
def pg_server() -> Iterator[TempPostgres]:
    """One throwaway PostgreSQL server for the test module."""
    server = TempPostgres(fsync=False, spare=2).start()
    try:
        yield server
    finally:
        server.stop()
