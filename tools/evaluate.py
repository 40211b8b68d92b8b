#!/usr/bin/env python
"""Apply a run's fine-tuned model to another dataset whose classes map onto the run's by name.

    python tools/evaluate.py --work-dir RUN --dataset NAME --data-root PATH [--split all|train|val|test]
        [--out FILE] [--device auto|cpu|cuda] [--amp auto|bf16|fp16|none] [--dataset-options KEY=VALUE ...]

Needs ``RUN/finetuned.pth`` (a run with ``--protocols finetune``) and ``RUN/result.json`` (image size, seed,
classes). Classes match when their names are equal ignoring case, or through the ISIC-2019 ↔ HAM10000 synonyms
(MEL-mel, NV-nv, BCC-bcc, AK-akiec, BKL-bkl, DF-df, VASC-vasc). Images of a class without a counterpart in the run
are left out and reported; the model's softmax is renormalised over the run classes that the dataset's classes map
to, and the metrics (with the bootstrap interval the engine gives its test metrics) run over the mapped classes.
All images of the dataset are scored by default (every split; ``--split`` picks one). Writes ``RUN/external.json``
(or ``--out``) and prints a Markdown summary. Bad input exits with code 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from curriculum.finetuned import RESULT, read_result  # noqa: E402  (light: no torch)

OUTPUT = 'external.json'
SPLITS = ('all', 'train', 'val', 'test')
#: ISIC-2019 class names and their HAM10000 ``dx`` codes (SCC and UNK have no HAM10000 counterpart)
SYNONYMS = (('MEL', 'mel'), ('NV', 'nv'), ('BCC', 'bcc'), ('AK', 'akiec'), ('BKL', 'bkl'), ('DF', 'df'),
            ('VASC', 'vasc'))
_CANONICAL = {name.lower(): isic.lower() for isic, ham in SYNONYMS for name in (isic, ham)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--work-dir', required=True, help='run folder holding finetuned.pth and result.json')
    parser.add_argument('--dataset', required=True, help='layout name of the dataset to score (as --dataset of a run)')
    parser.add_argument('--data-root', default=None, help='its data root (not needed by the built-in datasets)')
    parser.add_argument('--split', default='all', choices=SPLITS, help='images to score')
    parser.add_argument('--out', default=None, help=f'output file (default <work-dir>/{OUTPUT})')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto')
    parser.add_argument('--amp', choices=('auto', 'bf16', 'fp16', 'none'), default=None,
                        help='precision of the backbone (default: the amp the run requested, resolved here)')
    parser.add_argument('--dataset-options', nargs='+', default=None, metavar='KEY=VALUE',
                        help='layout options (default: the run\'s own when it is the run\'s downstream dataset)')
    parser.add_argument('--batch-size', type=int, default=256, help='images per forward pass')
    return parser.parse_args(argv)


# -- the run --------------------------------------------------------------------------------------------------
def read_run(work_dir: str) -> dict:
    """``work_dir/result.json``; one-line EngineError when it is missing, unreadable or has no image size."""
    from curriculum.errors import EngineError

    result = read_result(work_dir)
    if result is None:
        raise EngineError(f'no {RESULT} in {work_dir}: not a finished run of tools/run_curriculum.py '
                          f'(its image size and classes are needed)')
    if not isinstance(result, dict) or not result.get('image_size'):
        raise EngineError(f'{os.path.join(work_dir, RESULT)}: no image_size in the result file')
    return result


def run_downstream(result: dict) -> tuple[str | None, str | None, dict]:
    """Name, root and layout options of the run's downstream dataset (from its config)."""
    config = result.get('config') or {}
    name = config.get('downstream') or config.get('dataset') or result.get('downstream_dataset')
    own = not config.get('downstream') and not config.get('downstream_root')
    root = config.get('data_root') if own else config.get('downstream_root')
    options = config.get('downstream_options') or (config.get('dataset_options') if own else None) or {}
    return name, root, dict(options)


def dataset_options(args, result: dict) -> tuple[dict, bool]:
    """Layout options for ``--dataset`` and whether it is the run's own downstream dataset."""
    from curriculum.cli import parse_key_values
    from curriculum.errors import EngineError

    name, root, options = run_downstream(result)
    same_root = (root is None and args.data_root is None) or (
        root is not None and args.data_root is not None and os.path.abspath(root) == os.path.abspath(args.data_root))
    own = args.dataset == name and same_root
    if args.dataset_options is None:
        return (options if own else {}), own
    try:
        return parse_key_values(args.dataset_options, '--dataset-options'), own
    except ValueError as exc:
        raise EngineError(str(exc)) from None


# -- class mapping ----------------------------------------------------------------------------------------------
def canonical(name: str) -> str:
    """The key two class names match by: lower case, ISIC-2019 names and HAM10000 codes brought together."""
    return _CANONICAL.get(name.lower(), name.lower())


