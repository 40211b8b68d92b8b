"""Tests of the MICLe pretext task: the group-partner sampler (same group, another image whenever the group has
two or more in the split, never from another split, seeded replay), MICLe = SimCLR but for the positive, the
plan-time refusal of data without group ids, config checks, a kill-and-resume of its stage with the backbone-only
hand-over and the fraction of positives from another image in its history, and a short learning run on
synthetic_derm (loss falls, pretext accuracy far above chance)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from mmengine.optim import OptimWrapper

from pretext_tasks.data import GroupPartners, IndexedImages, batch_seed
from pretext_tasks.errors import PretextConfigError
from pretext_tasks.micle import MICLeTask
from pretext_tasks.registry import build_task, get_task_class
from pretext_tasks.simclr import SimCLRTask

TINY = dict(type='ResNet', depth=18, base_channels=8, stem_channels=8)
SIZE = 32
#: groups of sizes 3, 1, 2, 1, 4 (ids deliberately not sorted nor contiguous)
GROUPS = np.array([7, 7, 3, 7, 9, 9, 0, 5, 5, 5, 5])


def images(batch: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, SIZE, SIZE, 3), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def tiny(name: str, **cfg):
    torch.manual_seed(0)
    return build_task(name, TINY, dict(batch_size=8, **cfg), 64, SIZE, seed=0)


# -- the sampler --------------------------------------------------------------------------------------------------
def test_partners_come_from_the_group_and_are_another_image_whenever_there_is_one():
    sampler = GroupPartners(GROUPS)
    indices = torch.arange(len(GROUPS)).repeat(400)
    partners = sampler.draw(indices, torch.Generator().manual_seed(0))
    assert torch.equal(torch.as_tensor(GROUPS)[partners], torch.as_tensor(GROUPS)[indices])   # same group
    sizes = np.bincount(np.unique(GROUPS, return_inverse=True)[1])[np.unique(GROUPS, return_inverse=True)[1]]
    alone = torch.as_tensor(sizes == 1)[indices]
    assert torch.equal(partners[alone], indices[alone])                  # alone in its group: itself
    assert bool((partners[~alone] != indices[~alone]).all())             # else: never itself
    for image in range(len(GROUPS)):                                     # every other member of the group, evenly
        drawn = partners[indices == image]
        mates = [j for j in range(len(GROUPS)) if GROUPS[j] == GROUPS[image] and (j != image or sizes[image] == 1)]
        counts = np.array([(drawn == j).sum().item() for j in mates])
        assert counts.sum() == 400 and counts.min() > 400 / len(mates) * 0.7, (image, counts)
    assert sampler.shared_fraction() == pytest.approx(9 / 11)


def test_the_same_seed_replays_the_same_pairs_and_another_seed_draws_others():
    sampler = GroupPartners(GROUPS)
    indices = torch.tensor([0, 1, 3, 4, 7, 8, 9, 10])
    first = sampler.draw(indices, torch.Generator().manual_seed(11))
    assert torch.equal(first, sampler.draw(indices, torch.Generator().manual_seed(11)))
    others = [sampler.draw(indices, torch.Generator().manual_seed(seed)) for seed in range(12, 20)]
    assert any(not torch.equal(first, other) for other in others)
    # the dataset's batches: the pairs of a batch depend on the run seed and the batch's indices only
    pixels = torch.arange(len(GROUPS), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 4, 4, 3).contiguous()
    dataset = IndexedImages(pixels, groups=GROUPS, seed=3)
    batch = dataset.__getitems__(indices.tolist())['inputs']
    again = IndexedImages(pixels, groups=GROUPS, seed=3).__getitems__(indices.tolist())['inputs']
    assert torch.equal(batch['partner_indices'], again['partner_indices'])
    assert torch.equal(batch['partner_indices'],
                       sampler.draw(indices, torch.Generator().manual_seed(batch_seed(3, indices))))
    assert torch.equal(batch['partners'][:, 0, 0, 0].long(), batch['partner_indices'])        # their pixels
    assert torch.equal(batch['groups'], torch.as_tensor(GROUPS)[indices])
    reseeded = [IndexedImages(pixels, groups=GROUPS, seed=s).__getitems__(indices.tolist())['inputs']
                for s in range(4, 12)]
    assert any(not torch.equal(batch['partner_indices'], b['partner_indices']) for b in reseeded)
    assert set(IndexedImages(pixels).__getitems__([0, 1])['inputs']) == {'images', 'indices'}  # no groups: as before


def test_partners_never_cross_splits_on_the_built_in_data():
    from benchmarks.datasets import load_dataset

    data = load_dataset('synthetic_derm', None, image_size=16, seed=0,
                        cache_dir=os.environ.get('CURRICULUM_SSL_CACHE'))
    assert data.has_groups and data.groups_across_splits() == []         # the generated split is grouped
    train = data.indices('train')
    groups = data.group_ids('train')
    assert len(groups) == len(data.unlabeled('train')) and groups.dtype == np.int64
    sampler = GroupPartners(groups)
    partners = sampler.draw(torch.arange(len(train)), torch.Generator().manual_seed(0)).numpy()
    assert (partners < len(train)).all()                                  # indices into the training images only
    assert (data.split[train[partners]] == 'train').all()
    assert (data.records.groups[train[partners]] == data.records.groups[train]).all()
    multi = sampler.group_size(torch.arange(len(train))).numpy() > 1
    assert (partners[multi] != np.arange(len(train))[multi]).all()
    assert 0.3 < sampler.shared_fraction() < 0.6                          # about 46 % have another image


def test_a_split_that_puts_a_group_in_two_splits_is_refused_at_plan_time():
    from benchmarks.datasets.base import ArrayImageSource, ImageRecords
    from benchmarks.datasets.prepared import PreparedDataset
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config
    from curriculum.preflight import check_groups

    pixels = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    records = ImageRecords(name='toy', root='/toy', class_names=['a', 'b'], labels=[0, 1, 0, 1, 0, 1],
                           source=ArrayImageSource(pixels, 'toy'), groups=['p1', 'p1', 'p2', 'p2', 'p3', 'p4'],
                           split=['train', 'val', 'train', 'train', 'test', 'val'])
    plan = build_plan('rotation,micle', load_config(None, {}))
    with pytest.raises(PlanError, match=r"^micle: 1 group\(s\) of toy span two splits \(e\.g\. 'p1'\)"):
        check_groups(plan, PreparedDataset(records, 16))
    assert check_groups(build_plan('rotation', load_config(None, {})), PreparedDataset(records, 16)) is None


# -- the task -----------------------------------------------------------------------------------------------------
def test_registered_as_simclr_with_another_positive():
    assert get_task_class('micle') is MICLeTask and issubclass(MICLeTask, SimCLRTask)
    assert MICLeTask.needs_groups and not SimCLRTask.needs_groups
    own = {name for name, value in vars(MICLeTask).items() if callable(value)}
    assert own <= {'forward', '_partner', 'positive_images', 'compute_loss'}     # the rest is SimCLR's


def batch_of(pixels: torch.Tensor, partners: torch.Tensor | None = None) -> dict:
    inputs = {'images': pixels, 'indices': torch.arange(len(pixels))}
    if partners is not None:
        inputs.update(partners=pixels[partners], partner_indices=partners, groups=torch.zeros(len(pixels)).long())
    return {'inputs': inputs}


def test_with_every_image_its_own_partner_micle_is_simclr():
    pixels = images()
    losses = {}
    for name in ('simclr', 'micle'):
        task = tiny(name)
        task.train()
        task.set_progress(0, 5)
        wrapper = OptimWrapper(torch.optim.SGD(task.parameters(), lr=0.0))
        losses[name] = task.train_step(batch_of(pixels, torch.arange(8) if name == 'micle' else None), wrapper)
    assert float(losses['micle']['loss'].detach()) == float(losses['simclr']['loss'].detach())
    assert float(losses['micle']['pretext_acc']) == float(losses['simclr']['pretext_acc'])
    assert float(losses['micle']['positive_from_other']) == 0.0


def test_the_positive_is_a_view_of_the_partner_and_the_fraction_from_another_image_is_logged():
    pixels = images()
    partners = torch.tensor([1, 0, 2, 3, 5, 4, 6, 7])                     # 4 of 8 paired with another image
    task = tiny('micle')
    task.eval()
    seen = {}
    original = task.pair_views

    def spy(first, second, gen):
        seen['second'] = second
        return original(first, second, gen)

    task.pair_views = spy
    task.set_progress(0, 0)
    out = task(batch_of(pixels, partners)['inputs'])
    assert torch.equal(seen['second'], pixels[partners])
    assert float(out['positive_from_other']) == 0.5
    with pytest.raises(PretextConfigError, match=r'^micle: the training batch holds no group partners'):
        task(batch_of(pixels)['inputs'])


def test_a_bad_config_value_is_one_line_naming_micle():
    from curriculum.errors import PlanError
    from curriculum.plan import build_plan, load_config

    with pytest.raises(PlanError) as info:
        build_plan('micle', load_config(None, {'tasks.micle.temperature': -1}))
    assert str(info.value) == 'micle: temperature must be a positive number, got -1'
    with pytest.raises(PretextConfigError, match=r'^micle: blur_prob must be in \[0, 1\], got 3\.0$'):
        MICLeTask.check_config({'blur_prob': 3}, SIZE)


def test_yaml_recipe_has_simclrs_keys():
    from curriculum.plan import task_recipe

    recipe, simclr = task_recipe('micle'), task_recipe('simclr')
    MICLeTask.check_config(recipe, SIZE)
    assert set(recipe) == set(simclr)


def test_stage_resumes_exactly_after_a_kill_passes_only_its_backbone_and_records_positives(tmp_path):
    from pretext_helpers import assert_stage_resumes_exactly_and_passes_only_its_backbone, resume_stage_config

    record = assert_stage_resumes_exactly_and_passes_only_its_backbone(
        'micle', resume_stage_config('micle'), 0.05, tmp_path)
    fractions = [entry['positive_from_other'] for entry in record['history']]
    assert len(fractions) == 2 and all(0.2 < f < 0.8 for f in fractions)


# -- learning -----------------------------------------------------------------------------------------------------
#: the recipe (configs/tasks/micle.yaml) at 32 px on 1,200 images (whole lesions): 12 epochs of 18 batches of 64
EPOCHS, LR = 12, 0.05


@pytest.mark.slow
def test_micle_learns_on_synthetic_derm():
    from curriculum.plan import task_recipe
    from pretext_helpers import learning_run

    run = learning_run('micle', task_recipe('micle'), EPOCHS, LR, weight_decay=1e-6, size=32)
    history = run['history']
    assert all(np.isfinite(h['loss']) for h in history)
    assert history[-1]['loss'] < history[0]['loss'] - 0.3
    chance = 1.0 / (2 * 64 - 1)
    assert history[-1]['pretext_acc'] > 5 * chance
    # and the kNN probe (batch norm re-estimated on the clean train images) rises above the random init's
    assert run['trained']['recalibrated'] > run['random']['recalibrated'] + 0.03
    shared = GroupPartners(run['groups']).shared_fraction()
    assert all(abs(h['positive_from_other'] - shared) < 0.1 for h in history)
