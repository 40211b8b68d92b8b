"""Layout loaders on the real data in ``../shared/data`` (HAM10000, PneumoniaMNIST).

Skipped when that folder is absent, unless ``REQUIRE_SHARED_DATA=1``, in which case a missing folder fails.
Only metadata is loaded plus a handful of decoded images, so the file runs in about a second.
"""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from benchmarks.datasets import load_records

SHARED_DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..', 'shared', 'data'))
HAM_CLASSES = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']


def shared_path(*parts: str) -> str:
    """Path under the shared data folder; skip the test when it is missing (fail if REQUIRE_SHARED_DATA=1)."""
    path = os.path.join(SHARED_DATA, *parts)
    if not os.path.exists(path):
        message = f'shared data not found: {path}'
        if os.environ.get('REQUIRE_SHARED_DATA') == '1':
            pytest.fail(message + ' (REQUIRE_SHARED_DATA=1)')
        pytest.skip(message)
    return path


def read_rows(path: str) -> list[dict[str, str]]:
    with open(path, newline='', encoding='utf-8-sig') as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope='module')
def ham_records():
    return load_records('ham10000', shared_path('ham10000'))


def test_ham10000_count_labels_groups(ham_records):
    meta = read_rows(shared_path('ham10000', 'HAM10000_metadata.csv'))
    assert len(ham_records) == len(meta) == 10015
    assert ham_records.class_names == HAM_CLASSES
    expected = np.asarray([HAM_CLASSES.index(row['dx']) for row in meta])
    np.testing.assert_array_equal(ham_records.labels, expected)
    assert ham_records.groups.tolist() == [row['lesion_id'] for row in meta]
    assert len(set(ham_records.groups.tolist())) == 7470
    assert np.bincount(ham_records.labels).tolist() == [327, 514, 1099, 115, 1113, 6705, 142]
    assert all(m is not None for m in ham_records.masks)


def test_ham10000_published_split_is_lesion_grouped(ham_records):
    split = ham_records.split
    assert [int(np.sum(split == s)) for s in ('train', 'val', 'test')] == [7015, 1005, 1995]
    owner: dict[str, str] = {}
    for lesion, part in zip(ham_records.groups.tolist(), split.tolist()):
        assert owner.setdefault(lesion, part) == part, f'lesion {lesion} in {owner[lesion]} and {part}'
    split_of = {r['image_id']: r['split'] for r in read_rows(shared_path('ham10000', 'splits.csv'))}
    names = [os.path.splitext(os.path.basename(p))[0] for p in ham_records.source.paths]
    assert split.tolist() == [split_of[n] for n in names]


def test_ham10000_images_and_masks_decode(ham_records):
    from benchmarks.datasets import FileImageSource

    for i in (0, 5000, 10014):
        image = ham_records.source.decode(i)
        mask = FileImageSource([ham_records.masks[i]], channels=1).decode(0)
        assert image.shape == (150, 200, 3) and image.dtype == np.uint8
        assert mask.shape == (150, 200, 1) and 0 < (mask > 127).mean() <= 1


def test_ham10000_npz_matches_split_csv(ham_records):
    """The DermaMNIST-style npz made from the same split: per split, labels in image_id order agree."""
    npz = load_records('medmnist', shared_path('ham10000', 'ham10000_28.npz'))
    assert npz.class_names == HAM_CLASSES and npz.source.channels == 3
    names = np.asarray([os.path.splitext(os.path.basename(p))[0] for p in ham_records.source.paths])
    for part in ('train', 'val', 'test'):
        members = np.flatnonzero(ham_records.split == part)
        ordered = members[np.argsort(names[members], kind='stable')]
        np.testing.assert_array_equal(npz.labels[npz.split == part], ham_records.labels[ordered])


def test_pneumoniamnist_npz():
    records = load_records('medmnist', shared_path('pneumoniamnist', 'pneumoniamnist.npz'))
    assert [int(np.sum(records.split == s)) for s in ('train', 'val', 'test')] == [4708, 524, 624]
    assert records.class_names == ['normal', 'pneumonia']
    assert not records.multilabel and records.source.channels == 1
    assert np.bincount(records.labels[records.split == 'train']).tolist() == [1214, 3494]
    assert np.bincount(records.labels[records.split == 'val']).tolist() == [135, 389]
    assert np.bincount(records.labels[records.split == 'test']).tolist() == [234, 390]
    assert records.source.decode(0).shape == (28, 28, 1)


