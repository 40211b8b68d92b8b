"""The results store: one record per finished run, in SQLite by default or any SQLAlchemy URL.

Each record keeps the identifying fields as columns (for queries and the leaderboard) and the whole
``result.json`` as text, so nothing a run reported is lost. The store decides what "one run" is: a unique
``run_key`` (a hash of :func:`run_identity`: ordering, init file, seed and the whole config) lets a second copy of
the same run (two identical runs started together, or a rerun after a kill that struck between the commit and the
end of the process) find the record that is already there instead of adding another. Stores created before this
column existed get it (and its unique index) the first time they are opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import datetime, timezone

import sqlalchemy as sa

from . import faults
from .errors import EngineError

_METADATA = sa.MetaData()
RUNS = sa.Table(
    'runs', _METADATA,
    sa.Column('id', sa.Integer, primary_key=True, autoincrement=True),
    sa.Column('created', sa.String(32), nullable=False),
    sa.Column('ordering', sa.String(256), nullable=False),
    sa.Column('dataset', sa.String(128), nullable=False),
    sa.Column('downstream', sa.String(128), nullable=False),
    sa.Column('seed', sa.Integer, nullable=False),
    sa.Column('label_fraction', sa.Float, nullable=False),
    sa.Column('result_json', sa.Text, nullable=False),
    sa.Column('run_key', sa.String(64), nullable=True),    # NULL only for duplicates kept from older stores
)
RUN_KEY_INDEX = sa.Index('ix_runs_run_key', RUNS.c.run_key, unique=True)


def default_results_url(work_root: str) -> str:
    return f'sqlite:///{os.path.abspath(os.path.join(work_root, "results.db"))}'


def _engine(url: str, attempts: int = 5) -> sa.Engine:
    """Open the store and create its table if missing. Several workers may create it at once: a lost race
    ("already exists", a locked SQLite file) is retried."""
    for attempt in range(attempts):
        try:
            engine = sa.create_engine(url)
            _METADATA.create_all(engine)
            _add_run_key(engine)
            return engine
        except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError) as exc:
            if attempt == attempts - 1:
                raise EngineError(f'cannot open results store {url!r}: {str(exc).splitlines()[0]}') from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # bad URL, missing driver, unreachable server
            raise EngineError(f'cannot open results store {url!r}: {str(exc).splitlines()[0]}') from None
    raise AssertionError('unreachable')


def _add_run_key(engine: sa.Engine) -> None:
    """Give a store made before ``run_key`` existed its column and unique index, in one transaction. Earlier
    records get their key, except repeats of a run already keyed (those stay, with no key)."""
    if 'run_key' in {column['name'] for column in sa.inspect(engine).get_columns('runs')}:
        return
    with engine.begin() as connection:
        connection.execute(sa.text('ALTER TABLE runs ADD COLUMN run_key VARCHAR(64)'))
        seen = set()
        for run_id, text in connection.execute(sa.select(RUNS.c.id, RUNS.c.result_json).order_by(RUNS.c.id)).all():
            try:
                key = run_key(json.loads(text))
            except (ValueError, KeyError, TypeError):
                continue
            if key not in seen:
                seen.add(key)
                connection.execute(RUNS.update().where(RUNS.c.id == run_id).values(run_key=key))
        RUN_KEY_INDEX.create(connection, checkfirst=True)


def run_key(result: dict) -> str:
    """The store's identity of a run: a hash of :func:`run_identity`."""
    return hashlib.sha256(json.dumps(list(run_identity(result))).encode()).hexdigest()


def prepare_store(url: str) -> None:
    """Create the store's table now (before several workers start)."""
    _engine(url).dispose()


def record_run(url: str, result: dict) -> int:
    """Store one run (unless the store holds it already); returns its id."""
    return store_run(url, result)[0]


def store_run(url: str, result: dict, attempts: int = 5) -> tuple[int, bool]:
    """Insert one run; returns ``(id, True)``, or ``(id of the stored copy, False)`` when the store already holds
    this run (same :func:`run_key`; the unique index decides between concurrent writers)."""
    key = run_key(result)
    row = dict(created=result.get('created') or datetime.now(timezone.utc).isoformat(timespec='seconds'),
               ordering=','.join(result['order']) or 'none', dataset=result['dataset'],
               downstream=result.get('downstream_dataset', result['dataset']), seed=int(result['seed']),
               label_fraction=float(result.get('label_fraction', 1.0)),
               result_json=json.dumps(result, default=float), run_key=key)
    engine = _engine(url)
    try:
        for attempt in range(attempts):
            try:
                with engine.begin() as connection:
                    new_id = connection.execute(RUNS.insert().values(**row)).inserted_primary_key[0]
                    faults.point('results_write')
                return int(new_id), True
            except sa.exc.IntegrityError:
                with engine.connect() as connection:
                    held = connection.execute(sa.select(RUNS.c.id).where(RUNS.c.run_key == key)).scalar()
                if held is not None:
                    return int(held), False
                raise EngineError(f'results store {url!r} refused the record of this run') from None
            except sa.exc.OperationalError as exc:  # e.g. SQLite "database is locked" under concurrent writers
                if attempt == attempts - 1:
                    raise EngineError(f'cannot write to results store {url!r}: {str(exc).splitlines()[0]}') \
                        from None
                time.sleep(0.2 * (attempt + 1))
    finally:
        engine.dispose()
    raise AssertionError('unreachable')


