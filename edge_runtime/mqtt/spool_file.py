"""The spool's sqlite file: create it safely, set it up, recognise and set aside a corrupt one.

Everything here works on a path or a connection and holds no state;
:class:`edge_runtime.mqtt.spool.Spool` owns the queue logic,
:class:`edge_runtime.mqtt.spool_books.SpoolBooks` the counters.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from edge_runtime._util.fsutil import CLOEXEC, NOFOLLOW
from edge_runtime.errors import EdgeRuntimeError

__all__ = ["connect", "identity", "is_corrupt", "move_aside", "prepare", "rescue", "salvage", "set_last_seq",
           "transaction"]

SCHEMA = 1
KEEP_CORRUPT = 2  # moved-aside copies kept for a post-mortem; older ones are deleted
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26
_SUFFIXES = ("", "-wal", "-shm")

_DDL = """
CREATE TABLE IF NOT EXISTS messages(
    seq INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, qos INTEGER NOT NULL,
    payload BLOB NOT NULL, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS dropped_ranges(first INTEGER PRIMARY KEY, last INTEGER NOT NULL);
INSERT OR IGNORE INTO meta(key, value) VALUES ('dropped', 0);
"""


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back when the body raises."""
    conn.execute("BEGIN IMMEDIATE")  # take the write lock up front: no upgrade deadlock
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def is_corrupt(error: sqlite3.DatabaseError) -> bool:
    """True when sqlite says the file is damaged or not a database (as opposed to full, locked, ...)."""
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(error).lower()
    return "malformed" in text or "not a database" in text


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` (created 0600, never through a symlink) in autocommit mode.

    Raises EdgeRuntimeError: the file cannot be created or opened.
    """
    try:
        # Create it ourselves: 0600 and never through a symlink (sqlite gives -wal/-shm the same mode).
        fd = os.open(path, os.O_RDWR | os.O_CREAT | NOFOLLOW | CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as e:
        raise EdgeRuntimeError(f"spool {path}: {e.strerror or e}") from e
    return sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)


def prepare(conn: sqlite3.Connection, path: Path, synchronous: str) -> str | None:
    """Set WAL, ``synchronous`` and the schema; return why the file is unusable, or None.

    Raises:
        EdgeRuntimeError: WAL mode cannot be enabled.
        sqlite3.DatabaseError: from sqlite (the caller tells corruption apart with :func:`is_corrupt`).
    """
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version not in (0, SCHEMA):
        return f"unknown spool schema {version}"
    if version == 0:
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on an empty file
    if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
        raise EdgeRuntimeError(f"spool {path}: cannot enable WAL mode")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA journal_size_limit = 4194304")
    result = [r[0] for r in conn.execute("PRAGMA quick_check(1)").fetchall()]
    if result != ["ok"]:
        return "quick_check: " + "; ".join(map(str, result))
    conn.executescript(f"BEGIN; {_DDL} PRAGMA user_version = {SCHEMA}; COMMIT;")
    return None


def salvage(conn: sqlite3.Connection | None) -> tuple[int, int, tuple[int, int] | None]:
    """Best effort on a corrupt file: (its dropped counter, how many messages it held, their seq range).

    Each figure is 0 / None when it cannot be read; never raises.
    """
    if conn is None:
        return 0, 0, None
    dropped, count, span = 0, 0, None
    with contextlib.suppress(sqlite3.Error, TypeError):
        dropped = int(conn.execute("SELECT value FROM meta WHERE key = 'dropped'").fetchone()[0])
    with contextlib.suppress(sqlite3.Error, TypeError):
        # MIN/MAX walk only the b-tree's edges, so they often work where COUNT(*) fails.
        lo = conn.execute("SELECT MIN(seq) FROM messages").fetchone()[0]
        hi = conn.execute("SELECT MAX(seq) FROM messages").fetchone()[0]
        span = None if lo is None else (int(lo), int(hi))
    try:
        count = int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
    except (sqlite3.Error, TypeError):
        count = 0 if span is None else span[1] - span[0] + 1  # at most that many
    return dropped, count, span


def move_aside(path: Path) -> Path:
    """Rename ``path`` (and its -wal/-shm) to ``<name>.corrupt-<unix time>``; keep the newest few such copies.

    Returns the new path. Raises EdgeRuntimeError: the rename failed.
    """
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        for suffix in _SUFFIXES:
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
    except OSError as e:
        raise EdgeRuntimeError(f"spool {path}: cannot move a corrupt database aside: {e}") from e
    old = sorted(path.parent.glob(f"{path.name}.corrupt-*[0-9]"))
    for stale in old[:-KEEP_CORRUPT]:
        for suffix in _SUFFIXES:
            with contextlib.suppress(OSError):
                Path(f"{stale}{suffix}").unlink()
    return aside


def set_last_seq(conn: sqlite3.Connection, seq: int) -> None:
    """Make ``seq`` the highest seq ever assigned, so the next insert gets ``seq + 1``."""
    # AUTOINCREMENT remembers the largest seq ever inserted, even once its row is gone.
    conn.execute("INSERT INTO messages(seq, topic, qos, payload, size) VALUES (?, '', 0, x'', 0)", (seq,))
    conn.execute("DELETE FROM messages WHERE seq = ?", (seq,))


def identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path`` itself (a symlink is not followed), or None when it is gone."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def rescue(conn: sqlite3.Connection, path: Path) -> None:
    """Copy the database open on ``conn`` into a new file at ``path``, then close ``conn``.

    For a spool file deleted or replaced while open: the connection still reads
    the old inode, so its messages can be saved. A file now at ``path`` is moved
    aside first. Raises sqlite3.Error or EdgeRuntimeError: the copy failed
    (``conn`` may be closed by then: recreate the database).
    """
    tmp = path.with_name(f".{path.name}.rescue")
    for suffix in _SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{tmp}{suffix}").unlink()
    dst = connect(tmp)
    try:
        conn.backup(dst)
    finally:
        dst.close()
    if identity(path) is not None:
        move_aside(path)
    conn.close()
    # Closing a WAL connection may leave or remove "<path>-wal" by name; none of it belongs to the copy,
    # and a stale WAL next to the new file would be replayed into it.
    for suffix in _SUFFIXES[1:]:
        with contextlib.suppress(FileNotFoundError):
            Path(f"{path}{suffix}").unlink()
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise EdgeRuntimeError(f"spool {path}: cannot put the rescued copy in place: {e.strerror or e}") from e
