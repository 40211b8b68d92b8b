"""DVME (protocol dvme): attention weights that sum to 1, a fused copy of one backbone scoring as that backbone's
linear probe, attention that learns to ignore a useless source, and --fuse through tools/run_curriculum.py (run
folders, stage folders, the result and the leaderboard)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from benchmarks.protocols import evaluate
from benchmarks.protocols.dvme import MetaEmbeddingClassifier, source_names
from test_protocols import blob_dataset, tiny_resnet
from tool_loader import load_tool


pytestmark = pytest.mark.usefixtures('one_torch_thread')


@pytest.fixture(scope='module')
def blobs(tmp_path_factory):
    return blob_dataset([150, 100, 70], 3, 'blobs-dvme-v1', str(tmp_path_factory.mktemp('cache')))


@pytest.fixture(scope='module')
def backbone():
    return tiny_resnet()


class NoiseBackbone(nn.Module):
    """A "backbone" whose features say nothing about the image: fresh Gaussian noise, 64 wide."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))   # a parameter, so that the protocols can find its device

    def forward(self, x):
        return (torch.randn(len(x), 64, 1, 1) + 0 * self.anchor,)


def test_attention_weights_sum_to_one_per_image():
    model = MetaEmbeddingClassifier([8, 5, 12], num_classes=3, width=16)
    features = [torch.randn(20, 8), torch.randn(20, 5) * 10, torch.randn(20, 12)]
    logits, weights = model(features)
    assert logits.shape == (20, 3) and weights.shape == (20, 3)
    torch.testing.assert_close(weights.sum(1), torch.ones(20))
    assert (weights > 0).all()
    with pytest.raises(ValueError):
        model(features[:2])
    assert source_names(['odc', 'moco', 'odc', 'odc']) == ['odc', 'moco', 'odc #2', 'odc #3']


def test_a_fused_copy_of_one_backbone_scores_as_its_linear_probe(backbone, blobs):
    copy_of_it = copy.deepcopy(backbone)
    results = evaluate(backbone, blobs, ['linear', 'dvme'], epochs={'dvme': 400},
                       options={'dvme': {'sources': [('copy', copy_of_it)], 'name': 'original'}})
    linear, fused = results['linear'], results['dvme']
    assert fused['sources'] == ['original', 'copy']
    assert sum(fused['attention'].values()) == pytest.approx(1.0)
    assert sum(fused['attention_val'].values()) == pytest.approx(1.0)
    low, high = linear['balanced_accuracy_ci']
    noise = max(high - low, 0.04) / 2     # half the bootstrap interval of the probe: the noise of the test split
    assert abs(fused['balanced_accuracy'] - linear['balanced_accuracy']) <= noise, (fused, linear)
    assert fused['balanced_accuracy'] > 0.8                       # chance is 1/3
    assert fused['val_grid'] and fused['best_step'] >= 1 and fused['num_train'] == linear['num_train']


def test_attention_turns_away_from_a_useless_source(backbone, blobs):
    results = evaluate(backbone, blobs, ['dvme'], epochs={'dvme': 300}, seed=1,
                       options={'dvme': {'sources': [('noise', NoiseBackbone())], 'name': 'backbone',
                                         'weight_decays': (1e-3,)}})
    fused = results['dvme']
    assert fused['attention']['backbone'] > 0.6, fused['attention']
    assert fused['balanced_accuracy'] > 0.6, fused                # chance is 1/3; the noise costs a little


def run_tool(tmp_path, *args, options=()):
    common = ['--dataset', 'synthetic_cxr', '--image-size', '16', '--work-root', str(tmp_path / 'root'), '--quiet',
              '--lr-trials', '0', '--cfg-options', 'dataset_options.num_images=240', 'monitor.knn=false', *options]
    return load_tool('run_curriculum').main([*args, *common])


def test_fuse_run_and_stage_folders_end_to_end(tmp_path, capsys):
    """Two finished runs (a random initialisation and a one-epoch rotation stage) fused with a third; the result
    names its sources and their files, records the attention per source, and the leaderboard gets a dvme row."""
    from curriculum.leaderboard import build_leaderboards
    from curriculum.results import default_results_url, load_runs

    root = tmp_path / 'root'
    assert run_tool(tmp_path, '--order', 'none', '--seed', '1', '--protocols', 'knn',
                    '--work-dir', str(root / 'random1')) == 0
    assert run_tool(tmp_path, '--order', 'rotation', '--epochs', '1', '--protocols', 'knn',
                    options=['tasks.rotation.batch_size=32']) == 0
    stage = json.loads((root / 'rotation' / 'result.json').read_text())['stages'][-1]['stage_dir']
    code = run_tool(tmp_path, '--order', 'none', '--protocols', 'knn,dvme', '--fuse', str(root / 'random1'),
                    os.path.join(stage, 'backbone.pth'), '--work-dir', str(root / 'fused'),
                    options=['evaluation.epochs.dvme=60'])
    assert code == 0, capsys.readouterr().err
    result = json.loads((root / 'fused' / 'result.json').read_text())
    dvme = result['downstream']['dvme']
    assert dvme['sources'] == ['none', 'none #2', os.path.basename(stage)]
    assert [run['backbone_file'] for run in dvme['fused_runs']] == [None, os.path.join(stage, 'backbone.pth')]
    assert dvme['fused_runs'][0]['seed'] == 1
    assert set(dvme['attention']) == set(dvme['sources']) and sum(dvme['attention'].values()) == pytest.approx(1)
    assert 'balanced_accuracy_ci' in dvme and dvme['steps'] == 60
    assert result['config']['evaluation']['fuse'] == [str(root / 'random1'), os.path.join(stage, 'backbone.pth')]
    stored = [run for run in load_runs(default_results_url(str(root))) if 'dvme' in run['downstream']]
    assert len(stored) == 1
    board, = [b for b in build_leaderboards(stored) if b.protocol == 'dvme']
    assert [row.label for row in board.rows] == [f'dvme[none + none #2 + {os.path.basename(stage)}]']


