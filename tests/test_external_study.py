"""``tools/study.py external``: sweep folders per label fraction, the cells chosen on val scored on another dataset
(a tiny real study on the built-in data, an ISIC-2019 fixture), skipped seeds, re-runs that replace records instead
of adding them, the report section, and the command's one-line errors."""
from __future__ import annotations

import json
import os
import random
import shutil

import pytest

import layout_fixtures as fx
from curriculum.external_study import external_section, locate, merge_records, plan_targets, records_path
from curriculum.leaderboard import sweep_work_dir
from curriculum.results import export_runs, read_jsonl
from tool_loader import load_tool

ORDERS = ['rotation', 'relloc', 'rotation,relloc']
#: the seeds run at each label fraction (one at 0.5 keeps the test short)
FRACTION_SEEDS = {1.0: [0, 1], 0.5: [0]}
#: the best single task on val, made to differ from the best on test (the exported val / test scores are edited)
VAL_BEST_SINGLE = {1.0: 'relloc', 0.5: 'rotation'}
EXPERIMENT = """
dataset: synthetic_derm
dataset_options: {num_images: 240}
image_size: 32
device: cpu
amp: none
backbone: {type: ResNet, depth: 18, out_indices: [3], base_channels: 16, stem_channels: 16}
lr_search: {trials: 0}
monitor: {knn: false}
evaluation:
  protocols: [finetune]
  finetune: {steps: 4, eval_every: 2}
tasks:
  rotation: {epochs: 1, batch_size: 32}
  relloc: {epochs: 1, batch_size: 32}
study:
  name: tiny
  orders: [rotation, relloc, 'rotation,relloc']
  seeds: [0, 1]
  label_fractions: [1.0, 0.5]
  baselines: [none]
"""


def test_sweep_work_dir_keeps_the_full_label_folder_and_separates_fractions():
    assert sweep_work_dir('W', 'odc,moco', 2, 1.0) == os.path.join('W', 'sweeps', 'odc,moco', 'seed2')
    assert sweep_work_dir('W', 'none', 0, 1) == os.path.join('W', 'sweeps', 'none', 'seed0')
    assert sweep_work_dir('W', 'none', 0) == os.path.join('W', 'sweeps', 'none', 'seed0')
    assert sweep_work_dir('W', 'odc', 1, 0.1) == os.path.join('W', 'sweeps', 'odc', 'seed1-labels0.1')
    assert sweep_work_dir('W', 'odc', 1, 0.01) == os.path.join('W', 'sweeps', 'odc', 'seed1-labels0.01')


def _edit_scores(path: str) -> None:
    """Make the val-chosen best single task the worse one on test, at each fraction."""
    runs = read_jsonl(path)
    for run in runs:
        label = ','.join(run['order']) or 'none'
        metrics = run['downstream']['finetune']
        if len(run['order']) == 1:
            best = VAL_BEST_SINGLE[float(run['label_fraction'])] == label
            metrics['val']['balanced_accuracy'] = 0.9 if best else 0.5
            metrics['balanced_accuracy'] = 0.1 if best else 0.6
    export_runs(runs, path)


@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """The tiny study run as ``tools/study.py run`` runs it (tools/leaderboard.py per label fraction, in this
    process), its runs exported, and an ISIC-2019 fixture with four UNK images (no counterpart in the run)."""
    base = tmp_path_factory.mktemp('external')
    experiment = base / 'tiny.yaml'
    experiment.write_text(EXPERIMENT)
    work_root, results = base / 'work', base / 'results'
    for fraction, seeds in FRACTION_SEEDS.items():
        code = load_tool('leaderboard').main([
            '--config', str(experiment), '--orders', *ORDERS, '--seeds', ','.join(map(str, seeds)),
            '--baselines', 'none', '--label-fraction', f'{fraction:g}', '--work-root', str(work_root),
            '--out', str(base / 'boards' / f'{fraction:g}'), '--quiet'])
        assert code == 0
    assert load_tool('study').main(['export', str(experiment), '--work-root', str(work_root),
                                    '--results-dir', str(results)]) == 0
    _edit_scores(str(results / 'tiny.jsonl'))
    root = fx.write_isic2019(str(base / 'isic'), count=24)
    path = os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv')
    rows = fx.read_rows(path)
    for i in (5, 11, 17, 23):
        rows[i].update({name: '1.0' if name == 'UNK' else '0.0' for name in fx.ISIC_CLASSES})
    fx.write_csv(path, list(rows[0]), [list(row.values()) for row in rows])
    return {'experiment': str(experiment), 'work_root': str(work_root), 'results': str(results), 'root': root}


