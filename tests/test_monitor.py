"""The online kNN monitor: epoch 0 is the starting backbone's kNN, test labels are never read, the curve is kept
in history.json / stage.json, and the LR search reports its trial spread against its noise."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from curriculum.monitor import KnnMonitor, capped_subset

SMALL_BACKBONE = dict(type='ResNet', depth=18, base_channels=16, stem_channels=16, out_indices=[3])


@pytest.fixture(scope='module')
def derm():
    from benchmarks.datasets import load_dataset

    return load_dataset('synthetic_derm', None, image_size=32, seed=0, num_images=480)


def test_capped_subset_is_stratified_seeded_and_within_the_cap():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    indices = np.arange(100)
    subset = capped_subset(indices, labels, 20, seed=3)
    assert len(subset) <= 20 and len(set(subset)) == len(subset)
    assert set(labels[subset]) == {0, 1, 2}                   # every class present, the rare one included
    assert np.array_equal(subset, capped_subset(indices, labels, 20, seed=3))
    assert np.array_equal(capped_subset(indices, labels, 500, seed=0), indices)


def test_the_monitor_never_reads_test_labels_and_respects_the_label_fraction(derm):
    before = KnnMonitor.from_dataset(derm, 1.0, seed=0, max_images=10_000)
    test = derm.indices('test')
    original = derm.records.labels.copy()
    try:
        derm.records.labels[test] = (original[test] + 1) % derm.num_classes   # scramble only the test labels
        after = KnnMonitor.from_dataset(derm, 1.0, seed=0, max_images=10_000)
    finally:
        derm.records.labels[:] = original
    assert np.array_equal(before.train_labels, after.train_labels)
    assert np.array_equal(before.val_labels, after.val_labels)
    assert len(before.train_images) == len(derm.indices('train'))
    assert len(before.val_images) == len(derm.indices('val'))
    tenth = KnnMonitor.from_dataset(derm, 0.1, seed=0, max_images=10_000)
    assert len(tenth.train_labels) == len(derm.train_indices(0.1, 0))


def test_epoch_zero_is_the_knn_of_the_freshly_built_backbone_and_the_curve_is_stored(derm, tmp_path):
    from curriculum.plan import build_plan, load_config
    from curriculum.stage import HISTORY_FILE, StageInputs, build_stage_task, train_stage

    monitor = KnnMonitor.from_dataset(derm, 1.0, seed=0, max_images=200)
    images = derm.unlabeled('train').images
    inputs = StageInputs(train_images=images, val_images=images[:16], image_size=32, backbone_cfg=SMALL_BACKBONE,
                         seed=0, device='cpu')
    cfg = build_plan('rotation', load_config(None, {'epochs': 2, 'tasks.rotation.batch_size': 32})).stages[0].cfg
    fresh = build_stage_task('rotation', cfg, inputs, None)
    expected = monitor.score(fresh.backbone)
    record = train_stage('rotation', cfg, 0.05, inputs, None, str(tmp_path / 'stage'), monitor=monitor)
    history = json.loads((tmp_path / 'stage' / HISTORY_FILE).read_text())
    assert [entry['epoch'] for entry in history] == [0, 1, 2]
    assert history[0]['knn'] == pytest.approx(expected, abs=1e-12)
    assert 'loss' not in history[0] and all('loss' in entry and 'knn' in entry for entry in history[1:])
    summary = record['monitor']
    assert summary['epochs'] == [0, 1, 2] and summary['start'] == history[0]['knn']
    assert summary['final'] == history[2]['knn'] and 0 < summary['share_of_stage'] < 1
    assert record['first_loss'] == history[1]['loss']
    # TensorBoard: the knn scalar at epochs 0, 1, 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [os.path.join(root, name) for root, _, files in os.walk(tmp_path / 'stage') for name in files
              if name.startswith('events.out.tfevents')]
    steps = set()
    for path in events:
        accumulator = EventAccumulator(path)
        accumulator.Reload()
        if 'knn' in accumulator.Tags()['scalars']:
            steps |= {event.step for event in accumulator.Scalars('knn')}
    assert steps == {0, 1, 2}


def test_a_run_records_the_monitor_and_the_lr_search_spread_and_noise(tmp_path):
    from curriculum.plan import build_plan, load_config
    from curriculum.run import run_curriculum

    config = load_config(None, {'image_size': 32, 'epochs': 1, 'lr_search.trials': 2, 'lr_search.val_images': 32,
                                'lr_search.trial_fraction': 1.5,  # a trial may span several epochs
                                'dataset_options.num_images': 480, 'tasks.rotation.batch_size': 32,
                                'evaluation.protocols': ['knn'], 'monitor.max_images': 200,
                                'backbone': SMALL_BACKBONE})
    plan = build_plan('rotation', config)
    result = run_curriculum(plan, str(tmp_path / 'run'), str(tmp_path), f'sqlite:///{tmp_path}/results.db')
    stage = result['stages'][0]
    search = stage['lr_search']
    assert search['objective'] == 'knn'                      # auto: the data has labels
    per_epoch = stage['num_images'] // 32
    assert search['iterations_per_trial'] == round(1.5 * per_epoch) > per_epoch
    assert search['spread'] is not None and search['spread'] >= 0
    assert search['noise'] is not None and search['noise'] >= 0
    assert search['discriminates'] == (search['spread'] > search['noise'])
    best = max((t for t in search['trials'] if t['state'] == 'complete'), key=lambda t: t['score'])
    if search['discriminates']:
        assert search['chosen_by'] == 'best trial' and stage['lr'] == pytest.approx(best['lr'])
    else:   # when_noisy: default_lr — the recipe's lr, the best trial's kept for the record
        assert search['chosen_by'].startswith("the recipe's lr: trial spread")
        assert stage['lr'] == pytest.approx(plan.stages[0].cfg['lr'])
        assert search['best_trial_lr'] == pytest.approx(best['lr'])
    assert stage['monitor']['epochs'] == [0, 1]
    assert result['precision']['used'] in ('fp32', 'bf16')


def test_every_first_stage_and_order_none_start_from_the_same_random_initialisation():
    import torch

    from curriculum.plan import build_plan, load_config
    from curriculum.run import final_backbone
    from curriculum.stage import StageInputs, build_stage_task

    images = np.zeros((64, 32, 32, 3), dtype=np.uint8)
    inputs = StageInputs(train_images=images, val_images=images[:8], image_size=32, backbone_cfg=SMALL_BACKBONE,
                         seed=5, device='cpu')
    config = load_config(None, {'tasks.moco.batch_size': 32, 'tasks.swav.batch_size': 32})
    states = [build_stage_task(task, build_plan(task, config).stages[0].cfg, inputs, None).backbone.state_dict()
              for task in ('rotation', 'moco', 'swav')]
    states.append(final_backbone(SMALL_BACKBONE, None, seed=5).state_dict())
    for state in states[1:]:
        assert all(torch.equal(state[key], states[0][key]) for key in states[0])
    other_seed = final_backbone(SMALL_BACKBONE, None, seed=6).state_dict()
    assert not torch.equal(other_seed['conv1.weight'], states[0]['conv1.weight'])
