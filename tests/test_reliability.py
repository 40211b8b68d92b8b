"""Reliability pieces, one by one: the config-key check, tidying a stage folder a kill left behind, the results
store's one-record-per-run rule (SQLite and PostgreSQL, old stores included), a result that cannot be written
where asked, the loaders' one-line errors for empty or truncated files, and the inert fault points."""
from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest
import sqlalchemy as sa

from curriculum.errors import PlanError


# -- config keys ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize('options, message', [
    ({'lr_serach.trials': 3}, "unknown config key 'lr_serach.trials' (did you mean 'lr_search.trials'?)"),
    ({'monitor.kk': 3}, "unknown config key 'monitor.kk' (did you mean 'monitor.k'?)"),
    ({'evaluation.epochs.finetun': 3},
     "unknown config key 'evaluation.epochs.finetun' (did you mean 'evaluation.epochs.finetune'?)"),
    ({'tasks.odc.no_such_key': 1}, "unknown config key 'tasks.odc.no_such_key' (known under tasks.odc: "),
])
def test_unknown_config_key_names_the_closest_known_one(options, message):
    from curriculum.plan import load_config

    with pytest.raises(PlanError) as raised:
        load_config(None, options)
    assert str(raised.value).startswith(message)


def test_schema_accepts_every_shipped_config_and_the_tasks_own_options():
    from curriculum.plan import CONFIG_DIR, load_config

    for name in sorted(os.listdir(os.path.join(CONFIG_DIR, 'experiments'))):
        load_config(os.path.join(CONFIG_DIR, 'experiments', name))     # with their `study:` section
    # free-form mappings, an option read by the task's code only (swav's yaml has it, moco's code reads it),
    # the engine's per-stage clip_grad
    load_config(None, {'backbone.base_channels': 8, 'dataset_options.anything': 1, 'tasks.moco.color_strength': 0.5,
                       'tasks.rotation.clip_grad': {'max_norm': 1.0}, 'tasks.odc.optimizer.nesterov': True})


# -- a stage folder after a kill --------------------------------------------------------------------------------
def _trusted_file(path, content=b'checkpoint'):
    from curriculum.compat import mark_trusted

    with open(path, 'wb') as handle:
        handle.write(content)
    mark_trusted(path)


def test_tidy_stage_dir_keeps_only_complete_trusted_checkpoints(tmp_path):
    from curriculum.stage import tidy_stage_dir

    stage = tmp_path / 'stage'
    stage.mkdir()
    _trusted_file(stage / 'epoch_1.pth')
    _trusted_file(stage / 'epoch_2.pth')
    (stage / 'epoch_2.pth').write_bytes(b'torn')                  # its sidecar no longer matches
    (stage / 'epoch_3.pth.sha256').write_text('0' * 64)             # the checkpoint it vouched for is gone
    (stage / 'epoch_4.pth').write_bytes(b'no sidecar')
    (stage / 'epoch_5.pth.partial').write_bytes(b'half')
    (stage / 'backbone.pth.123.tmp').write_bytes(b'half')
    (stage / 'history.json').write_text('[]')
    (stage / 'last_checkpoint').write_text('')                      # mmengine writes it in place: torn
    tidy_stage_dir(str(stage))
    assert sorted(os.listdir(stage)) == ['epoch_1.pth', 'epoch_1.pth.sha256', 'history.json', 'last_checkpoint']
    assert (stage / 'last_checkpoint').read_text() == str(stage / 'epoch_1.pth')
    os.remove(stage / 'epoch_1.pth')
    tidy_stage_dir(str(stage))
    assert sorted(os.listdir(stage)) == ['history.json']           # nothing to resume from: start over


def test_a_checkpoint_is_published_with_its_sidecar_first(tmp_path):
    import torch

    from curriculum.compat import atomic_torch_save, is_trusted

    path = str(tmp_path / 'backbone.pth')
    atomic_torch_save({'w': torch.ones(2)}, path)
    assert is_trusted(path) and sorted(os.listdir(tmp_path)) == ['backbone.pth', 'backbone.pth.sha256']


# -- the results store ------------------------------------------------------------------------------------------
def _result(seed=0, **extra):
    return {'order': ['odc', 'moco'], 'dataset': 'synthetic_derm', 'downstream_dataset': 'synthetic_derm',
            'seed': seed, 'label_fraction': 1.0, 'init': None, 'config': {'image_size': 32, 'seed': seed},
            'created': '2026-12-02T10:00:00+00:00', **extra}


