"""Split batch norm: per-group training statistics, plain batch norm in eval mode, the state of nn.BatchNorm2d."""
import copy

import torch
import torch.nn as nn

from pretext_tasks.split_batch_norm import SplitBatchNorm2d, split_batch_norm


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))


def test_training_normalises_each_group_with_its_own_statistics():
    model, reference = _model(), _model()
    assert split_batch_norm(model, 4) == 2
    x = torch.randn(16, 3, 10, 10) * 3 + 1
    out = model(x)
    groups = [copy.deepcopy(reference)(part) for part in x.chunk(4)]
    assert torch.allclose(out, torch.cat(groups), atol=1e-5)
    assert not torch.allclose(out, copy.deepcopy(reference)(x), atol=1e-3)  # not what plain BN gives
    # running statistics: the mean of the groups' EMA updates, one step counted
    with torch.no_grad():
        group_means = torch.stack([reference[0](part).mean((0, 2, 3)) for part in x.chunk(4)]).mean(0)
    assert torch.allclose(model[1].running_mean, 0.1 * group_means, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 1


def test_eval_mode_and_state_dict_are_plain_batch_norm():
    model, reference = _model(), _model()
    split_batch_norm(model, 4)
    model(torch.randn(8, 3, 10, 10))
    assert list(model.state_dict()) == list(reference.state_dict())
    reference.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    reference.eval()
    x = torch.randn(5, 3, 10, 10)
    assert torch.equal(model(x), reference(x))


def test_batches_that_do_not_divide_fall_back_to_plain_batch_norm():
    model, reference = _model(), _model()
    split_batch_norm(model, 4)
    x = torch.randn(6, 3, 10, 10)
    assert torch.allclose(model(x), reference(x), atol=1e-6)


def test_moco_bn_splits_reaches_both_encoders():
    from pretext_tasks import build_task
    task = build_task('moco', {'type': 'ResNet', 'depth': 18, 'out_indices': [3]},
                      {'bn_splits': 8, 'batch_size': 16}, num_images=64, image_size=32)
    online = [m for m in task.algorithm.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    key = [m for m in task.algorithm.encoder_k.modules() if isinstance(m, nn.BatchNorm2d)]
    assert online and all(isinstance(m, SplitBatchNorm2d) and m.num_splits == 8 for m in online + key)
    plain = build_task('moco', {'type': 'ResNet', 'depth': 18, 'out_indices': [3]}, {'batch_size': 16},
                       num_images=64, image_size=32)
    assert not any(isinstance(m, SplitBatchNorm2d) for m in plain.algorithm.modules())