def map_classes(run_classes: list[str], classes: list[str]) -> dict[int, int]:
    """``{dataset class index: run class index}`` for every dataset class with a counterpart in the run.

    A class that matches several run classes, or two dataset classes that match one run class, is a one-line
    EngineError (the scores could not tell them apart)."""
    from curriculum.errors import EngineError

    mapping, owner = {}, {}
    for i, name in enumerate(classes):
        matches = [j for j, run_name in enumerate(run_classes) if canonical(run_name) == canonical(name)]
        if len(matches) > 1:
            raise EngineError(f'class {name!r} matches several run classes: '
                              f'{", ".join(run_classes[j] for j in matches)}')
        if matches:
            if matches[0] in owner:
                raise EngineError(f'classes {classes[owner[matches[0]]]!r} and {name!r} both map to run class '
                                  f'{run_classes[matches[0]]!r}')
            owner[matches[0]] = i
            mapping[i] = matches[0]
    return mapping


def restricted_scores(probabilities, columns: list[int]):
    """The run's class probabilities restricted to ``columns`` (in that order), renormalised to sum to one."""
    import numpy as np

    picked = np.asarray(probabilities, dtype=np.float64)[:, columns]
    return picked / np.clip(picked.sum(1, keepdims=True), 1e-30, None)


# -- scoring ------------------------------------------------------------------------------------------------------
def resolve(args, result: dict):
    """``(device, precision)``: the engine's device rule and the run's requested amp (or ``--amp``) resolved."""
    import torch

    from curriculum.errors import EngineError
    from curriculum.precision import resolve_precision
    from curriculum.run import resolve_device

    if args.device == 'cuda' and not torch.cuda.is_available():
        raise EngineError('--device cuda: no CUDA device available')
    device = resolve_device(args.device)
    config = result.get('config') or {}
    amp = args.amp or config.get('amp') or (result.get('precision') or {}).get('requested') or 'none'
    return device, resolve_precision(amp, device, config.get('channels_last', 'auto'))


def load_model(checkpoint: str, run_classes: list[str], device: str, precision):
    """The fine-tuned backbone and head as the engine's :class:`FineTunedModel` on ``device``, its backbone in the
    engine's ``precision``; a one-line CheckpointError when its classes are not those of result.json."""
    from benchmarks.protocols.finetune import FineTunedModel
    from curriculum.errors import CheckpointError
    from curriculum.finetuned import load_finetuned
    from curriculum.precision import apply_precision

    backbone, head, classes = load_finetuned(checkpoint)
    if (classes or run_classes) != run_classes or head.out_features != len(run_classes):
        raise CheckpointError(f'{checkpoint}: classes {classes or head.out_features} differ from those of '
                              f'{RESULT} {run_classes}')
    model = FineTunedModel(backbone, head.in_features, head.out_features)
    model.head = head
    model.to(device)
    return apply_precision(model, backbone, precision)


def external_metrics(y_true, scores, seed: int) -> dict:
    """The engine's test metrics (:func:`benchmarks.metrics.test_metrics`: the five metrics and the bootstrap
    interval of the headline, ``balanced_accuracy_ci``) plus ``<metric>_ci`` for the other four, from the same
    bootstrap resamples: each resample's metrics are computed once, then replayed through ``bootstrap_ci``."""
    from benchmarks.metrics import bootstrap_ci, classification_metrics, headline_metric, test_metrics

    headline = headline_metric(False)
    resampled: list[dict] = []

    def all_metrics(y, s) -> float:
        resampled.append(classification_metrics(y, s, s.shape[1]))
        return resampled[-1][headline]

    metrics = test_metrics(y_true, scores, multilabel=False, n_bootstrap=0)
    metrics[f'{headline}_ci'] = list(bootstrap_ci(y_true, scores, all_metrics, seed=seed))
    for key in ('accuracy', 'macro_f1', 'auc', 'kappa'):
        replay = iter([values[key] for values in resampled])
        metrics[f'{key}_ci'] = list(bootstrap_ci(y_true, scores, lambda y, s, replay=replay: next(replay), seed=seed))
    metrics['headline'] = headline
    return metrics


