"""Layout loaders against tiny fixtures written in each published layout, plus splits, cache and error cases."""
from __future__ import annotations

import os

import numpy as np
import pytest

import layout_fixtures as fx
from benchmarks.datasets import (DATASETS, CorruptImageError, DatasetError, EmptySplitError, FileImageSource,
                                 MissingColumnError, MissingFileError, UnknownDatasetError, UnknownLabelError,
                                 load_dataset, load_records)
from benchmarks.datasets.splits import label_fraction_subset, make_splits

LAYOUTS = ['isic2019', 'ham10000', 'medmnist', 'nih_cxr14', 'chexpert', 'siim_covid', 'image_folder']


def write_layout(name: str, tmp_path) -> str:
    """Default fixture of layout ``name``; returns the root to load."""
    writers = {
        'isic2019': lambda: fx.write_isic2019(str(tmp_path / 'isic')),
        'ham10000': lambda: fx.write_ham10000(str(tmp_path / 'ham')),
        'medmnist': lambda: fx.write_medmnist(str(tmp_path / 'mm' / 'pneumoniamnist.npz')),
        'nih_cxr14': lambda: fx.write_nih_cxr14(str(tmp_path / 'nih')),
        'chexpert': lambda: fx.write_chexpert(str(tmp_path / 'cx')),
        'siim_covid': lambda: fx.write_siim_covid(str(tmp_path / 'siim')),
        'image_folder': lambda: fx.write_image_folder(str(tmp_path / 'folder')),
    }
    return writers[name]()


def assert_group_disjoint(split: np.ndarray, groups: np.ndarray | None) -> None:
    if groups is None:
        return
    owner: dict[str, str] = {}
    for group, part in zip(groups.tolist(), split.tolist()):
        assert owner.setdefault(group, part) == part, f'group {group} is in {owner[group]} and {part}'


# -- registry ------------------------------------------------------------------------------------------------------
def test_all_layouts_registered():
    assert set(LAYOUTS) <= set(DATASETS)


def test_unknown_dataset_name():
    with pytest.raises(UnknownDatasetError, match='no_such_set'):
        load_records('no_such_set', '/tmp')


@pytest.mark.parametrize('name', LAYOUTS)
def test_root_none_needs_data_root(name):
    with pytest.raises(MissingFileError, match='--data-root'):
        load_records(name, None)


@pytest.mark.parametrize('name', LAYOUTS)
def test_unknown_option_is_one_line_dataset_error(name, tmp_path):
    with pytest.raises(DatasetError, match='bogus_option') as info:
        load_records(name, write_layout(name, tmp_path), bogus_option=1)
    assert '\n' not in str(info.value)


# -- every layout through load_dataset -------------------------------------------------------------------------
@pytest.mark.parametrize('name', LAYOUTS)
def test_load_dataset_decodes_and_splits_group_disjoint(name, tmp_path):
    root = write_layout(name, tmp_path)
    records = load_records(name, root)
    dataset = load_dataset(name, root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    channels = 1 if name in ('nih_cxr14', 'chexpert', 'siim_covid', 'medmnist') else 3
    assert dataset.images.shape == (len(records), 16, 16, channels)
    assert dataset.images.dtype == np.uint8
    assert set(dataset.split.tolist()) <= {'train', 'val', 'test'}
    assert len(dataset.indices('train')) > 0
    assert_group_disjoint(dataset.split, records.groups)
    if records.split is not None:
        assert dataset.split_origin == 'published'
        assert dataset.split.tolist() == records.split.tolist()


@pytest.mark.parametrize('name', ['isic2019', 'ham10000', 'image_folder', 'siim_covid'])
def test_second_pass_decodes_nothing(name, tmp_path):
    root = write_layout(name, tmp_path)
    cache = str(tmp_path / 'cache')
    first = load_dataset(name, root, image_size=16, seed=0, cache_dir=cache)
    before = FileImageSource.decode_calls
    second = load_dataset(name, root, image_size=16, seed=0, cache_dir=cache)
    assert FileImageSource.decode_calls == before
    np.testing.assert_array_equal(first.images, second.images)
    assert first.fingerprint == second.fingerprint


def _files_below(root: str) -> list[str]:
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names)


