"""tools/evaluate.py on a real fine-tuned run (synthetic_derm, the ISIC-2019 class names): datasets of other layouts
mapped by name and by the ISIC-2019 ↔ HAM10000 synonyms, a class the run lacks left out and reported, metrics equal
to those of the renormalised scores computed here, the run's own test split reproducing its result.json; the
tool's one-line errors; and the ``isic_archive`` layout (a fixture, and the real UDA-1 export when present)."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import layout_fixtures as fx
from benchmarks.datasets import (DATASETS, CorruptImageError, DatasetError, MissingColumnError, MissingFileError,
                                 UnknownLabelError, load_dataset, load_records)
from benchmarks import metrics as engine_metrics
from benchmarks.protocols.features import pooled_features, to_model_input
from curriculum.finetuned import load_finetuned
from test_shared_data import shared_path
from tool_loader import load_tool, tool_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC']
METRICS = ['balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa']
#: the tests that share the module's fine-tuned run stay on one pytest-xdist worker (the run is made once)
SHARES_RUN = pytest.mark.xdist_group('evaluate_tool_run')


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
    """A real run: random initialisation fine-tuned for one epoch on 480 built-in images at 32 px."""
    work_root = tmp_path_factory.mktemp('runs')
    code = load_tool('run_curriculum').main([
        '--order', 'none', '--protocols', 'finetune', '--image-size', '32', '--quiet', '--work-root', str(work_root),
        '--cfg-options', 'dataset_options.num_images=480', 'evaluation.epochs.finetune=1'])
    assert code == 0
    work_dir = work_root / 'none'
    assert (work_dir / 'finetuned.pth').is_file() and (work_dir / 'result.json').is_file()
    return work_dir


def evaluate(run_dir, out, *flags) -> dict:
    """Run the tool in this process; the external.json it wrote."""
    code = load_tool('evaluate').main(['--work-dir', str(run_dir), '--out', str(out), *flags])
    assert code == 0
    return json.loads(out.read_text())


def direct_metrics(run_dir, dataset, indices, mapping: dict[int, int], seed: int) -> dict:
    """Metrics computed here: the fine-tuned model's fp32 softmax over all run classes, restricted to the mapped
    run classes and renormalised; labels are positions among the mapped dataset classes."""
    backbone, head, classes = load_finetuned(str(run_dir / 'finetuned.pth'))
    assert classes == RUN_CLASSES
    backbone.eval()
    with torch.no_grad():
        logits = head(pooled_features(backbone, to_model_input(torch.from_numpy(dataset.images[indices]))))
    probabilities = torch.softmax(logits.float(), dim=1).double().numpy()
    mapped = sorted(mapping)
    restricted = probabilities[:, [mapping[c] for c in mapped]]
    restricted /= restricted.sum(1, keepdims=True)
    y_true = np.asarray([mapped.index(int(label)) for label in dataset.labels[indices]])
    return engine_metrics.test_metrics(y_true, restricted, multilabel=False, seed=seed)


def assert_metrics_match(report: dict, expected: dict) -> None:
    assert set(report['metrics']) == {*METRICS, *(f'{m}_ci' for m in METRICS), 'headline'}
    for key in METRICS:
        assert report['metrics'][key] == pytest.approx(expected[key], abs=1e-9, nan_ok=True), key
    assert report['metrics']['balanced_accuracy_ci'] == pytest.approx(expected['balanced_accuracy_ci'], abs=1e-9)
    for key in METRICS:
        low, high = report['metrics'][f'{key}_ci']
        assert low <= high


# -- other layouts -------------------------------------------------------------------------------------------------
@SHARES_RUN
def test_ham10000_dx_codes_map_by_synonym(run_dir, tmp_path, capsys):
    """Every HAM10000 code has an ISIC-2019 counterpart (akiec ↔ AK through the synonym table); SCC of the run has
    none in HAM10000, so its output is dropped by the renormalisation."""
    root = fx.write_ham10000(str(tmp_path / 'ham'), count=28)
    report = evaluate(run_dir, tmp_path / 'ham.json', '--dataset', 'ham10000', '--data-root', root, '--amp', 'none',
                      '--device', 'cpu')
    assert report['class_mapping'] == {'akiec': 'AK', 'bcc': 'BCC', 'bkl': 'BKL', 'df': 'DF', 'mel': 'MEL',
                                       'nv': 'NV', 'vasc': 'VASC'}
    assert report['unmapped_classes'] == {} and report['n_left_out'] == 0
    assert report['run_classes_unused'] == ['SCC']
    assert report['n_images'] == 28 and report['split'] == 'all'
    assert report['class_counts'] == {name: 4 for name in fx.HAM_CLASSES}
    result = json.loads((run_dir / 'result.json').read_text())
    assert report['run']['order'] == [] and report['run']['seed'] == result['seed'] == 0
    assert report['run']['label_fraction'] == 1.0 and report['run']['work_dir'] == str(run_dir)
    assert report['dataset'] == 'ham10000' and report['data_root'] == root
    assert report['precision']['used'] == 'fp32' and report['versions']['torch'] == torch.__version__
    assert report['date']

    dataset = load_dataset('ham10000', root, image_size=32, seed=0)
    mapping = {fx.HAM_CLASSES.index(dx): RUN_CLASSES.index(name) for dx, name in report['class_mapping'].items()}
    assert_metrics_match(report, direct_metrics(run_dir, dataset, np.arange(28), mapping, seed=0))
    out = capsys.readouterr().out
    assert out.startswith('## none (seed 0, trained on synthetic_derm) on ham10000 (all)')
    assert '| akiec | AK | 4 |' in out and '| balanced_accuracy |' in out


@SHARES_RUN
def test_class_the_run_lacks_is_left_out_and_reported(run_dir, tmp_path, capsys):
    """ISIC-2019's UNK has no counterpart among the run's classes: its images are left out and counted, and the
    metrics run over the eight classes that map (by identical names)."""
    root = fx.write_isic2019(str(tmp_path / 'isic'), count=24)
    path = os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv')
    rows = fx.read_rows(path)
    for i in (5, 11, 17, 23):
        rows[i].update({name: '1.0' if name == 'UNK' else '0.0' for name in fx.ISIC_CLASSES})
    fx.write_csv(path, list(rows[0]), [list(row.values()) for row in rows])

    report = evaluate(run_dir, tmp_path / 'isic.json', '--dataset', 'isic2019', '--data-root', root, '--amp', 'none',
                      '--device', 'cpu')
    assert report['class_mapping'] == {name: name for name in RUN_CLASSES}
    assert report['unmapped_classes'] == {'UNK': 4} and report['n_left_out'] == 4
    assert report['n_images'] == 20 and report['run_classes_unused'] == []
    err = capsys.readouterr().err
    assert 'left out 4 image(s) of classes the run does not know: UNK (4)' in err

    dataset = load_dataset('isic2019', root, image_size=32, seed=0)
    kept = np.flatnonzero(dataset.labels != fx.ISIC_CLASSES.index('UNK'))
    mapping = {c: c for c in range(len(RUN_CLASSES))}
    assert_metrics_match(report, direct_metrics(run_dir, dataset, kept, mapping, seed=0))


@SHARES_RUN
def test_isic_archive_maps_two_classes_and_leaves_out_the_unlabeled(run_dir, tmp_path):
    root = fx.write_isic_archive(str(tmp_path / 'archive'))
    with pytest.warns(UserWarning, match='2 of 18 image'):
        report = evaluate(run_dir, tmp_path / 'archive.json', '--dataset', 'isic_archive', '--data-root', root,
                          '--amp', 'none', '--device', 'cpu')
    assert report['class_mapping'] == {'MEL': 'MEL', 'NV': 'NV'}
    assert report['n_images'] == 16 and report['class_counts'] == {'MEL': 6, 'NV': 10}
    assert report['run_classes_unused'] == RUN_CLASSES[2:]
    assert any('no diagnosis' in note for note in report['notes'])
    with pytest.warns(UserWarning):
        dataset = load_dataset('isic_archive', root, image_size=32, seed=0)
    assert_metrics_match(report, direct_metrics(run_dir, dataset, np.arange(16), {0: 0, 1: 1}, seed=0))


@SHARES_RUN
def test_own_test_split_reproduces_the_runs_test_metrics(run_dir, tmp_path):
    """The run's own dataset and options, its test split, its precision: the same numbers as result.json."""
    report = evaluate(run_dir, tmp_path / 'own.json', '--dataset', 'synthetic_derm', '--split', 'test')
    finetune = json.loads((run_dir / 'result.json').read_text())['downstream']['finetune']
    assert report['dataset_options'] == {'num_images': 480} and report['split'] == 'test'
    assert report['n_images'] == 96 and report['class_mapping'] == {name: name for name in RUN_CLASSES}
    for key in METRICS + ['balanced_accuracy_ci']:
        assert report['metrics'][key] == pytest.approx(finetune[key], abs=1e-12), key
    assert not any('own downstream dataset' in note for note in report['notes'])  # only --split all/train/val warn