def external(study, *flags) -> int:
    return load_tool('study').main(['external', study['experiment'], '--dataset', 'isic2019', '--data-root',
                                    study['root'], '--work-root', study['work_root'], '--results-dir',
                                    study['results'], '--device', 'cpu', *flags])


def _without_dates(path: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != 'created'} for line in open(path)]


@pytest.mark.xdist_group('external_study_run')
def test_sweep_folders_hold_each_fraction_apart(study):
    for fraction, seeds in FRACTION_SEEDS.items():
        for label in ORDERS + ['none']:
            for seed in seeds:
                work_dir = sweep_work_dir(study['work_root'], label, seed, fraction)
                result = json.loads(open(os.path.join(work_dir, 'result.json')).read())
                assert (result['label_fraction'], result['seed'], ','.join(result['order']) or 'none') == \
                    (fraction, seed, label)
                assert os.path.isfile(os.path.join(work_dir, 'finetuned.pth'))


@pytest.mark.xdist_group('external_study_run')
def test_external_scores_the_val_chosen_cells_skips_and_replaces(study, capsys):
    path = records_path(study['results'], 'tiny', 'isic2019')
    hidden = sweep_work_dir(study['work_root'], 'rotation,relloc', 0, 0.5)
    os.rename(os.path.join(hidden, 'finetuned.pth'), os.path.join(hidden, 'finetuned.hidden'))

    assert external(study) == 0
    out = capsys.readouterr().out
    assert f'label fraction 0.5, best_multi rotation,relloc, seed 0: skipped: no finetuned.pth in {hidden}' in out
    assert 'tiny on isic2019: 8 run(s) scored, 1 skipped' in out
    records = [json.loads(line) for line in open(path)]
    keys = [(r['label_fraction'], r['role'], r['ordering'], r['seed']) for r in records]
    expected = [(f, role, ordering, seed) for f, seeds in FRACTION_SEEDS.items()
                for role, ordering in (('scratch', 'none'), ('best_single', VAL_BEST_SINGLE[f]),
                                       ('best_multi', 'rotation,relloc')) for seed in seeds]
    assert keys == expected                               # chosen on val, in the file's sorted order
    skipped = [r for r in records if 'skipped' in r]
    assert len(skipped) == 1 and skipped[0]['label_fraction'] == 0.5 and skipped[0]['role'] == 'best_multi'
    for record in records:
        assert record['study'] == 'tiny' and record['dataset'] == 'isic2019' and record['data_root'] == 'isic'
        if 'skipped' in record:
            continue
        work_dir = sweep_work_dir(study['work_root'], record['ordering'], record['seed'], record['label_fraction'])
        report = json.loads(open(os.path.join(work_dir, 'external-isic2019.json')).read())
        assert report['run']['label_fraction'] == record['label_fraction'] and report['n_images'] == 20
        for key, value in record['metrics'].items():
            assert value == pytest.approx(report['metrics'][key], nan_ok=True), key
        assert record['classes_left_out'] == {'UNK': 4} and record['n_images'] == 20
        assert record['classes_mapped'] == {name: name for name in fx.ISIC_CLASSES[:8]}
    before = _without_dates(path)

    # a folder holding another run (fraction 1.0's scratch seed 0 overwritten by the 0.5 run, as sweeps did before
    # sweep_work_dir) is skipped, its earlier measurement kept; nothing is duplicated
    replaced = sweep_work_dir(study['work_root'], 'none', 0, 1.0)
    shutil.copy(os.path.join(replaced, 'result.json'), os.path.join(replaced, 'result.keep'))
    shutil.copy(os.path.join(sweep_work_dir(study['work_root'], 'none', 0, 0.5), 'result.json'),
                os.path.join(replaced, 'result.json'))
    assert external(study, '--label-fractions', '1') == 0
    out = capsys.readouterr().out
    assert f'label fraction 1, scratch none, seed 0: skipped: {replaced} holds another run (label fraction 0.5' in out
    assert _without_dates(path) == before
    os.replace(os.path.join(replaced, 'result.keep'), os.path.join(replaced, 'result.json'))

    # the model back: the re-run replaces the skipped record by a measurement
    os.rename(os.path.join(hidden, 'finetuned.hidden'), os.path.join(hidden, 'finetuned.pth'))
    assert external(study, '--label-fractions', '0.5') == 0
    assert '3 run(s) scored, 0 skipped' in capsys.readouterr().out
    after = _without_dates(path)
    assert len(after) == 9 and not any('skipped' in r for r in after)
    assert after[:6] == before[:6]

    lines = external_section(study['results'], 'tiny')
    text = '\n'.join(lines)
    assert lines[0] == '### External evaluation' and '#### isic2019 (`isic`)' in lines
    table = [line for line in lines if line.startswith('| ') and 'role' not in line]
    assert len(table) == 6
    assert table[1].startswith('| 1 | best single task | relloc | 0, 1 | ')
    assert table[4].startswith('| 0.5 | best single task | rotation | 0 | ')
    single = next(r for r in after if r['label_fraction'] == 0.5 and r['role'] == 'best_single')
    low, high = (f'{100 * v:.2f}' for v in single['metrics']['balanced_accuracy_ci'])
    assert f'[{low}, {high}]' in table[4]                       # one seed: its bootstrap interval over images
    assert 'left out (no counterpart in the run): UNK (4 images); 20 image(s) scored (split all)' in text
    assert 'AK → AK' in text
    # against scratch, paired over the seeds both cells have: two seeds give a t interval (t(0.975, 1) = 12.706),
    # one seed the difference alone
    def balanced(fraction, role):
        return {r['seed']: r['metrics']['balanced_accuracy'] for r in after
                if r['label_fraction'] == fraction and r['role'] == role}
    scratch, relloc = balanced(1.0, 'scratch'), balanced(1.0, 'best_single')
    diffs = [relloc[s] - scratch[s] for s in (0, 1)]
    half = 12.706 * abs(diffs[0] - diffs[1]) / 2          # sd of two values / sqrt(2) = |a - b| / 2
    mean = sum(diffs) / 2
    assert table[0].endswith('| - |')
    assert table[1].endswith(f'| {100 * mean:+.2f} [{100 * (mean - half):+.2f}, {100 * (mean + half):+.2f}] '
                             '(2 seeds) |')
    one = balanced(0.5, 'best_single')[0] - balanced(0.5, 'scratch')[0]
    assert table[4].endswith(f'| {100 * one:+.2f} (1 seed) |')

    # deterministic: the same records in another order render the same lines; other studies see nothing
    rows = open(path).read().splitlines()
    random.Random(0).shuffle(rows)
    copy = os.path.join(study['results'], 'copy')
    os.makedirs(os.path.join(copy, 'external'))
    with open(records_path(copy, 'tiny', 'isic2019'), 'w') as handle:
        handle.write('\n'.join(rows) + '\n')
    assert external_section(copy, 'tiny') == lines
    assert external_section(copy, 'tin') == [] and external_section(study['results'], 'other') == []