@pytest.mark.parametrize('name', ['ham10000', 'medmnist'])
def test_fingerprint_follows_the_bytes_not_timestamps_or_location(name, tmp_path):
    """The stage and decoded-image cache keys hang on this fingerprint. With path+mtime identities a study resumed
    on re-provisioned data (same bytes, new mtimes) retrained every stage it had; the fingerprint now depends on
    contents only, and an unchanged file is not read twice."""
    import shutil

    from benchmarks.datasets import digests

    root = write_layout(name, tmp_path / 'original')
    original = load_records(name, root).source.fingerprint()
    hashed = digests.hashed_files
    assert load_records(name, root).source.fingerprint() == original
    assert digests.hashed_files == hashed  # second pass: answered from the memo, no file read

    top = str(tmp_path / 'original')
    copy_top = str(tmp_path / 'copy')
    shutil.copytree(top, copy_top, copy_function=shutil.copyfile)  # new location, new mtimes
    for path in _files_below(copy_top):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    copy_root = os.path.join(copy_top, os.path.relpath(root, top))
    assert load_records(name, copy_root).source.fingerprint() == original

    if name == 'medmnist':
        with np.load(copy_root) as archive:
            arrays = {key: archive[key].copy() for key in archive.files}
        arrays['train_images'][0, 0, 0] ^= 1
        np.savez(copy_root, **arrays)
    else:
        first_image = sorted(p for p in _files_below(copy_top) if p.endswith('.jpg'))[0]
        fx.write_image(first_image, 7)  # other pixels, same name
    assert load_records(name, copy_root).source.fingerprint() != original


