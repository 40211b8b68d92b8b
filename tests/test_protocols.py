"""Evaluation protocols on tiny datasets whose class is visible (coloured blobs) with a small mmpretrain ResNet-18."""
import numpy as np
import pytest
import torch

from benchmarks.datasets.base import ArrayImageSource, ImageRecords
from benchmarks.datasets.prepared import PreparedDataset
from benchmarks.protocols import PROTOCOLS, Splits, evaluate, extract_features, to_model_input
from benchmarks.protocols.finetune import augment_batch, finetune
from benchmarks.protocols.knn import knn_predict, knn_score
from benchmarks.protocols.linear import linear_probe_features

SIZE = 16
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 230]], dtype=np.float64)
METRIC_KEYS = {'balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa'}


def blob_images(count, blobs_per_image, rng):
    """Grey noisy images with one 8x8 blob of a given colour per entry of ``blobs_per_image`` (lists of ids)."""
    images = 110 + rng.randint(-25, 26, size=(count, SIZE, SIZE, 3)).astype(np.float64)
    for i, colours in enumerate(blobs_per_image):
        for colour in colours:
            y, x = rng.randint(0, SIZE - 8, size=2)
            images[i, y:y + 8, x:x + 8] = COLOURS[colour] + rng.randint(-20, 21, size=3)
    return images.clip(0, 255).astype(np.uint8)


def blob_dataset(counts, seed: int, source_id: str, cache_dir: str) -> PreparedDataset:
    """One red, green or blue blob per image, ``counts`` images of each class (noise from ``seed``), prepared at
    ``SIZE`` px; ``source_id`` names the images in the preparation cache."""
    rng = np.random.RandomState(seed)
    labels = np.repeat([0, 1, 2], counts)
    images = blob_images(len(labels), [[c] for c in labels], rng)
    records = ImageRecords('blobs', '', ['red', 'green', 'blue'], labels, ArrayImageSource(images, source_id))
    return PreparedDataset(records, image_size=SIZE, seed=0, cache_dir=cache_dir)


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def single_label(tmp_path_factory):
    return blob_dataset([100, 60, 40], 0, 'blobs-v1', str(tmp_path_factory.mktemp('cache')))   # imbalanced


@pytest.fixture(scope='module')
def multi_label(tmp_path_factory):
    rng = np.random.RandomState(1)
    count = 180
    has = rng.rand(count, 2) < 0.5                        # label 0: red blob present, label 1: blue blob present
    images = blob_images(count, [[c for c, on in zip((0, 2), row) if on] for row in has], rng)
    labels = has.astype(np.float32)
    labels[rng.rand(count, 2) < 0.15] = np.nan            # unknown targets
    records = ImageRecords('blobs-ml', '', ['red', 'blue'], labels, ArrayImageSource(images, 'blobs-ml-v1'),
                           multilabel=True)
    return PreparedDataset(records, image_size=SIZE, seed=0, cache_dir=str(tmp_path_factory.mktemp('cache')))


def tiny_resnet():
    """A ResNet-18 of 16 base channels, seed 0, in eval mode: the frozen backbone of the protocol tests."""
    from mmpretrain.models import ResNet
    torch.manual_seed(0)
    model = ResNet(depth=18, stem_channels=16, base_channels=16)
    model.eval()  # mmpretrain's ResNet.train() returns None, so no chaining
    return model


@pytest.fixture(scope='module')
def backbone():
    return tiny_resnet()


def splits_of(dataset):
    return Splits(dataset.train_indices(1.0), dataset.indices('val'), dataset.indices('test'))


def test_to_model_input_normalises_and_repeats_gray():
    gray = torch.full((2, 4, 4, 1), 255, dtype=torch.uint8)
    x = to_model_input(gray)
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0, :, 0, 0], expected)
    with pytest.raises(ValueError):
        to_model_input(torch.zeros(2, 4, 4, 2, dtype=torch.uint8))


def test_extract_features_leaves_backbone_untouched(backbone, single_label):
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    feats = extract_features(backbone, single_label.images[:10], 'cpu', batch_size=4)
    assert feats.shape == (10, 128) and feats.dtype == torch.float32
    assert backbone.training
    backbone.eval()
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # BN running stats untouched too
    again = extract_features(backbone, single_label.images, 'cpu', indices=np.arange(10))
    torch.testing.assert_close(feats, again)
    gray = single_label.images[:3].mean(-1, keepdims=True).astype(np.uint8)     # (3, 16, 16, 1)
    assert extract_features(backbone, gray).shape == (3, 128)


