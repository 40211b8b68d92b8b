"""Content digests of data files, remembered per machine so that a second pass costs one ``stat`` per file.

A dataset's fingerprint is part of every decoded-image and stage cache key, so it must change when any byte of
the data changes, and only then. An identity made of path, size and modification time broke every cache whenever
the same files came back with new timestamps or at another place: ``../shared/data`` is re-provisioned with fresh
mtimes each session, and a study resumed there retrained every stage it already had. Keys therefore hash the
contents. Each file's digest is remembered in a small SQLite table (in the decoded-image cache folder) under its
absolute path, and reused while size, mtime and inode are unchanged; a touched or copied file is read and hashed
again, and gives the same digest when its bytes are the same.

Written here because neither the standard library nor the required packages offer a persistent digest memo;
the memo is only a speed-up, so any SQLite failure (read-only folder, locked database) falls back to hashing.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..files import default_cache_dir

MEMO_FILE = 'file_digests.sqlite'
#: paths per memo query: well under SQLite's limit on bound parameters (999 in builds before 3.32)
QUERY_CHUNK = 500

#: files this process read and hashed (not answered from the memo); tests use it to show a second pass reads none
hashed_files = 0


def _digest_of_file(path: str) -> str:
    with open(path, 'rb') as handle:
        return hashlib.file_digest(handle, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _memo_path(memo_dir: str | None) -> str:
    if memo_dir is None:
        memo_dir = default_cache_dir()
    return os.path.join(memo_dir, MEMO_FILE)


def _connect(path: str) -> sqlite3.Connection | None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        connection = sqlite3.connect(path, timeout=60)
        connection.execute('CREATE TABLE IF NOT EXISTS digests (path TEXT PRIMARY KEY, size INTEGER, '
                           'mtime_ns INTEGER, inode INTEGER, digest TEXT)')
        return connection
    except (OSError, sqlite3.Error):
        return None


def content_digests(paths: Sequence[str], memo_dir: str | None = None, threads: int | None = None) -> list[str]:
    """One content digest per path, in order. Raises :class:`FileNotFoundError` (with ``filename`` set) for a
    missing file. Unchanged files (same absolute path, size, mtime and inode as when last hashed) are not read."""
    global hashed_files
    stats = [os.stat(path) for path in paths]  # FileNotFoundError names the path as the caller gave it
    absolute = [os.path.abspath(p) for p in paths]
    identity = [(s.st_size, s.st_mtime_ns, s.st_ino) for s in stats]
    connection = _connect(_memo_path(memo_dir))
    known: dict[str, tuple] = {}
    if connection is not None:
        try:
            unique = sorted(set(absolute))
            for start in range(0, len(unique), QUERY_CHUNK):  # only these paths, not the whole memo
                chunk = unique[start:start + QUERY_CHUNK]
                rows = connection.execute(f'SELECT * FROM digests WHERE path IN ({",".join("?" * len(chunk))})',
                                          chunk)
                for path, size, mtime_ns, inode, digest in rows:
                    known[path] = ((size, mtime_ns, inode), digest)
        except sqlite3.Error:
            known = {}
    digests: list[str | None] = []
    stale = []
    for index, (path, ident) in enumerate(zip(absolute, identity)):
        entry = known.get(path)
        if entry is not None and entry[0] == ident:
            digests.append(entry[1])
        else:
            digests.append(None)
            stale.append(index)
    if stale:
        with ThreadPoolExecutor(threads or min(4, os.cpu_count() or 1)) as pool:  # hashlib releases the GIL
            fresh = list(pool.map(_digest_of_file, [absolute[i] for i in stale]))
        hashed_files += len(stale)
        for index, digest in zip(stale, fresh):
            digests[index] = digest
        if connection is not None:
            try:
                with connection:
                    connection.executemany('INSERT OR REPLACE INTO digests VALUES (?, ?, ?, ?, ?)',
                                           [(absolute[i], *identity[i], digests[i]) for i in stale])
            except sqlite3.Error:
                pass  # the memo is a speed-up only
    if connection is not None:
        connection.close()
    return digests  # type: ignore[return-value]
