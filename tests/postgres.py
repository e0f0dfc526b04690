"""A throwaway PostgreSQL server for the registry tests, and ``database_url``: a fresh registry
database per test, on SQLite and on PostgreSQL.

The server runs from the installed server binaries (PATH, or Debian's /usr/lib/postgresql/*/bin;
``.ci/postgres-setup`` installs them), in a temporary directory, listening only on a Unix socket
in that directory, so it cannot collide with another server. initdb refuses to run as root, so
as root the server runs as the ``postgres`` user. Without binaries the PostgreSQL tests are
skipped with the reason, or fail when ``DOMAINTUNE_REQUIRE_POSTGRES=1`` (for CI).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PORT = 5432  # names the socket file only: there is no TCP listener
SUPERUSER = "postgres"


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl, or None."""
    on_path = [shutil.which(tool) for tool in ("initdb", "pg_ctl")]
    if all(on_path):
        return Path(on_path[0]).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name.split(".")[0]))
    found = [Path(p) for p in debian if (Path(p) / "initdb").is_file() and (Path(p) / "pg_ctl").is_file()]
    return found[-1] if found else None


class PostgresServer:
    """A server started with ``initdb`` + ``pg_ctl start``; ``create_database`` gives a URL."""

    def __init__(self, bindir: Path):
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="domaintune-pg-"))
        self.data = self.root / "data"
        self.user = pwd.getpwnam(SUPERUSER) if os.geteuid() == 0 else None
        if self.user:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._names = itertools.count(1)

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
        options = (f"-k {self.root} -p {PORT} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
                   "-c full_page_writes=off -c max_connections=50 -c shared_buffers=16MB")
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A new empty database, as a SQLAlchemy URL."""
        import psycopg

        name = f"registry_{next(self._names)}"
        with psycopg.connect(host=str(self.root), port=PORT, user=SUPERUSER, dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://{SUPERUSER}@/{name}?host={self.root}&port={PORT}"

    def _run(self, tool: str, *args: str) -> None:
        user = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []} if self.user else {}
        done = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True, cwd=self.root, **user)
        if done.returncode != 0:
            log = self.root / "server.log"
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n"
                               + (log.read_text() if log.is_file() else ""))


def _unavailable(reason: str) -> None:
    if os.environ.get("DOMAINTUNE_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL is required here (DOMAINTUNE_REQUIRE_POSTGRES) but {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bindir = server_binaries()
    if bindir is None:
        _unavailable("no server binaries (initdb, pg_ctl) found; run .ci/postgres-setup to install Debian's postgresql")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _unavailable("the psycopg driver is not installed (pip install 'domaintune[postgres]')")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            _unavailable(f"running as root and there is no {SUPERUSER!r} user to run the server as")
    server = PostgresServer(bindir)
    try:
        server.start()
    except BaseException:
        shutil.rmtree(server.root, ignore_errors=True)
        raise
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    """A URL of an empty registry database: a SQLite file, or a new database on the test server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("postgres_server").create_database()