# -- selection and records without models ----------------------------------------------------------------------------
def _run(order, seed, val, fraction=1.0, config_extra=None):
    config = {'dataset': 'toy', 'seed': seed, 'evaluation': {'label_fraction': fraction}, **(config_extra or {})}
    return {'order': list(order), 'seed': seed, 'init': None, 'label_fraction': fraction, 'config': config,
            'config_hash': f'h{seed}', 'created': '2026-01-01T00:00:00+00:00',
            'downstream': {'finetune': {'headline': 'balanced_accuracy', 'balanced_accuracy': 0.5,
                                        'val': {'balanced_accuracy': val}}}}


def test_plan_targets_notes_missing_cells_and_filters_fractions():
    runs = [_run([], 0, 0.4), _run(['a'], 0, 0.6), _run(['b'], 0, 0.7), _run(['a'], 0, 0.9, 0.1)]
    targets, chosen, notes = plan_targets(runs, 'W')
    assert [(t.label_fraction, t.role, t.ordering) for t in targets] == [
        (1.0, 'scratch', 'none'), (1.0, 'best_single', 'b'), (0.1, 'best_single', 'a')]
    assert targets[1].work_dir == os.path.join('W', 'sweeps', 'b', 'seed0')
    assert targets[2].work_dir == os.path.join('W', 'sweeps', 'a', 'seed0-labels0.1')
    assert chosen == {(1.0, 'scratch'): 'none', (1.0, 'best_single'): 'b', (0.1, 'best_single'): 'a'}
    assert 'label fraction 1: no best multi-task cell among the stored runs' in notes
    assert 'label fraction 0.1: no from scratch cell among the stored runs' in notes
    targets, _, _ = plan_targets(runs, 'W', [0.1])
    assert [t.label_fraction for t in targets] == [0.1]
    # a config change at one fraction: the latest config's runs are compared, the others named
    older = [dict(_run(['a'], 0, 0.99, config_extra={'x': 1}), created='2025-01-01T00:00:00+00:00',
                  config_hash='old')]
    targets, _, notes = plan_targets(runs + older, 'W', [1.0])
    assert [t.ordering for t in targets if t.role == 'best_single'] == ['b'] and targets[1].run['config_hash'] == 'h0'
    assert any('1 run(s) made with another config are not considered' in note for note in notes)


