"""Unsupervised domain adaptation (protocol uda): the DANN / DCAN pieces, class matching by name and class_map,
target labels never read before the final test evaluation (a target whose labels raise when touched), every method
learning the source and scoring above chance on a shifted target, and --target through tools/run_curriculum.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks.datasets.base import ArrayImageSource, ImageRecords
from benchmarks.datasets.prepared import PreparedDataset
from benchmarks.protocols import evaluate, uda
from benchmarks.protocols.adaptation import (METHODS, DomainConditionedAttention, FeatureCorrection,
                                             feature_regularizer, mmd2, reverse_gradient)
from benchmarks.protocols.uda import ClassMatchError, match_classes
from layout_fixtures import write_medmnist
from test_protocols import blob_dataset, blob_images, tiny_resnet
from tool_loader import load_tool

SIZE = 16


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    return blob_dataset([100, 60, 40], 0, 'uda-source-v1', str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def target(tmp_path_factory):
    """Red and green blobs on a brighter, lower-contrast background (class names in another case); no blue."""
    rng = np.random.RandomState(1)
    labels = rng.randint(0, 2, 160)
    images = np.clip(blob_images(len(labels), [[c] for c in labels], rng) * 0.8 + 50, 0, 255).astype(np.uint8)
    records = ImageRecords('shifted', '', ['Red', 'Green'], labels, ArrayImageSource(images, 'uda-target-v1'))
    return PreparedDataset(records, SIZE, 0, str(tmp_path_factory.mktemp('cache')), stratify=False)


@pytest.fixture(scope='module')
def backbone():
    return tiny_resnet()


# -- the pieces ------------------------------------------------------------------------------------------------
def test_gradient_reversal_is_identity_forward_and_negated_backward():
    x = torch.randn(4, 3, requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    torch.testing.assert_close(x.grad, -0.5 * torch.arange(3.0).expand(4, 3))


def test_mmd_is_small_for_one_distribution_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=generator), torch.randn(200, 8, generator=generator)
    same, shifted = mmd2(a, b), mmd2(a, b + 0.5)
    assert 0 <= same < 0.1 and shifted > 4 * same     # the biased estimate of one distribution is small, not 0
    assert mmd2(a, b + 1.0) > shifted


def test_prediction_mmd_with_a_fixed_bandwidth_ignores_predictions_that_barely_differ():
    """The adaptive bandwidth follows the batch's spread, so two-class predictions 0.001 apart score as much as
    predictions 0.1 apart (it pinned DCAN's untrained classifier at chance on real data); the fixed one does not."""
    generator = torch.Generator().manual_seed(0)
    u, v = torch.rand(64, 1, generator=generator), torch.rand(64, 1, generator=generator) + 0.5

    def predictions(spread: float) -> tuple[torch.Tensor, torch.Tensor]:
        p, q = 0.5 + spread * (u - 0.5), 0.5 + spread * (v - 0.5)
        return torch.cat([p, 1 - p], 1), torch.cat([q, 1 - q], 1)

    adaptive = [float(mmd2(*predictions(spread))) for spread in (1e-3, 1e-1)]
    fixed = [float(mmd2(*predictions(spread), bandwidth=uda.PREDICTION_MMD_BANDWIDTH)) for spread in (1e-3, 1e-1)]
    assert adaptive[0] > 0.1 and adaptive[0] == pytest.approx(adaptive[1], rel=0.05)
    assert fixed[0] < 1e-3 * fixed[1] and fixed[1] > 0


def test_domain_conditioned_attention_routes_each_domain_through_its_branch():
    attention = DomainConditionedAttention(32)
    maps, tokens = torch.randn(2, 32, 3, 3), torch.randn(2, 5, 32)
    torch.testing.assert_close(attention(maps, 'source'), attention(maps, 'target'))   # both branches start equal
    with torch.no_grad():
        attention.target[-1].bias.add_(5.0)
    assert not torch.allclose(attention(maps, 'source'), attention(maps, 'target'))
    assert attention(tokens, 'target').shape == tokens.shape
    with pytest.raises(ValueError):
        attention(maps, 'both')


def test_feature_correction_starts_as_the_identity():
    block = FeatureCorrection(6)
    x = torch.randn(3, 6)
    torch.testing.assert_close(block(x), x)


def test_classes_match_by_name_or_class_map():
    mapping, reached = match_classes(['normal', 'opacity', 'cardiomegaly'], ['Normal', 'pneumonia'],
                                     {'opacity': 'pneumonia'})
    assert mapping == {0: 0, 1: 1} and reached == [0, 1]
    mapping, reached = match_classes(['MEL', 'NV', 'BCC'], ['bcc', 'mel'])
    assert mapping == {0: 1, 2: 0} and reached == [0, 1]
    with pytest.raises(ClassMatchError, match=r'share 1 class\(es\) by name \(normal\)'):
        match_classes(['normal', 'opacity'], ['normal', 'pneumonia'])
    with pytest.raises(ClassMatchError, match="'edema' is not a source class"):
        match_classes(['normal', 'opacity'], ['normal', 'pneumonia'], {'edema': 'pneumonia'})
    with pytest.raises(ClassMatchError, match="'covid' is not a target class"):
        match_classes(['normal', 'opacity'], ['normal', 'pneumonia'], {'opacity': 'covid'})


def test_an_unstratified_split_does_not_depend_on_the_labels(tmp_path):
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, (90, 8, 8, 1), dtype=np.uint8)
    labels = rng.randint(0, 3, 90)
    splits = []
    for shuffled in (labels, rng.permutation(labels), np.zeros(90, np.int64)):
        records = ImageRecords('t', '', ['a', 'b', 'c'], shuffled, ArrayImageSource(images, 'split-v1'))
        splits.append(PreparedDataset(records, 8, 0, str(tmp_path), stratify=False).split)
    assert all(np.array_equal(splits[0], other) for other in splits[1:])


