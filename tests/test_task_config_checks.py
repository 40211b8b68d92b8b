"""The tasks' "must be positive" config checks share one helper (pretext_tasks.base.config_positive): each bad
value is one line naming the task, the key and the value, and is caught when the plan is checked."""
import pytest

from pretext_tasks.base import config_positive
from pretext_tasks.errors import PretextConfigError
from pretext_tasks.registry import get_task_class

BAD = [
    ('moco', 'temperature', 0, 'moco: temperature must be a positive number, got 0'),
    ('moco', 'queue_fraction', -0.5, 'moco: queue_fraction must be a positive number, got -0.5'),
    ('moco', 'feat_dim', 0, 'moco: feat_dim must be a positive integer, got 0'),
    ('moco', 'batch_size', -3, 'moco: batch_size must be a positive integer, got -3'),
    ('moco', 'bn_splits', 0, 'moco: bn_splits must be a positive integer, got 0'),
    ('odc', 'centroid_update_interval', 0, 'odc: centroid_update_interval must be a positive integer, got 0'),
    ('odc', 'images_per_cluster', 0, 'odc: images_per_cluster must be a positive integer, got 0'),
    ('odc', 'min_cluster_size', -1, 'odc: min_cluster_size must be a positive integer, got -1'),
    ('odc', 'kmeans_iters', 0, 'odc: kmeans_iters must be a positive integer, got 0'),
    ('simclr', 'temperature', 0, 'simclr: temperature must be a positive number, got 0'),
    ('micle', 'batch_size', 0, 'micle: batch_size must be a positive integer, got 0'),
    ('byol', 'feat_dim', -2, 'byol: feat_dim must be a positive integer, got -2'),
]


@pytest.mark.parametrize('task, key, value, message', BAD, ids=[f'{t}.{k}' for t, k, _, _ in BAD])
def test_a_non_positive_value_is_one_line_naming_the_key(task, key, value, message):
    with pytest.raises(PretextConfigError) as info:
        get_task_class(task).check_config({key: value}, 32)
    assert str(info.value) == message


def test_config_positive_returns_the_value_and_rejects_nan_and_non_numbers():
    assert config_positive('t', {'x': '3'}, 'x', 1, int) == 3
    assert config_positive('t', {}, 'x', 0.5) == 0.5
    with pytest.raises(PretextConfigError, match=r"^t: x must be a positive number, got nan$"):
        config_positive('t', {'x': float('nan')}, 'x', 1.0)
    with pytest.raises(PretextConfigError, match=r"^t: x must be an integer, got 'many'$"):
        config_positive('t', {'x': 'many'}, 'x', 1, int)


def test_the_defaults_pass():
    for task in ('moco', 'odc', 'simclr', 'byol', 'micle'):
        get_task_class(task).check_config({}, 32)


@pytest.mark.parametrize('splits, batch_size', [(7, 64), (64, 64)])
def test_moco_bn_splits_must_divide_the_batch_into_groups_of_two_or_more(splits, batch_size):
    with pytest.raises(PretextConfigError) as info:
        get_task_class('moco').check_config({'bn_splits': splits, 'batch_size': batch_size}, 32)
    assert str(info.value) == (f'moco: bn_splits {splits} must divide batch_size {batch_size} into groups of at '
                               f'least 2 images')
    get_task_class('moco').check_config({'bn_splits': 8, 'batch_size': 64}, 32)