def fake_run(order, seed, val, test):
    metrics = {'balanced_accuracy': test, 'headline': 'balanced_accuracy', 'val': {'balanced_accuracy': val}}
    return {'order': list(order), 'seed': seed, 'init': None, 'config': {'seed': seed}, 'stages': [],
            'downstream': {'linear': metrics}}


def test_fuse_top_chooses_on_val_never_on_test():
    from curriculum.errors import PlanError
    from curriculum.fuse_top import top_orderings

    runs = []
    for seed in (0, 1):
        runs += [fake_run(['a'], seed, 0.50, 0.90), fake_run(['b'], seed, 0.70, 0.40),
                 fake_run(['c'], seed, 0.60, 0.50), fake_run(['a', 'b'], seed, 0.65, 0.95),
                 fake_run([], seed, 0.99, 0.99)]                    # the baseline is never fused
    assert top_orderings(runs, 'linear', 3) == ['b', 'a,b', 'c']
    assert top_orderings(runs, 'linear', 3, max_len=1) == ['b', 'c', 'a']
    with pytest.raises(PlanError, match='only 4 pretrained ordering'):
        top_orderings(runs, 'linear', 5)
    with pytest.raises(PlanError, match=r'only 3 pretrained ordering\(s\) of at most 1 task'):
        top_orderings(runs, 'linear', 4, max_len=1)