# -- the protocol ------------------------------------------------------------------------------------------------
class GuardedLabels:
    """Labels that raise when read before the adaptation has finished, or when any image outside the test split is
    read (a whole-array read included)."""

    def __init__(self, labels: np.ndarray, test: np.ndarray, state: dict):
        self.labels, self.test, self.state = labels, set(np.asarray(test).tolist()), state

    def __getitem__(self, index):
        if not self.state['adapted']:
            raise AssertionError('target labels read before the test evaluation')
        picked = np.atleast_1d(np.arange(len(self.labels))[index])
        if not set(picked.tolist()) <= self.test:
            raise AssertionError('target labels of the train or val split read')
        self.state['reads'] += 1
        return self.labels[index]

    def __array__(self, *args, **kwargs):
        raise AssertionError('the whole target label array read')

    def __len__(self):
        return len(self.labels)


class GuardedTarget:
    """A target dataset whose labels are :class:`GuardedLabels`; everything else is the real dataset's."""

    def __init__(self, dataset: PreparedDataset, state: dict):
        self._dataset = dataset
        self.labels = GuardedLabels(dataset.labels, dataset.indices('test'), state)

    def __getattr__(self, name):
        return getattr(self._dataset, name)


@pytest.mark.parametrize('method', METHODS)
def test_target_labels_are_read_only_for_the_final_test_metrics(method, source, target, backbone, monkeypatch):
    state = {'adapted': False, 'reads': 0}
    real_adapt = uda.adapt

    def adapt(*args, **kwargs):
        network, record = real_adapt(*args, **kwargs)
        state['adapted'] = True
        return network, record

    monkeypatch.setattr(uda, 'adapt', adapt)
    guarded = GuardedTarget(target, state)
    with pytest.raises(AssertionError, match='before the test evaluation'):   # the guard itself works
        guarded.labels[target.indices('test')]
    result = evaluate(backbone, source, ['uda'], batch_size=32, seed=0,
                      options={'uda': {'target': guarded, 'method': method, 'steps': 60}})['uda']
    assert state['adapted'] and state['reads'] == 1
    assert result['method'] == method and result['classes'] == ['Red', 'Green']
    assert result['class_map'] == {'red': 'Red', 'green': 'Green'}
    assert result['left_out'] == {'source_train': {'blue': int((source.labels[source.split == 'train'] == 2).sum())},
                                  'target_test': {}}
    assert result['num_target_train'] == int((target.split == 'train').sum())
    assert result['val']['balanced_accuracy'] > 0.9          # the source is learnt (source val, 2 classes)
    assert result['balanced_accuracy'] > 0.75, result        # it transfers to the shifted target (chance 0.5)
    assert len(result['balanced_accuracy_ci']) == 2 and result['best_step'] == result['steps'] == 60


