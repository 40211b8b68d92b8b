#!/usr/bin/env python
"""Grad-CAM (attention rollout for a vision transformer) of a run's fine-tuned model and its attention inside the ROI
masks of a dataset.

    python tools/attention.py --work-dir W [--dataset NAME --data-root PATH] [--masks DIR] [--out DIR]
        [--max-images 64] [--split test] [--target predicted|true] [--device auto|cpu|cuda]

Needs ``W/finetuned.pth`` (written when the run used ``--protocols finetune``). Images: the run's downstream
dataset (from ``W/result.json``) unless ``--dataset`` is given; ``--masks DIR`` takes masks from a folder matched by
file-name stem, and without ``--dataset`` the images are read directly from the ``--data-root`` folder (or its
``images/`` subfolder), e.g. the Shenzhen mini set. Writes ``<out>/attention.json`` and ``<out>/attention_grid.png``
(default out: ``W/attention``) and adds ``"attention"`` (mean, CI, dataset) to ``W/result.json`` and to the run's
record in the results store (when it has one). Bad input exits with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curriculum.finetuned import RESULT, read_result  # noqa: E402  (light: no torch)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--work-dir', required=True, help='run folder holding finetuned.pth (and result.json)')
    parser.add_argument('--dataset', default=None, help='dataset to explain (default: the run\'s downstream dataset)')
    parser.add_argument('--data-root', default=None, help='its data root, or a plain image folder with --masks')
    parser.add_argument('--masks', default=None, help='folder of ROI masks matched to the images by name stem')
    parser.add_argument('--out', default=None, help='output folder (default <work-dir>/attention)')
    parser.add_argument('--max-images', type=int, default=64, help='explain at most this many images')
    parser.add_argument('--split', default='test', choices=('train', 'val', 'test', 'all'),
                        help='dataset split (ignored for a plain image folder)')
    parser.add_argument('--target', default='predicted', choices=('predicted', 'true'),
                        help='class whose logit Grad-CAM explains (attention rollout is class-agnostic)')
    parser.add_argument('--image-size', type=int, default=None,
                        help='input size (default: the run\'s image_size from result.json, else 64)')
    parser.add_argument('--grid-images', type=int, default=8, help='rows of the overlay grid')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    return parser.parse_args(argv)


def dataset_source(args, result: dict | None) -> tuple[str, str | None, dict]:
    """Name, root and options of the dataset to explain: ``--dataset`` or the run's downstream dataset."""
    from benchmarks.attention import AttentionError

    config = (result or {}).get('config') or {}
    run_name = run_root = None
    run_options: dict = {}
    if config.get('dataset') or (result or {}).get('downstream_dataset'):
        run_name = config.get('downstream') or config.get('dataset') or result.get('downstream_dataset')
        run_root = config.get('downstream_root') if config.get('downstream') or config.get('downstream_root') \
            else config.get('data_root')
        run_options = config.get('downstream_options') or (
            config.get('dataset_options') if run_name == config.get('dataset') else {}) or {}
    if args.dataset is None:
        if run_name is None:
            raise AttentionError(f'no dataset: pass --dataset NAME (no usable {RESULT} in {args.work_dir})')
        return run_name, args.data_root or run_root, dict(run_options)
    if args.dataset == run_name and args.data_root is None:
        return run_name, run_root, dict(run_options)
    return args.dataset, args.data_root, {}


def update_result(work_dir: str, summary: dict) -> bool:
    """Add ``summary`` as ``"attention"`` to ``work_dir/result.json`` (atomic rewrite); False when there is none."""
    from benchmarks.files import write_json_atomic

    path = os.path.join(work_dir, RESULT)
    result = read_result(work_dir)
    if result is None:
        return False
    result['attention'] = summary
    write_json_atomic(path, result)
    if result.get('results_id') is not None:
        # keep the results store (what the leaderboard reads) in step with result.json
        from curriculum.results import default_results_url, update_run

        from curriculum.errors import EngineError

        work_root = result.get('work_root') or os.path.dirname(os.path.abspath(work_dir))
        url = result.get('results_url') or default_results_url(work_root)
        try:
            update_run(url, result['results_id'], result)
        except EngineError as exc:  # e.g. a password-protected store: result.json still holds the score
            print(f'note: results store not updated ({exc})')
    return True


