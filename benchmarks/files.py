"""Where the project keeps its cache, and files written so that a reader never sees half of one (the one atomic
JSON writer of the project).

A file is written under a temporary name unique to the writing process, then renamed over its final name
(``os.replace`` is atomic on one file system). JSON is written as the engine has always written ``result.json``:
indented, NaN allowed (a metric that is undefined, e.g. AUC with one class present), numpy scalars as floats.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable


def default_cache_dir() -> str:
    """``$CURRICULUM_SSL_CACHE`` or ``~/.cache/curriculum_ssl``."""
    return os.environ.get('CURRICULUM_SSL_CACHE',
                          os.path.join(os.path.expanduser('~'), '.cache', 'curriculum_ssl'))


def temporary_name(path: str) -> str:
    """A temporary name beside ``path``, unique to this process (concurrent writers never share one)."""
    return f'{os.fspath(path)}.{os.getpid()}.tmp'


def write_json_atomic(path: str, data, before_replace: Callable[[], None] | None = None) -> None:
    """Write ``data`` as JSON to ``path`` atomically; ``before_replace`` runs between the write and the rename
    (the engine's fault-injection point). The temporary file is removed when writing fails."""
    tmp = temporary_name(path)
    try:
        with open(tmp, 'w') as handle:
            json.dump(data, handle, indent=2, default=float)
            handle.write('\n')
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if before_replace is not None:
        before_replace()
    os.replace(tmp, path)