def test_synthetic_derm_lesions_are_as_large_as_ham10000_lesions():
    """The built-in dermoscopy set sizes its lesions like real dermoscopy: the quartiles and the 90th percentile of
    the lesion's share of the image match HAM10000's segmentation masks (every 10th of them) within 0.05."""
    from PIL import Image

    from benchmarks.datasets import synthetic

    folder = shared_path('ham10000', 'masks')
    names = sorted(os.listdir(folder))[::10]
    real = [(np.asarray(Image.open(os.path.join(folder, name)).convert('L')) > 127).mean() for name in names]
    generated = synthetic.generate_derm(synthetic.DEFAULT_NUM_IMAGES, 64, 0)['masks'].mean(axis=(1, 2))
    levels = (25, 50, 75, 90)
    assert np.allclose(np.percentile(generated, levels), np.percentile(real, levels), atol=0.05), \
        (np.percentile(generated, levels), np.percentile(real, levels))


def test_synthetic_derm_has_ham10000s_images_per_lesion():
    """Images per lesion as in HAM10000's metadata: the share of lesions with 1, 2 and 3+ images within 0.03, and the
    share of images that have another image of their lesion within 0.05 (too many such siblings make instance
    discrimination ill-posed: they are false negatives)."""
    from benchmarks.datasets import synthetic

    rows = read_rows(shared_path('ham10000', 'HAM10000_metadata.csv'))
    _, real_sizes = np.unique([row['lesion_id'] for row in rows], return_counts=True)
    groups = synthetic.generate_derm(synthetic.DEFAULT_NUM_IMAGES, 24, 0)['groups']
    generated_sizes = np.bincount(groups)[:-1]  # the last group is cut to fit

    def shares(sizes):
        sizes = np.asarray(sizes)
        per_lesion = [np.mean(sizes == 1), np.mean(sizes == 2), np.mean(sizes >= 3)]
        return np.array(per_lesion + [sizes[sizes > 1].sum() / sizes.sum()])

    real, generated = shares(real_sizes), shares(generated_sizes)
    assert np.allclose(generated[:3], real[:3], atol=0.03) and abs(generated[3] - real[3]) < 0.05, (generated, real)


def _corner_to_centre_luminance(images: np.ndarray) -> np.ndarray:
    """Per image, the mean luminance of its four corner squares (a tenth of the side) over that of its central half."""
    luminance = images.astype(np.float32).mean(-1)
    h, w = luminance.shape[1:]
    c = max(2, h // 10)
    corners = np.mean([luminance[:, rows, cols].mean((1, 2)) for rows in (slice(0, c), slice(h - c, h))
                       for cols in (slice(0, c), slice(w - c, w))], axis=0)
    return corners / luminance[:, h // 4:3 * h // 4, w // 4:3 * w // 4].mean((1, 2))


def test_synthetic_derm_frames_and_vignetting_as_in_ham10000():
    """Dark dermatoscope frames and vignetting as often as in HAM10000 (every 10th image): the share of images whose
    corners are darker than 0.6 of the centre within 0.03, the quartile and median of that ratio within 0.1."""
    from PIL import Image

    from benchmarks.datasets import synthetic

    folder = shared_path('ham10000', 'images')
    names = sorted(os.listdir(folder))[::10]
    real = np.concatenate([_corner_to_centre_luminance(np.asarray(Image.open(os.path.join(folder, name))
                                                                  .convert('RGB'))[None]) for name in names])
    generated = _corner_to_centre_luminance(synthetic.generate_derm(1200, 64, 0)['images'])
    assert abs(np.mean(generated < 0.6) - np.mean(real < 0.6)) < 0.03, (np.mean(generated < 0.6), np.mean(real < 0.6))
    assert np.allclose(np.percentile(generated, [25, 50]), np.percentile(real, [25, 50]), atol=0.1), \
        (np.percentile(generated, [25, 50]), np.percentile(real, [25, 50]))