def test_leaderboard_fuse_top_adds_the_fused_row(tmp_path, capsys):
    """A sweep of two one-epoch orderings with --fuse-top 2: one fused run per seed (its stages from the cache),
    a dvme row on the knn board with its footer line; asking again reuses the stored fused run."""
    from curriculum.results import default_results_url, export_runs, load_runs

    root = tmp_path / 'root'
    args = ['--orders', 'rotation', 'moco', '--seeds', '0', '--work-root', str(root), '--image-size', '32',
            '--epochs', '1', '--lr-trials', '0', '--protocols', 'knn', '--quiet', '--fuse-top', '2',
            '--fuse-protocol', 'knn', '--cfg-options', 'dataset_options.num_images=360',
            'tasks.rotation.batch_size=32', 'tasks.moco.batch_size=32', 'monitor.knn=false',
            'evaluation.epochs.dvme=60']
    tool = load_tool('leaderboard')
    assert tool.main(args) == 0
    markdown = (root / 'leaderboard' / 'leaderboard.md').read_text()
    fused_runs = [run for run in load_runs(default_results_url(str(root))) if 'dvme' in run['downstream']]
    assert len(fused_runs) == 1
    fused = fused_runs[0]
    assert all(stage['cache_hit'] for stage in fused['stages'])
    label = f'dvme[{" + ".join(fused["downstream"]["dvme"]["sources"])}]'
    assert sorted(fused['downstream']['dvme']['sources']) == ['moco', 'rotation']
    assert f'| {label} | - |' in markdown and f'{label}: the 2 orderings with the highest mean val' in markdown
    assert '### synthetic_derm → synthetic_derm · dvme' not in markdown      # a row of the knn board, not a board
    assert tool.main(['--from-results', '--work-root', str(root), '--fuse-top', '2', '--fuse-protocol', 'knn']) == 0
    assert len([run for run in load_runs(default_results_url(str(root))) if 'dvme' in run['downstream']]) == 1
    # from a compact export (no stage paths: the stage cache is found under --work-root), fused runs in a store of
    # their own: the same row, made again there
    export = tmp_path / 'export.jsonl'
    export_runs([run for run in load_runs(default_results_url(str(root))) if 'dvme' not in run['downstream']],
                str(export))
    fused_store = f'sqlite:///{tmp_path / "fused" / "fused.db"}'
    (tmp_path / 'fused').mkdir()
    assert tool.main(['--from-results', '--results', str(export), '--work-root', str(root), '--fuse-top', '2',
                      '--fuse-protocol', 'knn', '--fuse-results', fused_store, '--out', str(tmp_path / 'out')]) == 0
    for bad, fragment in ((['--fuse-top', '3'], 'only 2 pretrained ordering(s) were evaluated with knn'),
                          (['--fuse-top', '0'], '--fuse-top must be at least 1'),
                          (['--fuse-top', '2', '--fuse-protocol', 'finetune'], "no results of protocol 'finetune'")):
        capsys.readouterr()
        assert tool.main(['--from-results', '--work-root', str(root), '--fuse-protocol', 'knn', *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    again, = load_runs(fused_store)
    assert again['downstream']['dvme']['sources'] == fused['downstream']['dvme']['sources']
    board = (tmp_path / 'out' / 'leaderboard.md').read_text()
    assert f'| {label} | - |' in board
    # a fresh clone: both exports but no stage cache. The board is re-rendered from the stored fused run; with no
    # stored fused run the missing backbone stops it before anything runs
    fused_export = tmp_path / 'fused.jsonl'
    export_runs(load_runs(fused_store), str(fused_export))
    empty_root = tmp_path / 'fresh-clone-root'
    assert tool.main(['--from-results', '--results', str(export), '--work-root', str(empty_root), '--fuse-top', '2',
                      '--fuse-protocol', 'knn', '--fuse-results', str(fused_export),
                      '--out', str(tmp_path / 'again')]) == 0
    assert (tmp_path / 'again' / 'leaderboard.md').read_text() == board
    capsys.readouterr()
    assert tool.main(['--from-results', '--results', str(export), '--work-root', str(empty_root), '--fuse-top', '2',
                      '--fuse-protocol', 'knn', '--fuse-results', f'sqlite:///{tmp_path / "fused" / "new.db"}',
                      '--out', str(tmp_path / 'none')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'the final backbone' in err[0] and 'is missing' in err[0], err
    assert not (tmp_path / 'fused' / 'new.db').exists() and not empty_root.exists()


def test_fused_row_lists_attention_in_the_fused_order_whatever_the_stored_key_order():
    """A compact JSON Lines export sorts keys: the footer must still name the sources in the fused label's order,
    with each source's mean weight over seeds."""
    from curriculum.fuse_top import add_fused_row
    from curriculum.leaderboard import Leaderboard

    def fused(seed, weights):
        metrics = {'balanced_accuracy': 0.4 + seed / 100, 'sources': ['swav', 'odc', 'rotation'],
                   'attention': dict(sorted(weights.items()))}
        return {'seed': seed, 'order': ['swav'], 'downstream': {'dvme': metrics}}

    board = Leaderboard('linear', 'balanced_accuracy', [], 'ham10000', 'ham10000', 1.0, {})
    row = add_fused_row(board, ['swav', 'odc', 'rotation'],
                        [fused(1, {'swav': 0.2, 'odc': 0.3, 'rotation': 0.5}),
                         fused(0, {'swav': 0.4, 'odc': 0.3, 'rotation': 0.3})], 'linear')
    assert row.label == 'dvme[swav + odc + rotation]' and row.seeds == [0, 1]
    assert board.notes[0].endswith('mean attention weight on test: swav 0.30, odc 0.30, rotation 0.40.')
    # a run that fused odc's last stage folder names it so; the row and its footer still name the ordering
    by_folder = fused(2, {'swav': 0.2, 'odc-ab12': 0.2, 'rotation': 0.6})
    by_folder['downstream']['dvme']['sources'] = ['swav', 'odc-ab12', 'rotation']
    board = Leaderboard('linear', 'balanced_accuracy', [], 'ham10000', 'ham10000', 1.0, {})
    row = add_fused_row(board, ['swav', 'odc', 'rotation'], [by_folder], 'linear')
    assert row.label == 'dvme[swav + odc + rotation]'
    assert board.notes[0].endswith('mean attention weight on test: swav 0.20, odc 0.20, rotation 0.60.')


def test_a_stored_fused_run_is_found_by_its_sources_wherever_their_backbones_lay():
    """Matching ignores the fused folders' paths (a fresh clone has none) but not what was fused: a source recorded
    by its stage folder's name (the sweep folder held another run) matches, another source, seed or config does
    not."""
    from curriculum.fuse_top import _source_names, stored_fused_run

    config = {'image_size': 32, 'evaluation': {'protocols': ['dvme'], 'fuse': ['here/moco/seed0']}}
    moco = {'order': ['moco'], 'stages': [{'task': 'moco', 'key': 'ab12'}]}
    job = {'seed': 0, 'order': 'swav', 'init': None, 'config': config,
           'sources': [_source_names({'order': ['swav'], 'stages': []}, 'swav'), _source_names(moco, 'moco')]}

    def stored(sources, seed=0, size=32):
        return {'seed': seed, 'order': ['swav'], 'init': None,
                'config': {'image_size': size, 'evaluation': {'protocols': ['dvme'], 'fuse': ['elsewhere/x']}},
                'downstream': {'dvme': {'sources': sources}}}

    assert stored_fused_run(job, [stored(['swav', 'moco'])]) is not None
    assert stored_fused_run(job, [stored(['swav', 'moco-ab12'])]) is not None
    for other in (stored(['swav', 'odc']), stored(['swav', 'moco-ff00']), stored(['swav']),
                  stored(['swav', 'moco'], seed=1), stored(['swav', 'moco'], size=64)):
        assert stored_fused_run(job, [other]) is None