def run(args) -> int:
    from benchmarks.attention import (AttentionError, analyse, inputs_from_dataset, inputs_from_folder,
                                      render_grid, report_dict)
    from benchmarks.files import write_json_atomic
    from curriculum.finetuned import checkpoint_path, load_finetuned

    work_dir = args.work_dir  # main_on_work_dir checked that it exists
    checkpoint = checkpoint_path(work_dir)
    if args.max_images < 1:
        raise AttentionError(f'--max-images must be at least 1, got {args.max_images}')
    result = read_result(work_dir)
    image_size = int(args.image_size or (result or {}).get('image_size') or 64)
    seed = int((result or {}).get('seed') or 0)

    if args.masks is not None and args.dataset is None:
        if args.data_root is None:
            raise AttentionError('--masks without --dataset needs --data-root (the folder of images)')
        inputs = inputs_from_folder(args.data_root, args.masks, image_size, args.max_images)
    else:
        from benchmarks.datasets import load_dataset

        name, root, options = dataset_source(args, result)
        dataset = load_dataset(name, root, image_size=image_size, seed=seed, **options)
        inputs = inputs_from_dataset(dataset, args.split, args.max_images, args.masks)
    if all(mask is None for mask in inputs.masks):
        where = f'in {args.masks}' if args.masks else f'in dataset {inputs.dataset}'
        raise AttentionError(f'no masks found {where} for the {len(inputs)} selected image(s)')

    import torch

    device = args.device
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    elif device == 'cuda' and not torch.cuda.is_available():
        raise AttentionError('--device cuda: no CUDA device available')
    backbone, head, classes = load_finetuned(checkpoint)
    outcome = analyse(backbone, head, inputs, device=device, target=args.target, class_names=classes)

    out_dir = args.out or os.path.join(work_dir, 'attention')
    os.makedirs(out_dir, exist_ok=True)
    model = {'work_dir': os.path.abspath(work_dir), 'order': (result or {}).get('order'),
             'seed': (result or {}).get('seed'), 'trained_on': (result or {}).get('downstream_dataset')}
    report = report_dict(outcome, inputs, model, args.target)
    json_path = os.path.join(out_dir, 'attention.json')
    order = model['order']
    label = ('none' if order == [] else ','.join(order)) if order is not None else os.path.basename(
        os.path.abspath(work_dir))
    grid_path = render_grid(inputs, outcome, os.path.join(out_dir, 'attention_grid.png'), args.grid_images,
                            title=f'{label} on {inputs.dataset} ({inputs.split})')
    report['grid'] = os.path.abspath(grid_path)
    write_json_atomic(json_path, report)

    updated = False
    if outcome.mean is not None:
        updated = update_result(work_dir, {'mean': outcome.mean, 'ci95': list(outcome.ci95),
                                           'dataset': inputs.dataset, 'split': inputs.split,
                                           'num_scored': len(outcome.scores), 'target': args.target,
                                           'ci_method': report['ci_method'], 'method': report['method'],
                                           'file': os.path.abspath(json_path)})
    mean = '-' if outcome.mean is None else f'{outcome.mean:.3f}'
    ci = '' if outcome.ci95[0] is None else f' (95% CI {outcome.ci95[0]:.3f}-{outcome.ci95[1]:.3f})'
    print(f'attention in ROI ({report["method"]}): {mean}{ci} over {len(outcome.scores)} of {len(inputs)} image(s) '
          f'of {inputs.dataset} ({inputs.split})')
    print(f'images without a mask: {len(outcome.missing_masks)}; skipped: {len(outcome.skipped)}'
          + ''.join(f'\n  skipped {s["name"]}: {s["reason"]}' for s in outcome.skipped[:10]))
    print(f'wrote {json_path} and {grid_path}')
    if updated:
        print(f'added "attention" to {os.path.join(work_dir, RESULT)} and its results-store record')
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from curriculum.cli import main_on_work_dir  # light import: the folder check runs before torch is loaded

    return main_on_work_dir(args, run)


if __name__ == '__main__':
    sys.exit(main())
