"""A throw-away PostgreSQL server on loopback for tests (Debian's postgresql package; started as the 'postgres'
user because the server refuses to run as root)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def available() -> str | None:
    """None when a server can be started here, else the reason."""
    for tool in ('initdb', 'pg_ctl'):
        if shutil.which(tool) is None:
            return f'{tool} not found (apt-get install postgresql)'
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return 'psycopg not installed (pip install -e ".[test]")'
    return None


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ['runuser', '-u', 'postgres', '--', *args]
    return args


@contextmanager
def postgres_server():
    """Yield a SQLAlchemy URL of a fresh database on 127.0.0.1; the server is stopped and removed afterwards."""
    folder = tempfile.mkdtemp(prefix='pg-test-')
    data = os.path.join(folder, 'data')
    if os.geteuid() == 0:
        shutil.chown(folder, user='postgres')
    port = _free_port()
    subprocess.run(_as_postgres(['initdb', '-D', data, '-U', 'postgres', '--auth=trust', '-E', 'UTF8']),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres(['pg_ctl', '-D', data, '-l', os.path.join(folder, 'log'), '-w', '-o',
                                 f'-p {port} -k {folder} -c listen_addresses=127.0.0.1', 'start']),
                   check=True, capture_output=True)
    try:
        url = f'postgresql+psycopg://postgres@127.0.0.1:{port}/postgres'
        deadline = time.time() + 30
        import psycopg
        while True:
            try:
                psycopg.connect(f'host=127.0.0.1 port={port} user=postgres dbname=postgres').close()
                break
            except psycopg.OperationalError:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)
        yield url
    finally:
        subprocess.run(_as_postgres(['pg_ctl', '-D', data, '-m', 'immediate', 'stop']), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)