@SHARES_RUN
def test_default_output_is_external_json_in_the_run(run_dir, tmp_path):
    work_dir = tmp_path / 'copy'
    shutil.copytree(run_dir, work_dir, ignore=shutil.ignore_patterns('tb'))
    root = fx.write_ham10000(str(tmp_path / 'ham'), count=14)
    assert load_tool('evaluate').main(['--work-dir', str(work_dir), '--dataset', 'ham10000', '--data-root', root,
                                       '--split', 'test', '--amp', 'none']) == 0
    report = json.loads((work_dir / 'external.json').read_text())
    assert report['split'] == 'test' and report['n_images'] == 4  # lesions 0 and 5 of the fixture's splits.csv


# -- bad inputs ------------------------------------------------------------------------------------------------------
def test_missing_run_dir_is_one_line_exit_2(tmp_path):
    missing = tmp_path / 'nowhere'
    proc = subprocess.run([sys.executable, tool_path('evaluate'), '--work-dir', str(missing), '--dataset', 'ham10000',
                           '--data-root', str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f'error: work dir not found: {missing}']


def _without(name):
    def make(run_dir, tmp_path):
        work_dir = tmp_path / 'run'
        shutil.copytree(run_dir, work_dir, ignore=shutil.ignore_patterns('tb', name))
        return work_dir, ['--dataset', 'ham10000', '--data-root', fx.write_ham10000(str(tmp_path / 'ham'))]
    return make


def _with_dataset(flags):
    def make(run_dir, tmp_path):
        return run_dir, flags(tmp_path)
    return make


BAD = [
    ('no finetuned.pth', _without('finetuned.pth'), ['no finetuned.pth in', 're-run', '--protocols finetune']),
    ('no result.json', _without('result.json'), ['no result.json in']),
    ('unknown dataset', _with_dataset(lambda t: ['--dataset', 'no_such_set', '--data-root', str(t)]),
     ["unknown dataset 'no_such_set'"]),
    ('no class in common', _with_dataset(
        lambda t: ['--dataset', 'image_folder', '--data-root', fx.write_image_folder(str(t / 'folder'))]),
     ["dataset 'image_folder' has no class in common with the run", 'cyst, normal, tumour']),
    ('one class in common', _with_dataset(
        lambda t: ['--dataset', 'image_folder', '--data-root',
                   fx.write_image_folder(str(t / 'folder'), splits=None, classes=('Mel', 'scar'), empty_class=None)]),
     ['only one class (Mel)']),
    ('bad dataset option', _with_dataset(
        lambda t: ['--dataset', 'ham10000', '--data-root', fx.write_ham10000(str(t / 'ham')), '--dataset-options',
                   'colour']),
     ["--dataset-options entry 'colour' is not KEY=VALUE"]),
]


@SHARES_RUN
@pytest.mark.parametrize('case, make, phrases', BAD, ids=[case[0] for case in BAD])
def test_bad_input_is_one_line_exit_2(case, make, phrases, run_dir, tmp_path, capsys):
    work_dir, flags = make(run_dir, tmp_path)
    capsys.readouterr()
    code = load_tool('evaluate').main(['--work-dir', str(work_dir), '--out', str(tmp_path / 'x.json'), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith('error: '), err
    for phrase in phrases:
        assert phrase in err[0]
    assert not (tmp_path / 'x.json').exists()


def test_synonym_table():
    tool = load_tool('evaluate')
    assert tool.map_classes(RUN_CLASSES + ['UNK'], fx.HAM_CLASSES) == {0: 3, 1: 2, 2: 4, 3: 5, 4: 0, 5: 1, 6: 6}
    assert tool.map_classes(fx.HAM_CLASSES, ['AK', 'SCC', 'unk', 'nv']) == {0: 0, 3: 5}
    assert tool.map_classes(['Normal', 'Opacity'], ['normal', 'OPACITY', 'effusion']) == {0: 0, 1: 1}


# -- the isic_archive layout ---------------------------------------------------------------------------------------
def test_isic_archive_labels_follow_labels_csv(tmp_path):
    assert 'isic_archive' in DATASETS
    root = fx.write_isic_archive(str(tmp_path / 'archive'))
    with pytest.warns(UserWarning, match=r'2 of 18 image\(s\) left out, no diagnosis') as caught:
        records = load_records('isic_archive', root)
    assert 'ISIC_0000004 (benign)' in str(caught[0].message) and records.notes == [str(caught[0].message)]
    rows = [row for row in fx.read_rows(os.path.join(root, 'labels.csv')) if row['diagnosis']]
    assert records.class_names == ['MEL', 'NV'] and len(records) == len(rows) == 16
    assert records.split is None and records.groups is None and not records.multilabel
    for i, row in enumerate(rows):
        assert records.class_names[records.labels[i]] == {'melanoma': 'MEL', 'nevus': 'NV'}[row['diagnosis']]
        assert records.labels[i] == 1 - int(row['label_melanoma'])
        assert os.path.basename(records.source.paths[i]) == row['image_id'] + '.jpg'
    with pytest.warns(UserWarning):
        dataset = load_dataset('isic_archive', root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    assert dataset.images.shape == (16, 16, 16, 3) and dataset.split_origin.startswith('generated (seed 0')


def _edit_labels(root, edit):
    path = os.path.join(root, 'labels.csv')
    rows = fx.read_rows(path)
    header = edit(rows) or list(rows[0])
    fx.write_csv(path, header, [[row.get(c, '') for c in header] for row in rows])
    return path


@pytest.mark.filterwarnings('ignore:isic_archive')
def test_isic_archive_bad_inputs_are_one_line(tmp_path):
    def check(error, root, *phrases):
        with pytest.raises(error) as info:
            load_dataset('isic_archive', root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
        assert '\n' not in str(info.value)
        for phrase in phrases:
            assert phrase in str(info.value)

    root = fx.write_isic_archive(str(tmp_path / 'columns'))
    path = _edit_labels(root, lambda rows: [c for c in fx.ISIC_ARCHIVE_COLUMNS if c != 'diagnosis'])
    check(MissingColumnError, root, path, 'missing column(s) diagnosis')

    root = fx.write_isic_archive(str(tmp_path / 'missing'))
    os.remove(os.path.join(root, 'images', 'ISIC_0000007.jpg'))
    check(MissingFileError, root, 'image ISIC_0000007 not found')

    root = fx.write_isic_archive(str(tmp_path / 'corrupt'))
    victim = os.path.join(root, 'images', 'ISIC_0000009.jpg')
    with open(victim, 'wb') as handle:
        handle.write(b'not a jpeg')
    check(CorruptImageError, root, victim)

    root = fx.write_isic_archive(str(tmp_path / 'diagnosis'))
    path = _edit_labels(root, lambda rows: rows[2].update(diagnosis='seborrheic keratosis'))
    check(UnknownLabelError, root, path, "unknown diagnosis 'seborrheic keratosis' for image ISIC_0000002")

    root = fx.write_isic_archive(str(tmp_path / 'disagree'))
    _edit_labels(root, lambda rows: rows[3].update(label_melanoma='0'))
    check(UnknownLabelError, root, "image ISIC_0000003 has diagnosis 'melanoma' but label_melanoma '0'")

    with pytest.raises(DatasetError, match='unknown option'):
        load_records('isic_archive', root, colour=1)
    with pytest.raises(MissingFileError, match='--data-root'):
        load_records('isic_archive', None)


@pytest.mark.shared_data
def test_isic_archive_uda1_real_data():
    root = shared_path('isic_archive_uda1')
    with pytest.warns(UserWarning, match=r'2 of 557 image\(s\) left out') as caught:
        records = load_records('isic_archive', root)
    assert 'ISIC_0000257 (benign)' in str(caught[0].message) and 'ISIC_0000454 (benign)' in str(caught[0].message)
    with open(os.path.join(root, 'labels.csv'), newline='', encoding='utf-8-sig') as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 557
    labeled = [row for row in rows if row['diagnosis']]
    assert len(records) == len(labeled) == 555
    assert np.bincount(records.labels).tolist() == [159, 396]  # MEL, NV
    assert records.labels.tolist() == [1 - int(row['label_melanoma']) for row in labeled]
    assert [os.path.basename(p)[:-4] for p in records.source.paths] == [row['image_id'] for row in labeled]
    agree = [records.class_names[records.labels[i]] == row['isic2019_label']
             for i, row in enumerate(labeled) if row['isic2019_label']]
    assert len(agree) == 270 and all(agree)
    for i in (0, 277, 554):
        image = records.source.decode(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) == 256