def test_dcan_without_its_regulariser_aligns_but_never_regularises(source, target, backbone, monkeypatch):
    calls = {'mmd': 0, 'regulariser': 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(uda, 'mmd2', counting('mmd', uda.mmd2))
    monkeypatch.setattr(uda, 'feature_regularizer', counting('regulariser', uda.feature_regularizer))
    options = {'target': target, 'steps': 4, 'eval_every': 4}
    evaluate(backbone, source, ['uda'], batch_size=16, options={'uda': {**options, 'method': 'dcan_noreg'}})
    assert calls == {'mmd': 2 * 4, 'regulariser': 0}       # features and predictions aligned, every step
    evaluate(backbone, source, ['uda'], batch_size=16, options={'uda': {**options, 'method': 'dcan'}})
    assert calls == {'mmd': 4 * 4, 'regulariser': 4}


def _regulariser(features, probabilities, corrected_features, labels, num_classes=2, sample_prob=0.8, seed=0):
    return float(feature_regularizer(features, probabilities, corrected_features, probabilities, labels,
                                     num_classes, torch.Generator().manual_seed(seed), sample_prob=sample_prob,
                                     prediction_bandwidth=1.68))


def test_feature_regulariser_penalises_a_correction_that_moves_source_classes():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    features = torch.randn(64, 8, generator=generator) + 3.0 * labels[:, None]   # two separated classes
    probabilities = torch.stack([1.0 - labels * 0.9 - 0.05, labels * 0.9 + 0.05], 1)
    swapped = torch.roll(features, 1, dims=0)                # every image corrected onto the other class
    values = {name: _regulariser(features, probabilities, corrected, labels)
              for name, corrected in [('identity', features), ('shifted', features + 2.0), ('swapped', swapped)]}
    assert values['identity'] < 0.05 < values['shifted'] and values['identity'] < 0.05 < values['swapped'], values
    assert all(_regulariser(features, probabilities, features, labels, seed=seed) < values['shifted']
               for seed in range(20))                        # whatever the draw
    assert _regulariser(features, probabilities, features + 2.0, labels, sample_prob=0.0) == 0.0   # no draw: 0
    only_first = labels == 0                        # a batch of class 0 alone, C = 3: weight 1/3, one draw
    f, p = features[only_first], probabilities[only_first]
    drawn = torch.rand(len(f), generator=torch.Generator().manual_seed(0)) < 0.8
    expected = (mmd2(f, (f + 2.0)[drawn]) + mmd2(p, p[drawn], bandwidth=1.68)) / 3
    assert _regulariser(f, p, f + 2.0, labels[only_first], num_classes=3) == pytest.approx(float(expected))


def test_selection_on_source_val_keeps_the_best_evaluation(source, target, backbone):
    result = evaluate(backbone, source, ['uda'], batch_size=16,
                      options={'uda': {'target': target, 'method': 'dann', 'steps': 12, 'eval_every': 3,
                                       'selection': 'source_val'}})['uda']
    history = result['history']
    assert [step for step, _, _ in history] == [3, 6, 9, 12]
    best = max(value for _, value, _ in history)
    assert result['val']['balanced_accuracy'] == best
    assert result['best_step'] == max(step for step, value, _ in history if value == best)


def test_uda_through_the_run_tool(tmp_path, capsys):
    """Built-in chest X-rays as the labelled source, a PneumoniaMNIST-layout file as the target, opacity mapped to
    pneumonia: the result records the method, the matching and what was left out; the store and leaderboard have it."""
    from curriculum.leaderboard import build_leaderboards
    from curriculum.results import default_results_url, load_runs

    npz = write_medmnist(str(tmp_path / 'pneumoniamnist.npz'), sizes=(60, 10, 24))
    root = tmp_path / 'root'
    code = load_tool('run_curriculum').main([
        '--order', 'none', '--dataset', 'synthetic_cxr', '--image-size', '16', '--work-root', str(root), '--quiet',
        '--protocols', 'uda', '--target', 'medmnist', '--target-root', npz,
        '--cfg-options', 'dataset_options.num_images=240', 'evaluation.uda.method=dcan_noreg',
        'evaluation.uda.steps=6', 'evaluation.uda.class_map={opacity: pneumonia}'])
    assert code == 0, capsys.readouterr().err
    result = json.loads((root / 'none' / 'result.json').read_text())
    metrics = result['downstream']['uda']
    assert metrics['method'] == 'dcan_noreg' and metrics['steps'] == 6 and metrics['target'] == 'medmnist'
    assert metrics['classes'] == ['normal', 'pneumonia']
    assert metrics['class_map'] == {'normal': 'normal', 'opacity': 'pneumonia'}
    assert set(metrics['left_out']['source_train']) == {'cardiomegaly', 'effusion'}
    assert metrics['num_target_train'] == 60 and metrics['num_target_test'] == 24
    assert result['config']['evaluation']['uda']['target_root'] == npz
    stored, = load_runs(default_results_url(str(root)))
    board, = build_leaderboards([stored])
    assert board.protocol == 'uda' and [row.label for row in board.rows] == ['none']


def test_uda_table_over_methods_and_seeds_resumes_from_the_store(tmp_path, capsys):
    npz = write_medmnist(str(tmp_path / 'pneumoniamnist.npz'), sizes=(40, 8, 20))
    config = tmp_path / 'uda.yaml'
    config.write_text('dataset: synthetic_cxr\nimage_size: 16\nevaluation:\n  protocols: [uda]\n  uda:\n'
                      f'    target: medmnist\n    target_root: {npz}\n    class_map: {{opacity: pneumonia}}\n')
    args = ['--config', str(config), '--order', 'none', '--seeds', '0,1', '--methods', 'source_only,dcan',
            '--work-root', str(tmp_path / 'root'), '--out', str(tmp_path / 'out'), '--quiet',
            '--cfg-options', 'dataset_options.num_images=240', 'evaluation.uda.steps=3']
    tool = load_tool('uda_table')
    assert tool.main(args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.count('[uda] none') == 4
    report = json.loads((tmp_path / 'out' / 'uda.json').read_text())
    assert list(report['methods']) == ['source_only', 'dcan']
    for entry in report['methods'].values():
        assert entry['seeds'] == [0, 1] and len(entry['balanced_accuracy']) == 3
        mean = entry['balanced_accuracy'][0]
        assert mean == pytest.approx(np.mean([row['balanced_accuracy'] for row in entry['per_seed']]))
    assert report['settings']['class_map'] == {'normal': 'normal', 'opacity': 'pneumonia'}
    markdown = (tmp_path / 'out' / 'uda.md').read_text()
    assert '| no alignment (source only) |' in markdown and '| DCAN |' in markdown
    assert tool.main(args) == 0                           # every run is in the results store: nothing runs again
    assert '[uda]' not in capsys.readouterr().out