def evaluate(args) -> tuple[dict, list[str]]:
    """Score ``args.dataset`` with the run's fine-tuned model: the ``external.json`` content and the notes to
    print (the layout's own notes are the loader's warnings)."""
    import numpy as np

    from benchmarks.datasets import PreparedDataset, load_records
    from benchmarks.metrics import headline_metric
    from benchmarks.protocols.finetune import predict_scores
    from curriculum.errors import EngineError
    from curriculum.finetuned import checkpoint_path
    from curriculum.run import versions

    work_dir = args.work_dir
    checkpoint = checkpoint_path(work_dir)
    result = read_run(work_dir)
    finetune = (result.get('downstream') or {}).get('finetune') or {}
    if finetune.get('headline') == headline_metric(True):
        raise EngineError(f'the run in {work_dir} fine-tuned a multi-label model; tools/evaluate.py scores '
                          f'single-label models only')
    if args.batch_size < 1:
        raise EngineError(f'--batch-size must be at least 1, got {args.batch_size}')
    options, own = dataset_options(args, result)
    records = load_records(args.dataset, args.data_root, **options)
    if records.multilabel:
        raise EngineError(f'dataset {args.dataset!r} is multi-label; tools/evaluate.py scores single-label data only')
    run_classes = list(result.get('classes') or [])
    mapping = map_classes(run_classes, records.class_names)
    if len(mapping) < 2:
        found = 'no class' if not mapping else f'only one class ({records.class_names[next(iter(mapping))]})'
        raise EngineError(f'dataset {args.dataset!r} has {found} in common with the run '
                          f'(dataset: {", ".join(records.class_names)}; run: {", ".join(run_classes)}); '
                          f'metrics need at least two')
    device, precision = resolve(args, result)
    model = load_model(checkpoint, run_classes, device, precision)

    seed = int(result.get('seed') or 0)
    dataset = PreparedDataset(records, int(result['image_size']), seed)
    chosen = np.ones(len(dataset), bool) if args.split == 'all' else dataset.split == args.split
    mapped_classes = sorted(mapping)
    mapped = np.isin(dataset.labels, mapped_classes)
    counts = np.bincount(dataset.labels[chosen], minlength=dataset.num_classes)
    unmapped = {dataset.class_names[c]: int(counts[c]) for c in range(dataset.num_classes) if c not in mapping}
    indices = np.flatnonzero(chosen & mapped)
    if len(indices) == 0:
        raise EngineError(f'dataset {args.dataset!r} ({args.split}): no image of a class the run knows')

    probabilities = predict_scores(model, dataset.images, indices, device, args.batch_size)
    scores = restricted_scores(probabilities, [mapping[c] for c in mapped_classes])
    y_true = np.searchsorted(mapped_classes, dataset.labels[indices])
    metrics = external_metrics(y_true, scores, seed)

    notes = []
    if own and args.split != 'test':
        notes.append(f'{args.dataset} is the run\'s own downstream dataset: split {args.split!r} includes images '
                     f'the model was fine-tuned or selected on')
    return {
        'run': {'work_dir': os.path.abspath(work_dir), 'order': result.get('order'), 'seed': result.get('seed'),
                'label_fraction': result.get('label_fraction'), 'trained_on': result.get('downstream_dataset'),
                'image_size': int(result['image_size']), 'classes': run_classes,
                'test_metrics': {key: value for key, value in finetune.items() if key in metrics}},
        'dataset': args.dataset,
        'data_root': os.path.abspath(args.data_root) if args.data_root else None,
        'dataset_options': options,
        'split': args.split,
        'split_origin': dataset.split_origin,
        'n_images': int(len(indices)),
        'class_mapping': {dataset.class_names[c]: run_classes[mapping[c]] for c in mapped_classes},
        'class_counts': {dataset.class_names[c]: int(counts[c]) for c in mapped_classes},
        'unmapped_classes': unmapped,
        'n_left_out': int(sum(unmapped.values())),
        'run_classes_unused': [name for j, name in enumerate(run_classes) if j not in mapping.values()],
        'metrics': metrics,
        'device': device,
        'precision': precision.as_dict(),
        'notes': list(records.notes) + notes,
        'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'versions': versions(),
    }, notes


def summary(report: dict, path: str) -> str:
    """A short Markdown summary of ``report``."""
    run = report['run']
    order = run['order']
    label = ('none' if order == [] else ','.join(order)) if order is not None else os.path.basename(run['work_dir'])
    metrics = report['metrics']
    lines = [f'## {label} (seed {run["seed"]}, trained on {run["trained_on"]}) on {report["dataset"]} '
             f'({report["split"]})', '',
             f'{report["n_images"]} image(s) scored; left out (class not in the run): '
             + (', '.join(f'{name} {count}' for name, count in report['unmapped_classes'].items()) or 'none'), '',
             '| dataset class | run class | images |', '|---|---|---|']
    lines += [f'| {name} | {run_name} | {report["class_counts"][name]} |'
              for name, run_name in report['class_mapping'].items()]
    lines += ['', '| metric | value |', '|---|---|']
    for key in ('balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa'):
        low, high = metrics.get(f'{key}_ci') or (None, None)
        interval = f' (95% CI [{low:.4f}, {high:.4f}])' if low is not None and low == low else ''
        lines.append(f'| {key} | {metrics[key]:.4f}{interval} |')
    notes = [f'Note: {note}  ' for note in report['notes']]
    return '\n'.join(lines + [''] + notes + [f'wrote {path}'])


def run(args) -> int:
    from benchmarks.files import write_json_atomic

    report, notes = evaluate(args)
    left_out = {name: count for name, count in report['unmapped_classes'].items() if count}
    if left_out:
        print(f'note: left out {report["n_left_out"]} image(s) of classes the run does not know: '
              + ', '.join(f'{name} ({count})' for name, count in left_out.items()), file=sys.stderr)
    for note in notes:
        print(f'note: {note}', file=sys.stderr)
    path = args.out or os.path.join(args.work_dir, OUTPUT)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, report)
    print(summary(report, path))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from curriculum.cli import main_on_work_dir  # light import: the folder check runs before torch is loaded

    return main_on_work_dir(args, run)


if __name__ == '__main__':
    sys.exit(main())