def load_runs(url: str) -> list[dict]:
    """Every stored run's result dict (with its store id under ``_id``), oldest first. ``url`` may also be the
    path of a compact JSON Lines export (see :func:`export_runs`), read-only."""
    if is_jsonl(url):
        return read_jsonl(url)
    engine = _engine(url)
    with engine.connect() as connection:
        rows = connection.execute(sa.select(RUNS.c.id, RUNS.c.result_json).order_by(RUNS.c.id)).all()
    engine.dispose()
    out = []
    for run_id, text in rows:
        result = json.loads(text)
        result['_id'] = int(run_id)
        out.append(result)
    return out


def update_run(url: str, run_id: int, result: dict) -> None:
    """Replace the stored result of run ``run_id`` (e.g. after an attention analysis added its score)."""
    engine = _engine(url)
    with engine.begin() as connection:
        connection.execute(RUNS.update().where(RUNS.c.id == int(run_id))
                           .values(result_json=json.dumps(result, default=float)))
    engine.dispose()


# --- compact JSON Lines exports: the results of a study kept in the repository (no checkpoints, no local paths) ---
#: machine-specific fields left out of an export (absolute paths, store ids, storage URLs)
LOCAL_FIELDS = ('_id', 'results_id', 'work_root', 'optuna_storage', 'results_url')
LOCAL_STAGE_FIELDS = ('stage_dir',)


def is_jsonl(url: str) -> bool:
    return str(url).endswith('.jsonl') and '://' not in str(url)


def compact(result: dict) -> dict:
    """A result without machine-specific fields (what a JSON Lines export keeps of each run)."""
    out = {k: v for k, v in result.items() if k not in LOCAL_FIELDS}
    out['stages'] = [{k: v for k, v in stage.items() if k not in LOCAL_STAGE_FIELDS}
                     for stage in result.get('stages', [])]
    return out


def json_lines(path: str):
    """``(line number, value)`` for every non-blank line of a JSON Lines file; a line that is not JSON is one
    EngineError naming the file and line."""
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except ValueError:
                raise EngineError(f'{path}: line {number} is not JSON') from None


def read_jsonl(path: str) -> list[dict]:
    """The runs of a JSON Lines export, in file order (``_id`` = line number)."""
    if not os.path.isfile(path):
        raise EngineError(f'results file not found: {path}')
    out = []
    for number, result in json_lines(path):
        if not isinstance(result, dict) or 'order' not in result or 'seed' not in result:
            raise EngineError(f'{path}: line {number} is not a run result (needs "order" and "seed")')
        result['_id'] = number
        out.append(result)
    return out


def run_identity(result: dict) -> tuple:
    """What makes two stored runs the same run: ordering, init file name, seed and the whole config."""
    init = os.path.basename(result['init']) if result.get('init') else None
    return (tuple(result['order']), init, int(result['seed']),
            json.dumps(result.get('config') or {}, sort_keys=True, default=str))


def export_runs(results: list[dict], path: str) -> int:
    """Write ``results`` (compacted, one JSON object a line, sorted, the latest of repeated runs) atomically to
    ``path``; returns the number of runs written."""
    latest = {}
    for result in results:
        latest[run_identity(result)] = compact(result)
    rows = [latest[key] for key in sorted(latest, key=lambda k: (k[3], k[0], str(k[1]), k[2]))]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as handle:
        for row in rows:
            handle.write(json.dumps(row, sort_keys=True, default=float) + '\n')
    os.replace(tmp, path)
    return len(rows)


def import_runs(url: str, results: list[dict]) -> int:
    """Add to the store every run of ``results`` it does not hold yet (by :func:`run_identity`); returns the
    number added. Lets a study continue on another machine from its exported results."""
    held = {run_identity(r) for r in load_runs(url)}
    added = 0
    for result in results:
        if run_identity(result) not in held:
            record_run(url, {k: v for k, v in result.items() if k != '_id'})
            held.add(run_identity(result))
            added += 1
    return added