@pytest.mark.parametrize('name', ['isic2019', 'ham10000', 'nih_cxr14', 'chexpert', 'siim_covid', 'image_folder'])
def test_corrupt_image_names_the_path(name, tmp_path):
    root = write_layout(name, tmp_path)
    records = load_records(name, root)
    victim = records.source.paths[len(records) // 2]
    with open(victim, 'wb') as handle:
        handle.write(b'this is not an image at all')
    with pytest.raises(CorruptImageError) as info:
        load_dataset(name, root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    assert victim in str(info.value)


# -- ISIC 2019 -------------------------------------------------------------------------------------------------
def test_isic2019_labels_classes_groups(tmp_path):
    root = fx.write_isic2019(str(tmp_path))
    records = load_records('isic2019', root)
    gt = fx.read_rows(os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv'))
    meta = fx.read_rows(os.path.join(root, 'ISIC_2019_Training_Metadata.csv'))
    assert records.class_names == fx.ISIC_CLASSES
    assert not records.multilabel and records.split is None and records.source.channels == 3
    assert len(records) == len(gt)
    for i, (row, meta_row) in enumerate(zip(gt, meta)):
        hot = [c for c in fx.ISIC_CLASSES if float(row[c]) == 1.0]
        assert records.class_names[records.labels[i]] == hot[0]
        assert records.groups[i] == (meta_row['lesion_id'] or row['image'])
        assert os.path.basename(records.source.paths[i]) == row['image'] + '.jpg'
    assert (records.labels == fx.ISIC_CLASSES.index('UNK')).sum() == 0


def test_isic2019_without_metadata_has_no_groups(tmp_path):
    root = fx.write_isic2019(str(tmp_path), metadata=False)
    assert load_records('isic2019', root).groups is None


def test_isic2019_not_one_hot(tmp_path):
    root = fx.write_isic2019(str(tmp_path))
    path = os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv')
    rows = fx.read_rows(path)
    rows[3]['NV'] = '1.0'
    rows[3]['MEL'] = '1.0'
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(UnknownLabelError) as info:
        load_records('isic2019', root)
    assert rows[3]['image'] in str(info.value) and path in str(info.value)


def test_isic2019_missing_csv_folder_image_column(tmp_path):
    root = fx.write_isic2019(str(tmp_path / 'a'))
    os.remove(os.path.join(root, 'ISIC_2019_Training_Input', 'ISIC_0000005.jpg'))
    with pytest.raises(MissingFileError, match='ISIC_0000005'):
        load_records('isic2019', root)

    empty = str(tmp_path / 'empty')
    os.makedirs(empty)
    with pytest.raises(MissingFileError, match='ISIC_2019_Training_GroundTruth.csv'):
        load_records('isic2019', empty)

    root = fx.write_isic2019(str(tmp_path / 'b'))
    path = os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv')
    rows = fx.read_rows(path)
    fx.write_csv(path, [c for c in rows[0] if c != 'SCC'], [[v for k, v in r.items() if k != 'SCC'] for r in rows])
    with pytest.raises(MissingColumnError, match='SCC'):
        load_records('isic2019', root)


# -- HAM10000 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('official_parts', [False, True])
def test_ham10000_labels_groups_split_masks(tmp_path, official_parts):
    root = fx.write_ham10000(str(tmp_path), official_parts=official_parts)
    records = load_records('ham10000', root)
    meta = fx.read_rows(os.path.join(root, 'HAM10000_metadata.csv'))
    split_of = {r['image_id']: r['split'] for r in fx.read_rows(os.path.join(root, 'splits.csv'))}
    assert records.class_names == fx.HAM_CLASSES
    assert len(records) == len(meta)
    for i, row in enumerate(meta):
        assert records.class_names[records.labels[i]] == row['dx']
        assert records.groups[i] == row['lesion_id']
        assert records.split[i] == split_of[row['image_id']]
        assert os.path.basename(records.source.paths[i]) == row['image_id'] + '.jpg'
        mask = records.masks[i]
        if i % 7 == 3:
            assert mask is None
        else:
            assert os.path.basename(mask) == row['image_id'] + '_segmentation.png'
    assert_group_disjoint(records.split, records.groups)


def test_ham10000_masks_resized_with_images(tmp_path):
    root = fx.write_ham10000(str(tmp_path))
    dataset = load_dataset('ham10000', root, image_size=8, seed=0, cache_dir=str(tmp_path / 'cache'))
    masks = dataset.masks(np.arange(4))
    assert masks[3] is None
    assert masks[0].shape == (8, 8) and masks[0].dtype == bool and masks[0][4, 4] and not masks[0][0, 0]


def test_ham10000_without_splits_or_masks(tmp_path):
    root = fx.write_ham10000(str(tmp_path), masks=False, splits=False)
    records = load_records('ham10000', root)
    assert records.split is None and records.masks is None
    dataset = load_dataset('ham10000', root, image_size=16, seed=3, cache_dir=str(tmp_path / 'cache'))
    assert dataset.split_origin.startswith('generated')
    assert_group_disjoint(dataset.split, records.groups)


def test_ham10000_unknown_dx_and_missing_column(tmp_path):
    root = fx.write_ham10000(str(tmp_path))
    path = os.path.join(root, 'HAM10000_metadata.csv')
    rows = fx.read_rows(path)
    rows[2]['dx'] = 'melanocytic_blob'
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(UnknownLabelError) as info:
        load_records('ham10000', root)
    assert 'melanocytic_blob' in str(info.value) and path in str(info.value)

    fx.write_csv(path, [c for c in rows[0] if c != 'dx'], [[v for k, v in r.items() if k != 'dx'] for r in rows])
    with pytest.raises(MissingColumnError, match='dx'):
        load_records('ham10000', root)


def test_ham10000_missing_image_folder(tmp_path):
    root = str(tmp_path)
    fx.write_csv(os.path.join(root, 'HAM10000_metadata.csv'), ['lesion_id', 'image_id', 'dx'],
                 [['HAM_1', 'ISIC_1', 'nv']])
    with pytest.raises(MissingFileError, match='images'):
        load_records('ham10000', root)


# -- MedMNIST --------------------------------------------------------------------------------------------------
def test_medmnist_split_labels_and_class_table(tmp_path):
    path = fx.write_medmnist(str(tmp_path / 'pneumoniamnist.npz'))
    records = load_records('medmnist', path)
    with np.load(path) as data:
        expected = np.concatenate([data[f'{s}_labels'][:, 0] for s in ('train', 'val', 'test')])
        images = np.concatenate([data[f'{s}_images'] for s in ('train', 'val', 'test')])
        sizes = [len(data[f'{s}_labels']) for s in ('train', 'val', 'test')]
    assert records.class_names == ['normal', 'pneumonia']
    np.testing.assert_array_equal(records.labels, expected)
    assert records.split.tolist() == ['train'] * sizes[0] + ['val'] * sizes[1] + ['test'] * sizes[2]
    assert records.source.channels == 1 and records.groups is None and not records.multilabel
    np.testing.assert_array_equal(records.source.decode(5)[..., 0], images[5])


def test_medmnist_rgb_generic_names_and_option(tmp_path):
    path = fx.write_medmnist(str(tmp_path / 'mystery.npz'), rgb=True, num_classes=5)
    records = load_records('medmnist', path)
    assert records.class_names == [f'class_{i}' for i in range(5)]
    assert records.source.channels == 3
    named = load_records('medmnist', path, class_names=['a', 'b', 'c', 'd', 'e'])
    assert named.class_names == ['a', 'b', 'c', 'd', 'e']
    with pytest.raises(UnknownLabelError, match='5 classes'):
        load_records('medmnist', path, class_names=['a', 'b'])
    dataset = load_dataset('medmnist', path, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    assert dataset.images.shape[-1] == 3 and dataset.split_origin == 'published'


def test_medmnist_size_suffix_matches_table(tmp_path):
    path = fx.write_medmnist(str(tmp_path / 'dermamnist_64.npz'), rgb=True, num_classes=7)
    assert load_records('medmnist', path).class_names == fx.HAM_CLASSES


def test_medmnist_multilabel(tmp_path):
    path = fx.write_medmnist(str(tmp_path / 'chestmnist.npz'), multilabel=14)
    records = load_records('medmnist', path)
    with np.load(path) as data:
        expected = np.concatenate([data[f'{s}_labels'] for s in ('train', 'val', 'test')])
    assert records.multilabel and records.labels.shape == expected.shape
    np.testing.assert_array_equal(records.labels, expected.astype(np.float32))
    assert records.class_names == fx.NIH_FINDINGS


def test_medmnist_errors(tmp_path):
    volume = fx.write_medmnist(str(tmp_path / 'organmnist3d.npz'), volume=True)
    with pytest.raises(DatasetError, match='3-D MedMNIST') as info:
        load_records('medmnist', volume)
    assert '\n' not in str(info.value)
    missing = fx.write_medmnist(str(tmp_path / 'partial.npz'), drop_key='val_labels')
    with pytest.raises(MissingColumnError) as info:
        load_records('medmnist', missing)
    assert 'val_labels' in str(info.value) and missing in str(info.value)
    with pytest.raises(MissingFileError, match='nothere.npz'):
        load_records('medmnist', str(tmp_path / 'nothere.npz'))


# -- NIH ChestX-ray14 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('tarball', [True, False])
def test_nih_labels_groups_published_split(tmp_path, tarball):
    root = fx.write_nih_cxr14(str(tmp_path), tarball=tarball)
    records = load_records('nih_cxr14', root)
    rows = fx.read_rows(os.path.join(root, 'Data_Entry_2017.csv'))
    test_names = set(open(os.path.join(root, 'test_list.txt')).read().split())
    assert records.class_names == fx.NIH_FINDINGS and records.multilabel and records.source.channels == 1
    for i, row in enumerate(rows):
        findings = set(row['Finding Labels'].split('|')) - {'No Finding'}
        positives = {c for c, v in zip(records.class_names, records.labels[i]) if v == 1.0}
        assert positives == findings
        assert records.groups[i] == row['Patient ID']
        assert os.path.basename(records.source.paths[i]) == row['Image Index']
        assert (records.split[i] == 'test') == (row['Image Index'] in test_names)
    assert set(records.split.tolist()) == {'train', 'val', 'test'}
    assert_group_disjoint(records.split, records.groups)
    again = load_records('nih_cxr14', root)
    assert again.split.tolist() == records.split.tolist()  # deterministic


def test_nih_without_lists_has_no_split(tmp_path):
    root = fx.write_nih_cxr14(str(tmp_path), lists=False)
    assert load_records('nih_cxr14', root).split is None


def test_nih_unknown_finding(tmp_path):
    root = fx.write_nih_cxr14(str(tmp_path))
    path = os.path.join(root, 'Data_Entry_2017.csv')
    rows = fx.read_rows(path)
    rows[1]['Finding Labels'] = 'Mass|Covid'
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(UnknownLabelError, match='Covid'):
        load_records('nih_cxr14', root)


# -- CheXpert --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('policy,uncertain_value', [('ones', 1.0), ('zeros', 0.0), ('ignore', np.nan)])
def test_chexpert_policies_groups_split(tmp_path, policy, uncertain_value):
    root = fx.write_chexpert(str(tmp_path))
    records = load_records('chexpert', root, uncertain=policy)
    train = fx.read_rows(os.path.join(root, 'train.csv'))
    valid = fx.read_rows(os.path.join(root, 'valid.csv'))
    rows = train + valid
    assert records.class_names == fx.CHEXPERT_OBSERVATIONS and records.multilabel
    assert records.source.channels == 1
    mapping = {'1.0': 1.0, '0.0': 0.0, '': 0.0, '-1.0': uncertain_value}
    for i, row in enumerate(rows):
        expected = np.asarray([mapping[row[c]] for c in fx.CHEXPERT_OBSERVATIONS], dtype=np.float32)
        np.testing.assert_array_equal(records.labels[i], expected)
        assert records.groups[i] == row['Path'].split('/')[2]
        assert records.source.paths[i] == os.path.join(os.path.dirname(root), row['Path'])
    assert records.split[len(train):].tolist() == ['test'] * len(valid)
    assert set(records.split[:len(train)].tolist()) == {'train', 'val'}
    assert_group_disjoint(records.split, records.groups)
    assert any(policy in note.lower() or 'u-' + policy in note.lower() for note in records.notes)
    seeded = load_records('chexpert', root, uncertain=policy, seed=0)
    assert seeded.split.tolist() == records.split.tolist()


def test_chexpert_bad_policy_and_missing_image(tmp_path):
    root = fx.write_chexpert(str(tmp_path))
    with pytest.raises(DatasetError, match='uncertain') as info:
        load_records('chexpert', root, uncertain='maybe')
    assert '\n' not in str(info.value)
    os.remove(os.path.join(root, 'valid', 'patient64542', 'study1', 'view1_frontal.jpg'))
    with pytest.raises(MissingFileError, match='patient64542/study1/view1_frontal.jpg'):
        load_records('chexpert', root)


def test_chexpert_root_as_parent_folder(tmp_path):
    """CSV paths also resolve when the CSVs sit next to the CheXpert-v1.0-small folder."""
    inner = fx.write_chexpert(str(tmp_path))
    for name in ('train.csv', 'valid.csv'):
        os.replace(os.path.join(inner, name), os.path.join(str(tmp_path), name))
    records = load_records('chexpert', str(tmp_path))
    assert all(os.path.exists(p) for p in records.source.paths)


def test_chexpert_bad_value(tmp_path):
    root = fx.write_chexpert(str(tmp_path))
    path = os.path.join(root, 'train.csv')
    rows = fx.read_rows(path)
    rows[0]['Edema'] = '2.0'
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(UnknownLabelError, match='Edema'):
        load_records('chexpert', root)


# -- SIIM COVID ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('flat', [False, True])
def test_siim_labels_from_study_and_groups(tmp_path, flat):
    root = fx.write_siim_covid(str(tmp_path), flat=flat)
    records = load_records('siim_covid', root)
    studies = {r['id'][:-len('_study')]: r for r in fx.read_rows(os.path.join(root, 'train_study_level.csv'))}
    images = fx.read_rows(os.path.join(root, 'train_image_level.csv'))
    assert records.class_names == fx.SIIM_CLASSES and records.source.channels == 1
    assert len(records) == len(images)
    for i, row in enumerate(images):
        study = studies[row['StudyInstanceUID']]
        hot = [c for c in fx.SIIM_CLASSES if study[c] == '1']
        assert records.class_names[records.labels[i]] == hot[0]
        assert records.groups[i] == row['StudyInstanceUID']
        assert os.path.basename(records.source.paths[i]) == row['id'][:-len('_image')] + '.png'
    assert records.split is None


def test_siim_dicom_path_found(tmp_path):
    root = fx.write_siim_covid(str(tmp_path), dicom_placeholder=True)
    records = load_records('siim_covid', root)
    assert records.source.paths[0].endswith('.dcm')
    assert os.path.basename(os.path.dirname(os.path.dirname(records.source.paths[0]))) == records.groups[0]


def test_siim_not_one_hot(tmp_path):
    root = fx.write_siim_covid(str(tmp_path))
    path = os.path.join(root, 'train_study_level.csv')
    rows = fx.read_rows(path)
    rows[2]['Atypical Appearance'] = '1'
    rows[2]['Negative for Pneumonia'] = '1'
    rows[2]['Typical Appearance'] = '0'
    rows[2]['Indeterminate Appearance'] = '0'
    fx.write_csv(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(UnknownLabelError) as info:
        load_records('siim_covid', root)
    assert rows[2]['id'] in str(info.value)


# -- image_folder ----------------------------------------------------------------------------------------------
def test_image_folder_split_tree(tmp_path):
    root = fx.write_image_folder(str(tmp_path))
    records = load_records('image_folder', root)
    assert records.class_names == ['cyst', 'normal', 'tumour', 'zz_empty']
    assert sorted(set(records.split.tolist())) == ['test', 'train', 'val']  # 'valid' → val
    for path, label, part in zip(records.source.paths, records.labels, records.split):
        rel = os.path.relpath(path, root).split(os.sep)
        assert {'valid': 'val'}.get(rel[0], rel[0]) == part
        assert rel[1] == records.class_names[label]
        assert not path.endswith('.txt')
    assert len(records) == 3 * 3 * 4


def test_image_folder_flat_tree(tmp_path):
    root = fx.write_image_folder(str(tmp_path), splits=None, empty_class=None)
    records = load_records('image_folder', root, channels=1)
    assert records.split is None and records.class_names == ['cyst', 'normal', 'tumour']
    assert np.bincount(records.labels).tolist() == [4, 4, 4]
    assert records.source.channels == 1


def test_image_folder_only_train_has_empty_val(tmp_path):
    root = fx.write_image_folder(str(tmp_path), splits=('train',))
    dataset = load_dataset('image_folder', root, image_size=16, seed=0, cache_dir=str(tmp_path / 'cache'))
    assert len(dataset.indices('train')) == 12
    with pytest.raises(EmptySplitError, match='val'):
        dataset.indices('val')


def test_image_folder_without_images(tmp_path):
    os.makedirs(tmp_path / 'a' / 'b')
    with pytest.raises(EmptySplitError, match=str(tmp_path)):
        load_records('image_folder', str(tmp_path))
    with pytest.raises(MissingFileError, match='nope'):
        load_records('image_folder', str(tmp_path / 'nope'))


# -- splits and label fractions ----------------------------------------------------------------------------------
def _split_inputs(n=600, seed=1):
    rng = np.random.RandomState(seed)
    groups = rng.randint(0, n // 3, n).astype(str)
    labels = rng.choice(4, n, p=[0.55, 0.25, 0.15, 0.05])
    return labels, groups


def test_make_splits_deterministic_grouped_stratified():
    labels, groups = _split_inputs()
    first = make_splits(labels, groups, seed=0)
    assert first.tolist() == make_splits(labels, groups, seed=0).tolist()
    assert first.tolist() != make_splits(labels, groups, seed=1).tolist()
    assert_group_disjoint(first, groups)
    shares = {s: np.mean(first == s) for s in ('train', 'val', 'test')}
    assert abs(shares['train'] - 0.7) < 0.08 and abs(shares['val'] - 0.1) < 0.06 and abs(shares['test'] - 0.2) < 0.08
    for label in range(3):  # every common class lands in every split
        assert {'train', 'val', 'test'} <= set(first[labels == label].tolist())


def test_make_splits_without_groups_and_multilabel():
    labels = np.arange(100) % 2
    split = make_splits(labels, None, seed=0)
    assert np.sum(split == 'train') == 70 and np.sum(split == 'test') == 20
    multi = np.zeros((50, 3), dtype=np.float32)
    multi[::2, 1] = 1
    multi[5, 0] = np.nan
    assert len(make_splits(multi, None, seed=0)) == 50


def test_label_fraction_subset_per_class():
    labels = np.repeat(np.arange(5), [200, 50, 10, 3, 1])
    indices = np.arange(len(labels))
    subset = label_fraction_subset(indices, labels, 0.1, seed=0)
    counts = np.bincount(labels[subset], minlength=5)
    assert counts.tolist() == [20, 5, 1, 1, 1]  # at least one per class present
    assert subset.tolist() == sorted(subset.tolist())
    assert subset.tolist() == label_fraction_subset(indices, labels, 0.1, seed=0).tolist()
    assert label_fraction_subset(indices, labels, 1.0, seed=0).tolist() == indices.tolist()
    with pytest.raises(ValueError):
        label_fraction_subset(indices, labels, 0.0, seed=0)
    subset_of_part = label_fraction_subset(indices[::2], labels, 0.5, seed=3)
    assert set(subset_of_part.tolist()) <= set(indices[::2].tolist())


def test_records_reject_label_outside_class_list(tmp_path):
    from benchmarks.datasets import ImageRecords

    with pytest.raises(UnknownLabelError, match='outside the class list'):
        ImageRecords(name='x', root=str(tmp_path), class_names=['a', 'b'], labels=np.array([0, 2]),
                     source=FileImageSource(['p0.png', 'p1.png']))
