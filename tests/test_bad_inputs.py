"""Bad inputs to tools/run_curriculum.py, table-driven: every case ends with exit code 2 and one ``error:`` line on
stderr naming the problem, no traceback, nothing written (an earlier result.json in the work dir intact, no new
file or folder under the work root). Most cases run in-process through the tool's ``main`` (one import for all);
a few go through a real process, where a traceback or a stray line on stderr would show."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tool_loader import load_tool, tool_path
from layout_fixtures import write_csv, write_ham10000, write_image, write_image_folder, write_isic2019, write_medmnist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = tool_path('run_curriculum')
UNREACHABLE = 'postgresql://localhost:1/x'     # nothing listens on port 1


def snapshot(folder) -> dict:
    """Every file and folder below ``folder`` with its size and mtime (folders: None)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            out[os.path.join(root, name)] = None
        for name in files:
            stat = os.stat(os.path.join(root, name))
            out[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
    return out


def unwritable_folder(tmp) -> str:
    """An existing folder this process cannot write: read-only permissions, or (as root, who ignores them) a
    procfs folder."""
    if os.geteuid() == 0:
        return '/proc/self'
    folder = tmp / 'read_only'
    folder.mkdir()
    folder.chmod(0o555)
    return str(folder)


# -- fixtures of the cases: each returns the extra command-line arguments -----------------------------------------
def ham(tmp, edit=None):
    root = write_ham10000(str(tmp / 'ham'), count=28)
    if edit:
        edit(root)
    return ['--dataset', 'ham10000', '--data-root', root]


def ham_header_only(root):
    write_csv(os.path.join(root, 'HAM10000_metadata.csv'),
              ['lesion_id', 'image_id', 'dx', 'dx_type', 'age', 'sex', 'localization'], [])


def ham_empty_file(root):
    open(os.path.join(root, 'HAM10000_metadata.csv'), 'w').close()


def ham_without_dx(root):
    write_csv(os.path.join(root, 'HAM10000_metadata.csv'), ['lesion_id', 'image_id'],
              [['HAM_0000000', 'ISIC_0024306']])


def ham_missing_image(root):
    os.remove(os.path.join(root, 'images', 'ISIC_0024307.jpg'))


def isic(tmp, ones):
    root = write_isic2019(str(tmp / 'isic'), count=16)
    path = os.path.join(root, 'ISIC_2019_Training_GroundTruth.csv')
    with open(path) as handle:
        lines = handle.read().splitlines()
    values = ['1.0' if c in ones else '0.0' for c in range(9)]
    lines[1] = ','.join([lines[1].split(',')[0]] + values)
    with open(path, 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    return ['--dataset', 'isic2019', '--data-root', root]


def truncated_npz(tmp):
    path = write_medmnist(str(tmp / 'medmnist' / 'pneumoniamnist.npz'), sizes=(40, 10, 10))
    size = os.path.getsize(path)
    with open(path, 'r+b') as handle:
        handle.truncate(size // 2)
    return ['--dataset', 'medmnist', '--data-root', path, '--image-size', '16']


def corrupt_image(tmp):
    root = write_image_folder(str(tmp / 'folder'), splits=None, classes=('a', 'b'), per_class=6, empty_class=None)
    with open(os.path.join(root, 'a', 'img_000.jpg'), 'wb') as handle:
        handle.write(b'not a jpeg at all')
    return ['--dataset', 'image_folder', '--data-root', root]


def one_class_folder(tmp, count):
    root = str(tmp / f'one_class_{count}')
    for i in range(count):
        write_image(os.path.join(root, 'nevus', f'{i:04d}.png'), i)
    return ['--dataset', 'image_folder', '--data-root', root, '--order', 'rotation', '--lr-trials', '0']


def one_class_pretext_with_knn_scored_search(tmp):
    """Pretext data of one class (fine for SSL), a two-class downstream set, an LR search told to score by kNN."""
    args = one_class_folder(tmp, 100)
    downstream = write_image_folder(str(tmp / 'two_classes'), splits=None, classes=('a', 'b'), per_class=40,
                                    empty_class=None)
    return args + ['--downstream', 'image_folder', '--downstream-root', downstream, '--lr-trials', '2',
                   '--cfg-options', 'lr_search.objective=knn']


def class_only_in_test(tmp):
    root = str(tmp / 'split_tree')
    number = 0
    for split, classes in (('train', ('a', 'b')), ('valid', ('a', 'b')), ('test', ('a', 'b', 'c'))):
        for name in classes:
            for _ in range(4):
                write_image(os.path.join(root, split, name, f'{number:04d}.png'), number)
                number += 1
    return ['--dataset', 'image_folder', '--data-root', root]


def too_few_images_for_a_batch(tmp):
    root = write_image_folder(str(tmp / 'small'), splits=None, classes=('a', 'b'), per_class=10, empty_class=None)
    return ['--dataset', 'image_folder', '--data-root', root, '--order', 'rotation', '--lr-trials', '0']


def grayscale_without_groups(tmp) -> list[str]:
    """A MedMNIST npz (one channel, no patient ids) as the pretext data."""
    npz = write_medmnist(os.path.join(str(tmp), 'pneumoniamnist.npz'), sizes=(80, 20, 20))
    return ['--dataset', 'medmnist', '--data-root', npz, '--image-size', '16']


def config_file(tmp, text):
    path = tmp / 'user.yaml'
    path.write_text(text)
    return ['--config', str(path)]


class _Payload:
    """Unpickling this runs a shell command (a malicious "weights" file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def malicious_init(tmp):
    import torch

    path = str(tmp / 'weights.pth')
    torch.save({'conv1.weight': _Payload(str(tmp / 'EXECUTED'))}, path)
    return ['--init', path]


def mismatched_init(tmp):
    import torch

    path = str(tmp / 'other.pth')
    torch.save({'encoder.conv.weight': torch.zeros(4, 3, 3, 3)}, path)
    return ['--init', path]


def file_in(tmp):
    path = tmp / 'a_file'
    path.write_text('not a folder')
    return str(path)


def not_a_database(tmp):
    path = tmp / 'results.txt'
    path.write_text('plain text')
    return ['--results', f'sqlite:///{path}']


#: a DeiT-tiny at the default 64 px with 8 px patches
VIT_OPTIONS = ['backbone.type=VisionTransformer', 'backbone.arch=deit-tiny', 'backbone.img_size=64',
               'backbone.patch_size=8']


def pneumonia_target(tmp):
    return ['--protocols', 'uda', '--target', 'medmnist',
            '--target-root', write_medmnist(str(tmp / 'target' / 'pneumoniamnist.npz'), sizes=(20, 6, 8))]


def fuse_run_without_its_backbone(tmp):
    """A run folder whose result.json names a last stage that the stage cache no longer holds."""
    run = tmp / 'old_run'
    run.mkdir()
    (run / 'result.json').write_text(json.dumps({
        'order': ['odc'], 'seed': 0, 'work_root': str(tmp / 'moved_root'),
        'stages': [{'task': 'odc', 'key': '0123456789abcdef', 'stage_dir': str(tmp / 'gone' / 'odc-0123')}]}))
    return ['--protocols', 'dvme', '--fuse', str(run)]


def fuse_empty_folder(tmp):
    (tmp / 'empty').mkdir()
    return ['--protocols', 'dvme', '--fuse', str(tmp / 'empty')]


#: (id, builder(tmp) -> extra args, fragment of the one error line)
CASES = [
    # orders, flags, values
    ('unknown task', lambda t: ['--order', 'odc,bogus'], "unknown pretext task 'bogus'"),
    ('repeated task', lambda t: ['--order', 'odc,odc'], "task 'odc' appears more than once"),
    ('empty order', lambda t: ['--order', ''], '--order is empty'),
    ('none with tasks', lambda t: ['--order', 'none,odc'], '"none" cannot be combined'),
    ('inverted lr range', lambda t: ['--cfg-options', 'tasks.odc.lr_range=[0.1,0.01]'],
     'lr_range low 0.1 must be below high'),
    ('epochs 0', lambda t: ['--epochs', '0'], 'epochs must be a positive integer'),
    ('epochs -1', lambda t: ['--epochs', '-1'], 'epochs must be a positive integer, got -1'),
    ('lr trials -2', lambda t: ['--lr-trials', '-2'], 'lr_search.trials must be a non-negative integer, got -2'),
    ('label fraction 0', lambda t: ['--label-fraction', '0'], 'label_fraction must be a positive number'),
    ('label fraction 1.5', lambda t: ['--label-fraction', '1.5'], 'label_fraction must be in (0, 1]'),
    ('label fraction -1', lambda t: ['--label-fraction', '-1'], 'label_fraction must be a positive number'),
    ('image size 0', lambda t: ['--image-size', '0'], 'image_size must be a positive integer, got 0'),
    ('image size 7', lambda t: ['--image-size', '7'], 'image_size must be between 16 and 1024, got 7'),
    ('relloc grid too big', lambda t: ['--order', 'moco,relloc', '--image-size', '28'],
     'needs 29 px, the crop has 28 px'),
    ('moco momentum out of range', lambda t: ['--order', 'moco', '--cfg-options', 'tasks.moco.momentum=1.5'],
     'moco: momentum must be in [0.5, 1)'),
    ('swav with one global crop', lambda t: ['--order', 'swav', '--cfg-options', 'tasks.swav.global_crops=1'],
     'swav: needs global_crops >= 2'),
    ('colorme on grayscale data', lambda t: grayscale_without_groups(t) + ['--order', 'rotation,colorme'],
     'colorme: predicts colour, and the training images of medmnist are grayscale'),
    ('micle without group ids', lambda t: grayscale_without_groups(t) + ['--order', 'rotation,micle'],
     'micle: needs group ids (patient or lesion) of the training images, and dataset medmnist has none'),
    ('odc unknown head init', lambda t: ['--cfg-options', 'tasks.odc.head_init=zeros'],
     "odc: head_init must be 'random' or 'centroids', got 'zeros'"),
    ('rotation probability not a number', lambda t: ['--order', 'rotation', '--cfg-options', 'tasks.rotation.flip_p=x'],
     "rotation: flip_p must be a number, got 'x'"),
    ('unknown protocol', lambda t: ['--protocols', 'linear,svm'], "unknown protocol 'svm'"),
    ('seed not a number', lambda t: ['--cfg-options', 'seed=abc'], "seed must be a non-negative integer, got 'abc'"),
    ('lr not a number', lambda t: ['--cfg-options', 'tasks.odc.lr=fast'], "odc: lr must be a number, got 'fast'"),
    ('cfg option without =', lambda t: ['--cfg-options', 'seed'], "--cfg-options entry 'seed' is not KEY=VALUE"),
    # backbones: a task that needs what the backbone does not give, a backbone its class cannot build
    ('ibot on a ResNet', lambda t: ['--order', 'ibot'],
     'ibot: needs the patch tokens of a vision transformer, and the backbone ResNet has none'),
    ('colorme on a ViT', lambda t: ['--order', 'colorme', '--cfg-options', *VIT_OPTIONS],
     'colorme: needs convolutional feature maps (N, C, H, W) from the backbone, and VisionTransformer returns '
     '(N, 192)'),
    ('relloc patches smaller than a ViT patch',
     lambda t: ['--order', 'relloc', '--cfg-options', *VIT_OPTIONS[:3], 'backbone.patch_size=48'],
     'relloc: feeds its backbone 32 px inputs, smaller than one 48 px patch of VisionTransformer'),
    ('ResNet option on a ViT', lambda t: ['--cfg-options', 'backbone.type=VisionTransformer', 'backbone.depth=12'],
     "backbone 'VisionTransformer' cannot be built from"),
    ('unknown ViT arch', lambda t: ['--cfg-options', 'backbone.type=VisionTransformer', 'backbone.arch=deit-giant'],
     'Arch deit-giant is not in default archs'),
    # config files and keys
    ('missing config file', lambda t: ['--config', 'missing.yaml'], 'config file not found: missing.yaml'),
    ('yaml python tag', lambda t: config_file(t, 'seed: !!python/object/apply:os.system ["touch EXECUTED"]\n'),
     'invalid YAML'),
    ('misspelt key', lambda t: ['--cfg-options', 'lr_serach.trials=3'],
     "unknown config key 'lr_serach.trials' (did you mean 'lr_search.trials'?)"),
    ('unknown task option', lambda t: ['--cfg-options', 'tasks.rotation.no_such_key=3'],
     "unknown config key 'tasks.rotation.no_such_key'"),
    ('misspelt task', lambda t: ['--cfg-options', 'tasks.rotaton.epochs=1'],
     "unknown config key 'tasks.rotaton.epochs' (did you mean 'tasks.rotation.epochs'?)"),
    ('misspelt key in a config file', lambda t: config_file(t, 'lr_search:\n  trails: 3\n'),
     "unknown config key 'lr_search.trails' (did you mean 'lr_search.trials'?)"),
    # data
    ('unknown dataset', lambda t: ['--dataset', 'nope'], "unknown dataset 'nope'"),
    ('missing data root', lambda t: ['--dataset', 'isic2019', '--data-root', '/nonexistent/isic'],
     '/nonexistent/isic'),
    ('unknown dataset option', lambda t: ham(t) + ['--cfg-options', 'dataset_options.colour=1'],
     "dataset 'ham10000': unknown option(s) colour"),
    ('HAM10000 csv header only', lambda t: ham(t, ham_header_only), 'HAM10000_metadata.csv: has a header but no data'),
    ('empty csv', lambda t: ham(t, ham_empty_file), 'HAM10000_metadata.csv: missing column(s) lesion_id'),
    ('missing csv column', lambda t: ham(t, ham_without_dx), 'HAM10000_metadata.csv: missing column(s) dx'),
    ('missing image', lambda t: ham(t, ham_missing_image), 'image ISIC_0024307 not found'),
    ('corrupt image', corrupt_image, 'cannot decode image'),
    ('ISIC row with zero ones', lambda t: isic(t, ()), 'is not one-hot'),
    ('ISIC row with two ones', lambda t: isic(t, (0, 1)), 'is not one-hot'),
    ('truncated MedMNIST npz', truncated_npz, 'pneumoniamnist.npz'),
    ('one class, 100 images', lambda t: one_class_folder(t, 100), "hold 1 class ['nevus']; a classifier needs"),
    ('one class, 40 images', lambda t: one_class_folder(t, 40), "hold 1 class ['nevus']; a classifier needs"),
    ('one-class pretext data, kNN-scored LR search', one_class_pretext_with_knn_scored_search,
     "lr_search.objective=knn cannot rank learning rates on this pretext data: "),
    ('class only in test', class_only_in_test, "class 'c' has test images but no labeled training image"),
    ('batch larger than the data', too_few_images_for_a_batch, 'rotation: batch size 64 exceeds the'),
    # weights
    ('init not found', lambda t: ['--init', '/nonexistent/weights.pth'], 'not found: /nonexistent/weights.pth'),
    ('malicious pickle as init', malicious_init, 'cannot be loaded weights-only'),
    ('init of another network', mismatched_init, 'weights do not match the configured backbone'),
    # folders and stores
    ('work dir under a file', lambda t: ['--work-dir', os.path.join(file_in(t), 'run')], 'which is a file'),
    ('work dir not writable', lambda t: ['--work-dir', unwritable_folder(t)], 'is not writable'),
    ('work dir under a read-only folder', lambda t: ['--work-dir', os.path.join(unwritable_folder(t), 'run')],
     'is not writable'),
    ('work root under a file', lambda t: ['--work-root', os.path.join(file_in(t), 'root')], 'which is a file'),
    ('results store unreachable', lambda t: ['--results', UNREACHABLE], 'cannot open results store'),
    ('results store not a database', not_a_database, 'file is not a database'),
    ('Optuna storage unreachable', lambda t: ['--optuna-storage', UNREACHABLE], 'cannot open Optuna storage'),
    # protocols dvme and uda
    ('dvme without --fuse', lambda t: ['--protocols', 'dvme'], 'name them with --fuse RUN_DIR'),
    ('--fuse without dvme', lambda t: ['--fuse', str(t)], 'add dvme to --protocols'),
    ('--fuse folder missing', lambda t: ['--protocols', 'dvme', '--fuse', '/nonexistent/run'],
     '--fuse /nonexistent/run: no such folder'),
    ('--fuse folder without a backbone', fuse_empty_folder, 'not a run folder (no result.json) nor a stage folder'),
    ('--fuse run whose backbone is gone', fuse_run_without_its_backbone, 'odc-0123/backbone.pth is missing'),
    ('uda without a target', lambda t: ['--protocols', 'uda'], 'protocol uda needs the unlabelled target dataset'),
    ('--target without uda', lambda t: ['--target', 'medmnist'], 'add uda to --protocols'),
    ('uda target missing', lambda t: ['--protocols', 'uda', '--target', 'medmnist', '--target-root',
                                      '/nonexistent/pneumoniamnist.npz'], '/nonexistent/pneumoniamnist.npz'),
    ('uda target sharing no class', pneumonia_target, 'share 0 class(es) by name'),
    ('uda class_map to an unknown class', lambda t: pneumonia_target(t) + [
        '--cfg-options', 'evaluation.uda.class_map={MEL: covid}'], "class_map: 'covid' is not a target class"),
    ('unknown uda method', lambda t: pneumonia_target(t) + ['--cfg-options', 'evaluation.uda.method=coral'],
     'evaluation.uda.method must be one of source_only, dann, dcan, dcan_noreg'),
    ('misspelt uda option', lambda t: ['--cfg-options', 'evaluation.uda.metod=dann'],
     "unknown config key 'evaluation.uda.metod' (did you mean 'evaluation.uda.method'?)"),
]


@pytest.mark.parametrize('builder, fragment', [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, builder, fragment):
    work_root = tmp_path / 'root'
    existing = work_root / 'odc'
    existing.mkdir(parents=True)
    (existing / 'result.json').write_text('{"keep": true}')
    args = builder(tmp_path)
    before = snapshot(work_root)
    # the case's own --order / --work-dir / --work-root come last and win
    code = load_tool('run_curriculum').main(['--work-root', str(work_root), '--work-dir', str(existing), '--order', 'odc',
                               '--quiet', *args])
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], stderr
    assert 'Traceback' not in stderr
    assert snapshot(work_root) == before
    assert (existing / 'result.json').read_text() == '{"keep": true}'
    assert not (tmp_path / 'EXECUTED').exists() and not os.path.exists('EXECUTED')   # nothing was unpickled


def test_the_table_has_the_cases_the_issue_lists():
    assert len(CASES) >= 25
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize('builder', [
    malicious_init, lambda t: one_class_folder(t, 40),
    lambda t: grayscale_without_groups(t) + ['--order', 'rotation,colorme'],
    lambda t: grayscale_without_groups(t) + ['--order', 'rotation,micle'],
], ids=['init', 'one class', 'colorme on grayscale', 'micle without groups'])
def test_a_failed_start_leaves_no_work_dir(tmp_path, capsys, builder):
    work_root = tmp_path / 'root'
    code = load_tool('run_curriculum').main(['--work-root', str(work_root), '--order', 'odc', '--quiet', *builder(tmp_path)])
    assert code == 2, capsys.readouterr().err
    assert not work_root.exists()


@pytest.mark.parametrize('builder, fragment', [
    (lambda t: ['--order', 'odc,bogus'], "unknown pretext task 'bogus'"),
    (truncated_npz, 'pneumoniamnist.npz'),
    (lambda t: ['--results', UNREACHABLE, '--cfg-options', 'lr_search.trials=3'], 'cannot open results store'),
], ids=['order', 'truncated npz', 'unreachable store'])
def test_bad_input_through_a_real_process_exits_2_with_one_line(tmp_path, builder, fragment):
    work_root = tmp_path / 'root'
    proc = subprocess.run([sys.executable, TOOL, '--work-root', str(work_root), '--quiet', *builder(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED='1'))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], proc.stderr
    assert not work_root.exists()


def free_local_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize('flags, fragment', [
    (lambda: ['--backend', 'ray', '--ray-address', f'127.0.0.1:{free_local_port()}'], 'cannot reach Ray at 127.0.0.1:'),
    (lambda: ['--backend', 'ray', '--gpus-per-stage', '64'], 'GPUs: a stage asking for 1 CPUs and 64 GPUs would never'),
    (lambda: ['--backend', 'ray', '--cpus-per-stage', '0'], '--cpus-per-stage must be positive'),
    (lambda: ['--backend', 'local', '--ray-address', 'auto'], '--ray-address and --gpus-per-stage need --backend ray'),
    (lambda: ['--retries', '-1'], '--retries must be at least 0'),
], ids=['unreachable address', 'GPUs the cluster lacks', 'no CPUs', 'address without ray',
        'negative retries'])
def test_bad_sweep_backend_flags_exit_2_with_one_line_and_nothing_written(tmp_path, flags, fragment):
    """A sweep whose backend cannot work fails at once (an unreachable Ray address is not retried for minutes), with
    one line (none of Ray's start-up logging) and nothing written: the work root's earlier contents stay as they
    were, and a fresh work root is not made."""
    pytest.importorskip('ray')
    kept = tmp_path / 'root'
    (kept / 'odc').mkdir(parents=True)
    (kept / 'odc' / 'result.json').write_text('{"keep": true}')
    before = snapshot(kept)
    import shutil
    import tempfile

    # Ray's own temporary folder (short: its Unix sockets live there), apart from the clusters other tests start
    ray_tmp = tempfile.mkdtemp(prefix='ray', dir='/tmp')
    try:
        for work_root in (kept, tmp_path / 'fresh'):
            proc = subprocess.run([sys.executable, tool_path('leaderboard'), '--tasks', 'rotation,relloc',
                                   '--max-len', '1', '--work-root', str(work_root), '--quiet', *flags()],
                                  capture_output=True, text=True, cwd=REPO, timeout=240,
                                  env=dict(os.environ, PYTHONUNBUFFERED='1', RAY_TMPDIR=ray_tmp))
            assert proc.returncode == 2, proc.stderr
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], proc.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert snapshot(kept) == before
    assert not (tmp_path / 'fresh').exists()
