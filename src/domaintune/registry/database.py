"""Where the registry lives (SQLite by default, PostgreSQL by URL), its migrations, and the one
rule that keeps concurrent writers safe: every write runs in a transaction that holds the
registry's write lock from its first statement (SQLite ``BEGIN IMMEDIATE``; PostgreSQL a
transaction-scoped advisory lock)."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

from domaintune.catalog import home
from domaintune.registry.errors import RegistryError

MIGRATIONS = Path(__file__).with_name("migrations")
# An arbitrary constant naming "the registry's write lock" among PostgreSQL advisory locks.
PG_LOCK_KEY = 0x646F6D61696E  # "domain"
SQLITE_BUSY_TIMEOUT_S = 60


def registry_url(url: str | None = None) -> str:
    """``url``, else ``$DOMAINTUNE_REGISTRY_URL``, else ``sqlite:///$DOMAINTUNE_HOME/registry.db``.
    A bare ``postgresql://`` URL gets the psycopg (version 3) driver."""
    url = url or os.environ.get("DOMAINTUNE_REGISTRY_URL") or f"sqlite:///{home() / 'registry.db'}"
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RegistryError(f"not a database URL: {url!r}",
                            hint="use sqlite:///path/registry.db or postgresql://user@host/db") from exc
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


class Database:
    """An engine on the registry database, migrated to the newest schema on open."""

    def __init__(self, url: str | None = None):
        self.url = registry_url(url)
        self.engine = _engine(self.url)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        try:
            self._migrate()
        except OperationalError as exc:
            self.engine.dispose()
            raise RegistryError(f"cannot open the registry at {self.engine.url!r}: {exc.orig}",
                                hint="check --registry-url / DOMAINTUNE_REGISTRY_URL and that the server is up") from exc

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A session for reads, in a transaction of its own that takes no write lock."""
        with Session(self.engine) as session, session.begin():
            yield session

    @contextmanager
    def writing(self) -> Iterator[Session]:
        """A session holding the write lock until it commits (or rolls back on an exception)."""
        with self._locked() as conn, Session(bind=conn) as session:
            yield session
            session.flush()

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        with self.engine.connect().execution_options(registry_write=True) as conn, conn.begin():
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
            yield conn

    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        # Under the write lock: processes opening a new registry at once create it once.
        with self._locked() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "head")


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        _sqlite_transactions(engine)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        raise RegistryError(f"no database driver for {parsed.drivername}: {exc}",
                            hint="pip install 'domaintune[postgres]' (psycopg) for a PostgreSQL registry") from exc


def _set_wal(cursor) -> None:
    """WAL journal, so that readers do not wait for the writer. Switching a new database to WAL
    takes an exclusive lock, and SQLite answers "database is locked" at once, without its busy
    timeout, when another process holds one (processes creating one registry together): retry."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _sqlite_transactions(engine: Engine) -> None:
    """Let SQLAlchemy, not Python's sqlite3 module, say when a transaction begins, so that writers
    can take the write lock up front (BEGIN IMMEDIATE) and wait for it instead of failing later."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        _set_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("registry_write") else "BEGIN")