def _old_store(url):
    """A store as written before run_key existed, holding the same run twice (the old defect) and another."""
    engine = sa.create_engine(url)
    key = 'SERIAL PRIMARY KEY' if engine.dialect.name == 'postgresql' else 'INTEGER PRIMARY KEY'
    with engine.begin() as connection:
        connection.execute(sa.text(f'CREATE TABLE runs (id {key}, created VARCHAR(32) NOT NULL, '
                                   'ordering VARCHAR(256) NOT NULL, dataset VARCHAR(128) NOT NULL, downstream '
                                   'VARCHAR(128) NOT NULL, seed INTEGER NOT NULL, label_fraction FLOAT NOT NULL, '
                                   'result_json TEXT NOT NULL)'))
        for result in (_result(), _result(), _result(seed=1)):
            connection.execute(sa.text('INSERT INTO runs (created, ordering, dataset, downstream, seed, '
                                       'label_fraction, result_json) VALUES (:c, :o, :d, :d, :s, 1.0, :j)'),
                               dict(c=result['created'], o='odc,moco', d='synthetic_derm', s=result['seed'],
                                    j=json.dumps(result)))
    engine.dispose()


def _check_store(url):
    from curriculum.results import load_runs, store_run

    first, new = store_run(url, _result(seconds=1.0))
    assert new
    again, new = store_run(url, _result(seconds=2.0, created='later'))   # the same run, computed again
    assert (again, new) == (first, False)
    other, new = store_run(url, _result(seed=5))
    assert new and other != first
    # two writers of one run at the same moment: the unique key decides, both get the one id
    ids, errors = [], []

    def write():
        try:
            ids.append(store_run(url, _result(seed=9))[0])
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(ids)) == 1
    assert sorted(r['seed'] for r in load_runs(url)) == [0, 5, 9]


def _migrated(url):
    from curriculum.results import load_runs, store_run

    _old_store(url)
    assert [r['_id'] for r in load_runs(url)] == [1, 2, 3]                # old records kept, duplicates too
    assert store_run(url, _result()) == (1, False)                       # the run's first record holds its key
    assert store_run(url, _result(seed=1)) == (3, False)
    assert store_run(url, _result(seed=2))[1]


def test_results_store_holds_one_record_per_run_sqlite(tmp_path):
    _check_store(f'sqlite:///{tmp_path / "new.db"}')
    _migrated(f'sqlite:///{tmp_path / "old.db"}')


def test_results_store_holds_one_record_per_run_postgresql():
    from postgres_server import available, postgres_server

    reason = available()
    if reason:
        if os.environ.get('REQUIRE_POSTGRES') == '1':
            pytest.fail(f'REQUIRE_POSTGRES=1 but PostgreSQL is unavailable: {reason}')
        pytest.skip(reason)
    with postgres_server() as url:
        _check_store(url)
        engine = sa.create_engine(url)
        with engine.begin() as connection:
            connection.execute(sa.text('DROP TABLE runs'))
        engine.dispose()
        _migrated(url)


# -- a result that cannot be written where asked ------------------------------------------------------------------
def test_result_is_written_beside_a_work_dir_that_cannot_take_it(tmp_path, capsys):
    from curriculum.run import _write_result

    blocked = tmp_path / 'run'
    blocked.write_text('a file where the work dir should be')
    path = _write_result(str(blocked), {'created': 'now', 'value': 1})
    assert path == str(tmp_path / 'run.result.json')
    assert json.loads((tmp_path / 'run.result.json').read_text())['value'] == 1
    assert f'the result is written to {path} instead' in capsys.readouterr().err
    assert _write_result(str(blocked), {'created': 'later'}) == str(tmp_path / 'run.result.1.json')


def test_result_is_kept_when_the_earlier_one_cannot_be_moved_aside(tmp_path, monkeypatch, capsys):
    from curriculum import run as run_module

    work_dir = tmp_path / 'run'
    work_dir.mkdir()
    (work_dir / 'result.json').write_text('{"created": "earlier"}')
    real_replace = os.replace

    def refuse_backup(src, dst):
        if str(src) == str(work_dir / 'result.json'):
            raise PermissionError(13, 'Permission denied')
        return real_replace(src, dst)

    monkeypatch.setattr(run_module.os, 'replace', refuse_backup)
    path = run_module._write_result(str(work_dir), {'created': 'now'})
    assert (work_dir / 'result.json').read_text() == '{"created": "earlier"}'
    assert json.loads(open(path).read()) == {'created': 'now'} and path == str(tmp_path / 'run.result.json')
    assert 'Permission denied' in capsys.readouterr().err


