"""tools/budget.py on a tiny built-in set: the three files, the curve of every task from epoch 0, one-line errors."""
from __future__ import annotations

import json

from tool_loader import load_tool

TINY = ['--image-size', '32', '--epochs', '2', '--seeds', '0', '--quiet', '--cfg-options',
        'dataset_options.num_images=480', 'tasks.rotation.batch_size=32', 'tasks.moco.batch_size=32',
        'monitor.max_images=200',
        'backbone={type: ResNet, depth: 18, base_channels: 16, stem_channels: 16, out_indices: [3]}']


def test_budget_writes_json_markdown_and_plot_with_a_curve_per_task(tmp_path):
    out = tmp_path / 'out'
    code = load_tool('budget').main(['--tasks', 'rotation,moco', '--work-root', str(tmp_path / 'root'), '--out', str(out),
                               *TINY])
    assert code == 0
    report = json.loads((out / 'budget.json').read_text())
    assert set(report['summary']) == {'rotation', 'moco'}
    starts = set()
    for task, row in report['summary'].items():
        assert row['epochs'] == [0, 1, 2]
        assert len(row['mean_knn']) == 3 and all(0 <= v <= 1 for v in row['mean_knn'])
        assert row['minutes_per_epoch'] > 0
        starts.add(row['random_init'])
    assert len(starts) == 1            # one random initialisation for every task of a seed
    markdown = (out / 'budget.md').read_text()
    assert '| rotation |' in markdown and '| moco |' in markdown
    assert (out / 'budget.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # a second call reads every stage back from the cache: same curves
    again = tmp_path / 'again'
    assert load_tool('budget').main(['--tasks', 'rotation,moco', '--work-root', str(tmp_path / 'root'), '--out',
                               str(again), *TINY]) == 0
    assert json.loads((again / 'budget.json').read_text())['summary'] == report['summary']


def test_budget_protocols_evaluate_final_backbones_and_random_init_beside_another_report(tmp_path):
    """--protocols: each curve's final backbone and the seed's random initialisation on the test split (with a
    CI); --beside: another report's curves (here a narrower ResNet) in the tables, at equal training minutes."""
    budget = load_tool('budget')
    narrow = [*TINY[:-1], 'backbone={type: ResNet, depth: 18, base_channels: 8, stem_channels: 8, out_indices: [3]}']
    assert budget.main(['--tasks', 'rotation', '--work-root', str(tmp_path / 'root'), '--out', str(tmp_path / 'narrow'),
                        *narrow]) == 0
    out = tmp_path / 'out'
    assert budget.main(['--tasks', 'moco', '--work-root', str(tmp_path / 'root'), '--out', str(out), '--protocols',
                        'knn', '--beside', str(tmp_path / 'narrow'), *TINY]) == 0
    report = json.loads((out / 'budget.json').read_text())
    knn = report['summary']['moco']['downstream']['knn']
    assert 0 <= knn['low'] <= knn['mean'] <= knn['high'] <= 1 and knn['interval'] == 'bootstrap over test images'
    init = report['random_init_downstream']['knn']
    assert 0 <= init['mean'] <= 1 and init['per_seed'] == [init['mean']]
    # the curve's test kNN is its own final backbone's, not the random initialisation's
    run = json.loads(next((tmp_path / 'root' / 'runs').glob('moco-seed0-*/result.json')).read_text())
    assert knn['mean'] == run['downstream']['knn']['balanced_accuracy']
    assert [other['backbone'] for other in report['beside']] == ['ResNet-18 (width 8)']
    markdown = (out / 'budget.md').read_text()
    assert '| rotation | ResNet-18 (width 8) |' in markdown and '| moco | ResNet-18 (width 16) |' in markdown
    assert '| random init | ResNet-18 (width 16) | 0 | 0 |' in markdown
    assert 'At equal training minutes' in markdown
    # a report made on another dataset, or no report at all: one line, exit 2, nothing written
    for beside, fragment in ((tmp_path / 'missing', 'no budget report'), (out, "its curves are on 'synthetic_derm'")):
        args = ['--tasks', 'moco', '--work-root', str(tmp_path / 'root2'), '--out', str(tmp_path / 'bad'),
                '--beside', str(beside), *TINY]
        if 'curves are on' in fragment:
            args += ['--dataset', 'synthetic_cxr']
        assert budget.main(args) == 2
    assert not (tmp_path / 'bad').exists() and not (tmp_path / 'root2').exists()


def test_budget_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for args, fragment in ((['--tasks', 'rotation'], '--epochs is required'),
                           (['--tasks', 'bogus', '--epochs', '1'], "unknown pretext task 'bogus'"),
                           (['--tasks', 'rotation', '--epochs', '1', '--seeds', 'a'], '--seeds must be'),
                           (['--tasks', 'rotation,ibot', '--epochs', '1'],
                            'ibot: needs the patch tokens of a vision transformer')):
        code = load_tool('budget').main([*args, '--work-root', str(tmp_path), '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'runs').exists()


def test_budget_curves_by_default_every_task_the_default_backbone_can_train():
    from pretext_tasks.registry import task_names

    defaults = load_tool('budget').parse_args([]).tasks.split(',')
    assert 'dino' in defaults and 'ibot' not in defaults                 # iBOT needs a ViT: only with --tasks
    assert set(defaults) == set(task_names()) - {'ibot'}