def test_runs_of_older_sweeps_are_found_in_the_folder_without_the_fraction(tmp_path):
    """Sweeps made before sweep_work_dir left a 10 % run in seed<N>: it is used there when it is that run."""
    run = _run(['a'], 0, 0.6, 0.1)
    target, = [t for t in plan_targets([run], str(tmp_path))[0]]
    assert target.older_work_dir == str(tmp_path / 'sweeps' / 'a' / 'seed0')
    assert locate(target) == (None, f'no run folder {target.work_dir} (nor in the older folder: no run folder '
                                    f'{target.older_work_dir})')
    os.makedirs(target.older_work_dir)
    with open(os.path.join(target.older_work_dir, 'result.json'), 'w') as handle:
        json.dump({**run, 'label_fraction': 1.0}, handle)
    assert 'holds another run (label fraction 1)' in locate(target)[1]
    with open(os.path.join(target.older_work_dir, 'result.json'), 'w') as handle:
        json.dump(run, handle)
    assert locate(target)[1].endswith(f'no finetuned.pth in {target.older_work_dir})')
    open(os.path.join(target.older_work_dir, 'finetuned.pth'), 'wb').close()
    assert locate(target) == (target.older_work_dir, None)


def test_merge_keeps_measurements_over_skips_and_drops_moved_selections():
    def record(role, ordering, seed, skipped=None, config_hash='h'):
        out = {'study': 's', 'dataset': 'd', 'label_fraction': 1.0, 'role': role, 'ordering': ordering, 'seed': seed,
               'config_hash': config_hash}
        return {**out, 'skipped': skipped} if skipped else {**out, 'metrics': {'balanced_accuracy': 0.5}}

    held = [record('best_multi', 'a,b', 0), record('best_single', 'a', 0)]
    merged = merge_records(held, [record('best_single', 'a', 0, skipped='no run folder')])
    assert merged == [record('best_single', 'a', 0), record('best_multi', 'a,b', 0)]   # sorted by role
    merged = merge_records(held, [record('best_single', 'a', 0, skipped='gone', config_hash='new')])
    assert merged[0]['skipped'] == 'gone'                     # another run of that cell: the old number is stale
    merged = merge_records(held, [record('best_multi', 'b,a', 0)], {(1.0, 'best_multi'): 'b,a'})
    assert [r['ordering'] for r in merged] == ['a', 'b,a']


# -- bad input ---------------------------------------------------------------------------------------------------------
def _bad_cases(tmp_path):
    experiment = tmp_path / 'exp.yaml'
    experiment.write_text(EXPERIMENT)
    results = tmp_path / 'results'
    results.mkdir()
    empty = tmp_path / 'empty'
    empty.mkdir()
    (results / 'tiny.jsonl').write_text(json.dumps(_run([], 0, 0.5)) + '\n')
    base = ['--results-dir', str(results), '--work-root', str(tmp_path / 'work')]
    return [
        (['external', str(tmp_path / 'nope.yaml'), '--dataset', 'isic2019', *base], 'config file not found'),
        (['external', str(experiment), '--dataset', 'isic2019', '--results-dir', str(empty)],
         'no stored runs of study tiny'),
        (['external', str(experiment), '--dataset', 'no_such_set', *base], "unknown dataset 'no_such_set'"),
        (['external', str(experiment), '--dataset', 'isic2019', '--data-root', str(tmp_path / 'missing'), *base],
         'data root not found'),
        (['external', str(experiment), '--dataset', 'isic2019', '--label-fractions', 'all', *base],
         '--label-fractions must be comma-separated numbers'),
        (['external', str(experiment), '--dataset', 'isic2019', '--data-root', str(empty), '--label-fractions',
          '0.3', *base], 'no stored finetune run to score at label fraction(s) 0.3'),
    ]


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    for argv, phrase in _bad_cases(tmp_path):
        capsys.readouterr()
        code = load_tool('study').main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith('error: ') and phrase in err[0], (argv, err)
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'results' / 'external').exists()