# -- loaders -----------------------------------------------------------------------------------------------------
def test_loaders_name_the_file_of_empty_undecodable_or_truncated_data(tmp_path):
    from benchmarks.datasets import DatasetError, EmptySplitError, load_records
    from benchmarks.datasets.base import read_csv
    from layout_fixtures import write_medmnist

    csv_path = tmp_path / 'labels.csv'
    csv_path.write_text('image,label\n')
    with pytest.raises(EmptySplitError, match='labels.csv: has a header but no data rows'):
        read_csv(str(csv_path), ['image'])
    csv_path.write_bytes(b'image,label\n\xff\xfe\x00bad\n')
    with pytest.raises(DatasetError, match='labels.csv: not a UTF-8 text CSV file'):
        read_csv(str(csv_path), ['image'])
    npz = write_medmnist(str(tmp_path / 'bloodmnist.npz'))
    with open(npz, 'r+b') as handle:        # the central directory survives, a member is cut short
        data = bytearray(handle.read())
        data[200:400] = b'\0' * 200
        handle.seek(0)
        handle.write(data)
    with pytest.raises(DatasetError, match='bloodmnist.npz'):
        load_records('medmnist', npz)
    empty = write_medmnist(str(tmp_path / 'empty' / 'pneumoniamnist.npz'), sizes=(0, 0, 0))
    with pytest.raises(DatasetError, match='holds no images'):
        load_records('medmnist', empty)


def test_multilabel_data_need_two_classes_with_positive_training_labels(tmp_path):
    from benchmarks.datasets import TooFewClassesError, load_dataset
    from layout_fixtures import write_medmnist

    npz = write_medmnist(str(tmp_path / 'chestmnist.npz'), multilabel=14)
    load_dataset('medmnist', npz, image_size=16, cache_dir=str(tmp_path / 'cache')).check_classes()
    arrays = dict(np.load(npz))
    for split in ('train', 'val', 'test'):
        arrays[f'{split}_labels'][:] = 0
        arrays[f'{split}_labels'][:, 3] = 1
    np.savez(npz, **arrays)
    with pytest.raises(TooFewClassesError, match='positive labels for 1 class'):
        load_dataset('medmnist', npz, image_size=16, cache_dir=str(tmp_path / 'cache')).check_classes()


# -- fault points -------------------------------------------------------------------------------------------------
def test_one_class_pretext_labels_turn_the_monitor_off_and_stop_a_knn_scored_search(tmp_path):
    """SSL needs no labels, so one-class pretext data can train; but a kNN monitor on it would score every
    backbone 1.0: it is switched off (auto objective falls back to the pretext score), and an explicitly
    kNN-scored LR search is a plan-time error."""
    from benchmarks.datasets import load_dataset
    from curriculum.monitor import KnnMonitor
    from curriculum.run import build_monitor
    from layout_fixtures import write_image_folder

    def config(objective):
        return {'seed': 0, 'monitor': {'knn': True, 'every': 1, 'max_images': 50, 'k': 5},
                'lr_search': {'trials': 3, 'objective': objective}, 'evaluation': {'label_fraction': 1.0}}

    one = load_dataset('image_folder', write_image_folder(str(tmp_path / 'one'), splits=None, classes=('a',),
                                                          per_class=30, empty_class=None), image_size=16, seed=0)
    two = load_dataset('image_folder', write_image_folder(str(tmp_path / 'two'), splits=None, classes=('a', 'b'),
                                                          per_class=30, empty_class=None), image_size=16, seed=0)
    assert build_monitor(config('auto'), one, 'cpu') == (None, 1)
    with pytest.raises(PlanError, match=r"objective=knn cannot rank .* hold 1 class \['a'\]"):
        build_monitor(config('knn'), one, 'cpu')
    monitor, every = build_monitor(config('knn'), two, 'cpu')
    assert isinstance(monitor, KnnMonitor) and every == 1
    assert set(np.unique(monitor.train_labels)) == {0, 1}


def test_fault_points_are_inert_unless_asked_and_traced_when_asked(tmp_path, monkeypatch):
    from curriculum import faults

    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.delenv(faults.TRACE_ENV, raising=False)
    faults.point('train_iter')                                   # nothing happens
    trace = tmp_path / 'trace.txt'
    monkeypatch.setenv(faults.TRACE_ENV, str(trace))
    monkeypatch.setenv(faults.FAULT_ENV, 'train_iter:1000000')  # far away: not reached here
    faults.point('json_write')
    faults.point('json_write')
    assert [line.split()[0] for line in trace.read_text().splitlines()] == ['json_write', 'json_write']


def test_stage_key_depends_on_the_search_settings_only_when_a_search_runs():
    from curriculum.cache import stage_key

    def key(search):
        return stage_key(None, 'moco', {'lr': 0.03, 'epochs': 5}, search, 0, 'data', 64, {'type': 'ResNet'}, 'cpu')

    assert key({'trials': 0, 'trial_fraction': 0.2}) == key({'trials': 0, 'trial_fraction': 8, 'sampler': 'tpe'})
    assert key({'trials': 3, 'trial_fraction': 0.2}) != key({'trials': 3, 'trial_fraction': 8})
    assert key({'trials': 0}) != key({'trials': 3})
