"""Step-based fine-tuning (``finetune(steps=, eval_every=, patience=)``): a step budget that does not shrink with
the labeled subset, early stopping on val with the best evaluation's weights kept, and its config keys
(``evaluation.finetune.*``: schema, plan checks, passed on by the run)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.protocols import Splits
from benchmarks.protocols import finetune as finetune_module
from benchmarks.protocols.finetune import finetune
from curriculum.errors import PlanError
from pretext_tasks.base import initial_backbone
from test_protocols import SIZE, blob_images

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TINY_BACKBONE = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8, out_indices=[3])
EPOCH_KEYS = {'balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa', 'balanced_accuracy_ci', 'val',
              'best_epoch', 'val_history'}


@pytest.fixture(scope='module')
def backbone():
    return initial_backbone(TINY_BACKBONE, seed=0)     # built through mmpretrain's registry


@pytest.fixture(scope='module')
def blobs():
    """Three classes of coloured blobs: 200 train, 45 val and 45 test images (indices into one array)."""
    rng = np.random.RandomState(0)
    labels = np.concatenate([np.arange(200) % 3, np.arange(90) % 3])
    images = blob_images(len(labels), [[c] for c in labels], rng)
    return images, labels, Splits(np.arange(200), np.arange(200, 245), np.arange(245, 290))


def subset(splits: Splits, count: int) -> Splits:
    return Splits(splits.train[:count], splits.val, splits.test)


@pytest.fixture
def training_batches(monkeypatch):
    """The size of every training batch (augment_batch runs once per optimiser step)."""
    sizes = []
    augment = finetune_module.augment_batch

    def counting(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return augment(x, *args, **kwargs)

    monkeypatch.setattr(finetune_module, 'augment_batch', counting)
    return sizes


def test_the_step_budget_does_not_depend_on_the_labeled_subset(backbone, blobs, training_batches):
    images, labels, splits = blobs
    for count, batch in ((200, 32), (5, 5), (1, 2)):  # one image: a batch of two copies (BatchNorm needs 2)
        training_batches.clear()
        result, _ = finetune(backbone, images, labels, subset(splits, count), 3, batch_size=32, seed=1, steps=6,
                             eval_every=4)
        assert result['steps_run'] == 6 and training_batches == [batch] * 6, (count, training_batches)
        assert [step for step, _ in result['val_history']] == [4, 6]          # every 4 steps and the last one
        assert result['best_step'] in (4, 6) and result['best_epoch'] is None and result['stopped_early'] is False
        assert result['val']['balanced_accuracy'] == max(value for _, value in result['val_history'])
    # the protocol's run() passes the budget on (as evaluate(options={'finetune': ...}) does); reproducible
    dataset = SimpleNamespace(images=images, labels=labels, num_classes=3, multilabel=False)
    first = finetune_module.run(backbone, dataset, subset(splits, 5), seed=2, epochs=50, batch_size=4, steps=3)
    second = finetune_module.run(backbone, dataset, subset(splits, 5), seed=2, epochs=50, batch_size=4, steps=3)
    assert first['steps_run'] == 3 and first['val_history'][0][0] == 1          # default eval_every: max(1, 3 // 20)
    assert {k: v for k, v in first.items() if k != 'model'} == {k: v for k, v in second.items() if k != 'model'}


@pytest.fixture
def scripted_val(monkeypatch):
    """Replace the val metrics by a script of balanced accuracies; record a copy of the weights at each one."""
    script, snapshots = [], []
    predict = finetune_module.predict_scores

    def recording_predict(model, images, indices=None, *args, **kwargs):
        if indices is not None and len(indices) == 45 and indices[0] == 200:   # the val split
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return predict(model, images, indices, *args, **kwargs)

    monkeypatch.setattr(finetune_module, 'predict_scores', recording_predict)
    monkeypatch.setattr(finetune_module, 'compute_metrics', lambda *args: {'balanced_accuracy': script.pop(0)})
    return script, snapshots


def test_early_stopping_after_patience_evaluations_without_improvement(backbone, blobs, scripted_val):
    images, labels, splits = blobs
    script, snapshots = scripted_val
    # a flat validation (what a vanishing lr gives): the first evaluation is never beaten
    script[:] = [0.5] * 20
    result, _ = finetune(backbone, images, labels, subset(splits, 20), 3, batch_size=8, lr=1e-12, steps=40,
                         eval_every=2, patience=3)
    assert result['stopped_early'] is True and result['steps_run'] == 8        # 1 + 3 evaluations, 2 steps apart
    assert result['best_step'] == 8                                            # ties go to the later evaluation
    assert result['val_history'] == [[2, 0.5], [4, 0.5], [6, 0.5], [8, 0.5]]
    # patience reached at the last step is no early stop
    script[:] = [0.5] * 20
    result, _ = finetune(backbone, images, labels, subset(splits, 20), 3, batch_size=8, steps=6, eval_every=2,
                         patience=2)
    assert result['stopped_early'] is False and result['steps_run'] == 6

    # up, down, a tie (kept: the later of equals, but no improvement), down: stops; the tie's weights come back
    script[:] = [0.4, 0.6, 0.5, 0.6, 0.55, 0.9, 0.9]
    snapshots.clear()
    result, model = finetune(backbone, images, labels, subset(splits, 20), 3, batch_size=8, lr=3e-3, steps=40,
                             eval_every=2, patience=3)
    assert result['val_history'] == [[2, 0.4], [4, 0.6], [6, 0.5], [8, 0.6], [10, 0.55]]
    assert result['steps_run'] == 10 and result['stopped_early'] is True
    assert result['best_step'] == 8 and result['val'] == {'balanced_accuracy': 0.6}
    returned = model.state_dict()
    assert len(snapshots) == 5
    assert all(torch.equal(returned[k], v.to(returned[k].device)) for k, v in snapshots[3].items())
    assert not torch.equal(returned['head.weight'], snapshots[4]['head.weight'])   # training went on after it


def test_step_mode_learns_a_toy_problem(backbone):
    """Two classes told apart by brightness, 8 labeled images: well above chance (0.5) on val and test."""
    rng = np.random.RandomState(3)
    labels = np.arange(88) % 2
    images = (np.where(labels, 170, 80)[:, None, None, None] + rng.randint(-30, 31, (88, SIZE, SIZE, 3)))
    splits = Splits(np.arange(8), np.arange(8, 48), np.arange(48, 88))
    result, _ = finetune(backbone, images.clip(0, 255).astype(np.uint8), labels, splits, 2, batch_size=8, seed=0,
                         lr=3e-3, steps=30, eval_every=5)
    assert result['val']['balanced_accuracy'] >= 0.9, result
    assert result['balanced_accuracy'] >= 0.85, result
    assert result['steps_run'] == 30 and len(result['val_history']) == 6


def test_epoch_mode_keeps_its_result_keys(backbone, blobs):
    images, labels, splits = blobs
    result, _ = finetune(backbone, images, labels, subset(splits, 20), 3, epochs=2, batch_size=8, seed=0)
    assert set(result) == EPOCH_KEYS
    assert isinstance(result['best_epoch'], int) and 1 <= result['best_epoch'] <= 2
    assert len(result['val_history']) == 2 and all(isinstance(v, float) for v in result['val_history'])
    with pytest.raises(ValueError, match='set steps'):
        finetune(backbone, images, labels, subset(splits, 20), 3, epochs=1, patience=2)


# -- config ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('options, key', [
    ({'steps': 0}, 'evaluation.finetune.steps'),
    ({'steps': -3}, 'evaluation.finetune.steps'),
    ({'steps': 1.5}, 'evaluation.finetune.steps'),
    ({'steps': 'x'}, 'evaluation.finetune.steps'),
    ({'steps': True}, 'evaluation.finetune.steps'),
    ({'steps': 100, 'eval_every': 0}, 'evaluation.finetune.eval_every'),
    ({'steps': 100, 'eval_every': 'x'}, 'evaluation.finetune.eval_every'),
    ({'steps': 100, 'patience': -3}, 'evaluation.finetune.patience'),
    ({'steps': 100, 'patience': 1.5}, 'evaluation.finetune.patience'),
    ({'steps': 10, 'eval_every': 20}, 'evaluation.finetune.eval_every'),
    ({'patience': 3}, 'evaluation.finetune.steps'),                  # patience alone: epochs have no patience
    ({'lr': 0}, 'evaluation.finetune.lr'),
    ({'lr': -1e-3}, 'evaluation.finetune.lr'),
    ({'lr': 2}, 'evaluation.finetune.lr'),
    ({'lr': 'x'}, 'evaluation.finetune.lr'),
    ({'lr': True}, 'evaluation.finetune.lr'),
])
def test_plan_rejects_bad_finetune_budgets(options, key):
    from curriculum.plan import build_plan, load_config

    config = load_config(None, {f'evaluation.finetune.{name}': value for name, value in options.items()})
    with pytest.raises(PlanError, match=key.replace('.', r'\.')) as raised:
        build_plan('none', config)
    assert '\n' not in str(raised.value)


def test_config_schema_and_run_pass_the_budget_on(monkeypatch):
    from curriculum import run as run_module
    from curriculum.plan import build_plan, load_config

    config = load_config(None, {'evaluation.finetune.steps': 200, 'evaluation.finetune.patience': 4,
                                'evaluation.finetune.lr': 1e-4})
    build_plan('none', config)
    with pytest.raises(PlanError, match=r"unknown config key 'evaluation\.finetune\.step' \(did you mean "
                                        r"'evaluation\.finetune\.steps'\?\)"):
        load_config(None, {'evaluation.finetune.step': 200})

    calls = []
    monkeypatch.setattr('benchmarks.protocols.evaluate', lambda *args, **kwargs: calls.append(kwargs) or {})
    monkeypatch.setattr(run_module, 'final_backbone', lambda *args: torch.nn.Identity())
    monkeypatch.setattr(run_module, 'apply_precision', lambda *args: None)
    for evaluation in (config['evaluation'], load_config(None)['evaluation'], {'protocols': ['finetune']}):
        ctx = SimpleNamespace(inputs=SimpleNamespace(backbone_cfg={}, precision=None), seed=0, device='cpu',
                              evaluation=evaluation, downstream_data=SimpleNamespace(name='blobs'))
        run_module.evaluate_backbone(ctx, None)
    assert calls[0]['options'] == {'finetune': {'steps': 200, 'patience': 4, 'lr': 1e-4}}   # only the keys set
    assert isinstance(calls[0]['options']['finetune']['lr'], float)
    assert calls[1]['options'] is None and calls[2]['options'] is None           # as before the step budget
