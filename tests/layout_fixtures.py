"""Writers of tiny datasets in each published layout, for the layout tests.

Every function writes into a folder the caller gives (a pytest ``tmp_path``) and returns the root to pass to the
loader. Images are 16×16 noise made with numpy + PIL; nothing here is ever committed as data.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image

ISIC_CLASSES = ['MEL', 'NV', 'BCC', 'AK', 'BKL', 'DF', 'VASC', 'SCC', 'UNK']
HAM_CLASSES = ['akiec', 'bcc', 'bkl', 'df', 'mel', 'nv', 'vasc']
NIH_FINDINGS = ['Atelectasis', 'Cardiomegaly', 'Effusion', 'Infiltration', 'Mass', 'Nodule', 'Pneumonia',
                'Pneumothorax', 'Consolidation', 'Edema', 'Emphysema', 'Fibrosis', 'Pleural_Thickening', 'Hernia']
CHEXPERT_OBSERVATIONS = ['No Finding', 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity',
                         'Lung Lesion', 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis', 'Pneumothorax',
                         'Pleural Effusion', 'Pleural Other', 'Fracture', 'Support Devices']
SIIM_CLASSES = ['Negative for Pneumonia', 'Typical Appearance', 'Indeterminate Appearance', 'Atypical Appearance']


def write_image(path: str, seed: int, size: int = 16, gray: bool = False, mask: bool = False) -> str:
    """A small noise image (or a binary centre-square mask) at ``path``; the format follows the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.RandomState(seed)
    if mask:
        array = np.zeros((size, size), dtype=np.uint8)
        array[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 255
        Image.fromarray(array).convert('1').save(path)
    elif gray:
        Image.fromarray(rng.randint(0, 256, (size, size), dtype=np.uint8)).save(path)
    else:
        Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def write_csv(path: str, header: list[str], rows: list[list]) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', newline='') as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_rows(path: str) -> list[dict[str, str]]:
    """Rows of a fixture CSV, for tests that compare a loader's output row by row."""
    with open(path, newline='') as handle:
        return list(csv.DictReader(handle))


# -- ISIC 2019 ---------------------------------------------------------------------------------------------------
def write_isic2019(root: str, count: int = 24, metadata: bool = True) -> str:
    """ISIC_2019_Training_GroundTruth.csv + ISIC_2019_Training_Input/*.jpg (+ metadata with lesion ids)."""
    gt_rows, meta_rows = [], []
    for i in range(count):
        image = f'ISIC_{i:07d}'
        label = i % 8  # every class but UNK, as in the real data
        gt_rows.append([image] + ['1.0' if c == label else '0.0' for c in range(len(ISIC_CLASSES))])
        # two images per lesion; every fifth image has no lesion id (its own group)
        lesion = '' if i % 5 == 4 else f'IL_{i // 2:07d}'
        meta_rows.append([image, str(30 + i), 'anterior torso', lesion, 'male' if i % 2 else 'female'])
        write_image(os.path.join(root, 'ISIC_2019_Training_Input', f'{image}.jpg'), i)
    write_csv(os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv'), ['image'] + ISIC_CLASSES, gt_rows)
    if metadata:
        write_csv(os.path.join(root, 'ISIC_2019_Training_Metadata.csv'),
                  ['image', 'age_approx', 'anatom_site_general', 'lesion_id', 'sex'], meta_rows)
    return root


# -- HAM10000 ----------------------------------------------------------------------------------------------------
def write_ham10000(root: str, count: int = 28, official_parts: bool = False, masks: bool = True,
                   splits: bool = True) -> str:
    """HAM10000_metadata.csv + images/ (or HAM10000_images_part_1/2) + masks/ + splits.csv (lesion-grouped)."""
    rows, split_rows = [], []
    for i in range(count):
        image_id, lesion_id = f'ISIC_{24306 + i:07d}', f'HAM_{i // 2:07d}'
        dx = HAM_CLASSES[(i // 2) % 7]  # both images of a lesion share the diagnosis
        rows.append([lesion_id, image_id, dx, 'histo', f'{40 + i}.0', 'male', 'back'])
        folder = ('HAM10000_images_part_1' if i % 2 == 0 else 'HAM10000_images_part_2') if official_parts \
            else 'images'
        write_image(os.path.join(root, folder, f'{image_id}.jpg'), 100 + i)
        if masks and i % 7 != 3:  # a few images have no mask
            write_image(os.path.join(root, 'masks', f'{image_id}_segmentation.png'), i, mask=True)
        lesion_number = i // 2
        split = 'test' if lesion_number % 5 == 0 else ('val' if lesion_number % 5 == 1 else 'train')
        split_rows.append([image_id, lesion_id, dx, split])
    write_csv(os.path.join(root, 'HAM10000_metadata.csv'),
              ['lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization'], rows)
    if splits:
        write_csv(os.path.join(root, 'splits.csv'), ['image_id', 'lesion_id', 'dx', 'split'], split_rows)
    return root


# -- MedMNIST ----------------------------------------------------------------------------------------------------
def write_medmnist(path: str, sizes: tuple[int, int, int] = (20, 6, 8), rgb: bool = False,
                   num_classes: int = 2, multilabel: int = 0, volume: bool = False,
                   drop_key: str | None = None) -> str:
    """A MedMNIST-style npz at ``path``: ``{split}_images`` (N,16,16[,3]) uint8 and ``{split}_labels`` (N,1|C)."""
    rng = np.random.RandomState(0)
    arrays = {}
    for split, n in zip(('train', 'val', 'test'), sizes):
        shape = (n, 8, 16, 16) if volume else ((n, 16, 16, 3) if rgb else (n, 16, 16))
        arrays[f'{split}_images'] = rng.randint(0, 256, shape, dtype=np.uint8)
        if multilabel:
            arrays[f'{split}_labels'] = rng.randint(0, 2, (n, multilabel)).astype(np.uint8)
        else:
            arrays[f'{split}_labels'] = (np.arange(n) % num_classes).astype(np.uint8)[:, None]
    arrays.pop(drop_key, None)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, **arrays)
    return path


# -- NIH ChestX-ray14 --------------------------------------------------------------------------------------------
def write_nih_cxr14(root: str, count: int = 30, tarball: bool = True, lists: bool = True) -> str:
    """Data_Entry_2017.csv + images_00N/images/*.png (or images/) + train_val_list.txt / test_list.txt."""
    rows, train_val, test = [], [], []
    for i in range(count):
        patient = i // 3 + 1
        name = f'{patient:08d}_{i % 3:03d}.png'
        if i % 4 == 0:
            findings = 'No Finding'
        else:
            picked = [NIH_FINDINGS[i % 14]] + ([NIH_FINDINGS[(i * 5) % 14]] if i % 3 == 0 else [])
            findings = '|'.join(dict.fromkeys(picked))
        rows.append([name, findings, str(i % 3), str(patient), '50', 'M', 'PA', 2048, 2048, 0.14, 0.14])
        folder = os.path.join(root, f'images_{1 + i // 12:03d}', 'images') if tarball else os.path.join(root, 'images')
        write_image(os.path.join(folder, name), i, gray=True)
        (test if patient % 4 == 0 else train_val).append(name)
    write_csv(os.path.join(root, 'Data_Entry_2017.csv'),
              ['Image Index', 'Finding Labels', 'Follow-up #', 'Patient ID', 'Patient Age', 'Patient Gender',
               'View Position', 'OriginalImage[Width', 'Height]', 'OriginalImagePixelSpacing[x', 'y]'], rows)
    if lists:
        for file_name, names in (('train_val_list.txt', train_val), ('test_list.txt', test)):
            with open(os.path.join(root, file_name), 'w') as handle:
                handle.write('\n'.join(names) + '\n')
    return root


# -- CheXpert ----------------------------------------------------------------------------------------------------
CHEXPERT_VALUES = ['1.0', '0.0', '-1.0', '']


def write_chexpert(parent: str, train_patients: int = 12, valid_patients: int = 4) -> str:
    """``parent/CheXpert-v1.0-small/{train,valid}.csv`` + images; returns the CheXpert-v1.0-small folder."""
    root = os.path.join(parent, 'CheXpert-v1.0-small')
    header = ['Path', 'Sex', 'Age', 'Frontal/Lateral', 'AP/PA'] + CHEXPERT_OBSERVATIONS
    counter = 0
    for file_name, part, first, patients in (('train.csv', 'train', 1, train_patients),
                                             ('valid.csv', 'valid', 64541, valid_patients)):
        rows = []
        for p in range(first, first + patients):
            for study, view in ((1, 'view1_frontal'), (1, 'view2_lateral'), (2, 'view1_frontal')):
                relative = f'CheXpert-v1.0-small/{part}/patient{p:05d}/study{study}/{view}.jpg'
                values = [CHEXPERT_VALUES[(counter + 3 * c) % 4] for c in range(len(CHEXPERT_OBSERVATIONS))]
                rows.append([relative, 'Female', '60', 'Frontal' if 'frontal' in view else 'Lateral', 'AP']
                            + values)
                write_image(os.path.join(parent, relative), counter, gray=True)
                counter += 1
        write_csv(os.path.join(root, file_name), header, rows)
    return root


# -- SIIM-FISABIO-RSNA COVID-19 ----------------------------------------------------------------------------------
def write_siim_covid(root: str, studies: int = 12, flat: bool = False, dicom_placeholder: bool = False) -> str:
    """train_study_level.csv + train_image_level.csv + train/<study>/<series>/<image>.png (or train/<image>.png).

    Every third study has two images. With ``dicom_placeholder`` the first image is a ``.dcm`` file (not a real
    DICOM: only its path resolution is tested)."""
    study_rows, image_rows = [], []
    image_number = 0
    for s in range(studies):
        study = f'{1000 + s:012x}'
        label = s % 4
        study_rows.append([f'{study}_study'] + [1 if c == label else 0 for c in range(4)])
        for _ in range(2 if s % 3 == 0 else 1):
            image = f'{5000 + image_number:012x}'
            series = f'{9000 + s:012x}'
            box_label = 'none 1 0 0 1 1' if label == 0 else 'opacity 0.9 1 1 8 8'
            image_rows.append([f'{image}_image', '' if label == 0 else "[{'x': 1, 'y': 1}]", box_label, study])
            if dicom_placeholder and image_number == 0:
                path = os.path.join(root, 'train', study, series, f'{image}.dcm')
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, 'wb') as handle:
                    handle.write(b'\0' * 128 + b'DICM')
            elif flat:
                write_image(os.path.join(root, 'train', f'{image}.png'), image_number, gray=True)
            else:
                write_image(os.path.join(root, 'train', study, series, f'{image}.png'), image_number, gray=True)
            image_number += 1
    write_csv(os.path.join(root, 'train_study_level.csv'), ['id'] + SIIM_CLASSES, study_rows)
    write_csv(os.path.join(root, 'train_image_level.csv'), ['id', 'boxes', 'label', 'StudyInstanceUID'],
              image_rows)
    return root


# -- class-per-folder tree ---------------------------------------------------------------------------------------
def write_image_folder(root: str, splits: tuple[str, ...] | None = ('train', 'valid', 'test'),
                       classes: tuple[str, ...] = ('normal', 'tumour', 'cyst'), per_class: int = 4,
                       empty_class: str | None = 'zz_empty') -> str:
    """``root/<split>/<class>/*.png|jpg`` (or ``root/<class>/*`` when ``splits`` is None), one empty class folder."""
    number = 0
    for split in (splits or (None,)):
        base = os.path.join(root, split) if split else root
        for class_name in classes:
            for k in range(per_class):
                ext = '.png' if k % 2 else '.jpg'
                write_image(os.path.join(base, class_name, f'img_{number:03d}{ext}'), number)
                number += 1
            with open(os.path.join(base, class_name, 'notes.txt'), 'w') as handle:  # not an image: ignored
                handle.write('ignore me')
        if empty_class:
            os.makedirs(os.path.join(base, empty_class), exist_ok=True)
    return root


# -- ISIC archive export (UDA-1) ---------------------------------------------------------------------------------
ISIC_ARCHIVE_COLUMNS = ['image_id', 'benign_malignant', 'diagnosis', 'label_melanoma', 'melanocytic',
                        'diagnosis_confirm_type', 'age_approx', 'sex', 'orig_width', 'orig_height', 'width', 'height',
                        'isic2019_label']


def write_isic_archive(root: str, count: int = 18, unlabeled: tuple[int, ...] = (4, 13)) -> str:
    """labels.csv + images/*.jpg as in ``isic_archive_uda1``: every third image a melanoma, the rest nevi, and the
    rows in ``unlabeled`` benign without a diagnosis (their images exist, as in the real export)."""
    rows = []
    for i in range(count):
        image_id = f'ISIC_{i:07d}'
        if i in unlabeled:
            rows.append([image_id, 'benign', '', '0', '', '', '', '', 1024, 768, 16, 16, ''])
        elif i % 3 == 0:
            rows.append([image_id, 'malignant', 'melanoma', '1', 'True', 'histopathology', '60', 'female', 1022, 767,
                         16, 16, 'MEL' if i % 2 else ''])
        else:
            rows.append([image_id, 'benign', 'nevus', '0', 'True', '', '30', 'male', 1022, 767, 16, 16, 'NV'])
        write_image(os.path.join(root, 'images', f'{image_id}.jpg'), 300 + i)
    write_csv(os.path.join(root, 'labels.csv'), ISIC_ARCHIVE_COLUMNS, rows)
    return root