def test_linear_and_knn_beat_chance(backbone, single_label):
    splits = splits_of(single_label)
    results = evaluate(backbone, single_label, ['linear', 'knn'])
    for name in ('linear', 'knn'):
        r = results[name]
        assert METRIC_KEYS <= set(r) and r['headline'] == 'balanced_accuracy'
        assert r['num_train'] == len(splits.train)
        assert METRIC_KEYS <= set(r['val'])
        assert r['balanced_accuracy'] > (0.8 if name == 'linear' else 0.65), (name, r)   # chance is 1/3
    assert results['linear']['weight_decay'] in results['linear']['val_grid']


def test_knn_score_and_k_larger_than_memory():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = np.array([0, 0, 1, 1])
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]])
    assert knn_score(train, labels, query, np.array([0, 1]), k=2) == 1.0
    scores = knn_predict(train, labels, query, 3, k=50)            # k clipped to the memory size
    np.testing.assert_allclose(scores.sum(1), 1.0)
    assert scores[:, 2].max() == 0.0


def test_finetune_beats_chance_is_deterministic_and_copies(backbone, single_label):
    splits = splits_of(single_label)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    kwargs = {'epochs': 4, 'batch_size': 32, 'seed': 3, 'lr': 3e-3}  # few steps: a higher lr than the default
    result, model = finetune(backbone, single_label.images, single_label.labels, splits, 3, **kwargs)
    assert result['balanced_accuracy'] > 0.8, result
    assert 1 <= result['best_epoch'] <= 4 and len(result['val_history']) == 4
    assert model.backbone is not backbone and not model.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())
    small = Splits(splits.train[:40], splits.val, splits.test)
    first, _ = finetune(backbone, single_label.images, single_label.labels, small, 3, epochs=1, seed=5)
    second, _ = finetune(backbone, single_label.images, single_label.labels, small, 3, epochs=1, seed=5)
    assert first == second


def test_augment_batch_identity_limits_and_determinism():
    x = torch.randn(5, 3, 8, 8)
    same = augment_batch(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    torch.testing.assert_close(same, x)
    flipped = augment_batch(x, torch.Generator().manual_seed(0), scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    for i in range(5):
        assert torch.allclose(flipped[i], x[i]) or torch.allclose(flipped[i], x[i].flip(-1))
    a = augment_batch(x, torch.Generator().manual_seed(1))
    b = augment_batch(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_multilabel_with_nan_targets(backbone, multi_label):
    results = evaluate(backbone, multi_label, ['linear', 'knn', 'finetune'], epochs={'finetune': 2}, batch_size=32)
    for r in results.values():
        assert r['headline'] == 'auc' and METRIC_KEYS <= set(r) and 'val' in r and r['num_train'] > 0
        assert np.isfinite(r['auc'])
    assert results['linear']['auc'] > 0.8, results['linear']
    assert results['knn']['auc'] > 0.7, results['knn']
    assert results['finetune']['model'].head.out_features == 2
    # each protocol's cost is recorded (a study's compute plan is built from these); the feature protocols share
    # one extraction
    assert all(r['seconds'] > 0 for r in results.values())
    assert results['linear']['feature_seconds'] == results['knn']['feature_seconds'] > 0
    assert 'feature_seconds' not in results['finetune']


def test_linear_probe_features_direct():
    rng = np.random.RandomState(0)
    y = rng.randint(0, 3, size=90)
    x = torch.as_tensor(np.eye(3)[y] * 2 + rng.randn(90, 3) * 0.3, dtype=torch.float32)
    r = linear_probe_features(x[:60], y[:60], x[60:75], y[60:75], x[75:], y[75:], num_classes=4)
    assert r['balanced_accuracy'] == 1.0                    # class 3 absent: skipped, not a crash


def test_unknown_protocol_errors(backbone, single_label):
    with pytest.raises(ValueError, match="unknown protocol 'svm'.*linear, finetune, knn"):
        evaluate(backbone, single_label, ['linear', 'svm'])
    with pytest.raises(ValueError, match='epochs'):
        evaluate(backbone, single_label, ['knn'], epochs={'finetuning': 3})
    assert set(PROTOCOLS) == {'linear', 'finetune', 'knn', 'dvme', 'uda'}


def test_pretraining_and_evaluation_share_one_pixel_contract():
    """A backbone is evaluated on inputs made exactly as its pretext task made them (RGB and grayscale)."""
    from benchmarks.protocols.features import to_model_input
    from pretext_tasks.augment import normalize, to_float_nchw

    generator = torch.Generator().manual_seed(0)
    for channels in (3, 1):
        images = torch.randint(0, 256, (4, 8, 8, channels), dtype=torch.uint8, generator=generator)
        assert torch.equal(to_model_input(images), normalize(to_float_nchw(images)))
