"""Small command-line helpers shared by the tools: the shared flags and config overrides, the common start of the
tools that train each task alone (:func:`study_parser`, :func:`study_setup`), one-line errors, progress output, the
summary table."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

EXIT_USER_ERROR = 2


def task_names() -> list[str]:
    """The registered pretext tasks (imports the task package: every task file registers itself)."""
    from pretext_tasks import task_names as registered

    return registered()


def add_run_arguments(parser) -> None:
    """The flags shared by run_curriculum.py and leaderboard.py (everything but --order/--seed/--work-dir/--init)."""
    parser.add_argument('--config', default=None, help='YAML config merged over configs/default.yaml')
    parser.add_argument('--dataset', default=None, help='pretext dataset (default synthetic_derm)')
    parser.add_argument('--data-root', default=None, help='folder (or .npz file) of the pretext dataset')
    parser.add_argument('--downstream', default=None, help='downstream dataset (default: the pretext dataset)')
    parser.add_argument('--downstream-root', default=None, help='data root of the downstream dataset')
    parser.add_argument('--work-root', default='work_dirs', help='holds the stage cache, results and Optuna store')
    parser.add_argument('--epochs', type=int, default=None, help='epochs of every stage (overrides the config)')
    parser.add_argument('--lr-trials', type=int, default=None, help='LR-search trials per stage (0 = no search)')
    parser.add_argument('--label-fraction', type=float, default=None, help='fraction of labeled train images')
    parser.add_argument('--protocols', default=None, help='any of linear,finetune,knn,dvme,uda')
    parser.add_argument('--fuse', nargs='+', default=None, metavar='RUN_DIR',
                        help='dvme: finished runs (or stage folders) whose final backbones are fused with this one')
    parser.add_argument('--target', default=None, help='uda: the unlabelled target dataset (a --dataset name)')
    parser.add_argument('--target-root', default=None, help='uda: data root of the target dataset')
    parser.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default=None)
    parser.add_argument('--amp', choices=('auto', 'bf16', 'fp16', 'none'), default=None,
                        help='precision of the backbone: auto (bf16 where the device supports it and, on a CPU, '
                             'where it measured faster), bf16, fp16 (CUDA), none (fp32); default from the config')
    parser.add_argument('--image-size', type=int, default=None)
    parser.add_argument('--results', default=None, help='results store URL (default sqlite under --work-root)')
    parser.add_argument('--optuna-storage', default=None, help='Optuna storage URL (default sqlite under --work-root)')
    parser.add_argument('--deterministic', action='store_true', help='deterministic kernels (exact resume)')
    parser.add_argument('--quiet', action='store_true', help='no progress bars')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, mmengine style (dotted keys, YAML values)')


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``; a ValueError naming the flag for anything else."""
    try:
        seeds = [int(part) for part in text.split(',') if part.strip()]
    except ValueError:
        raise ValueError(f'--seeds must be comma-separated integers, got {text!r}') from None
    if not seeds or any(seed < 0 for seed in seeds):
        raise ValueError(f'--seeds must be non-negative integers, got {text!r}')
    return seeds


def parse_fractions(text: str | None) -> list[float] | None:
    """``"1,0.1"`` → ``[1.0, 0.1]`` (None for None); a ValueError naming the flag for anything else."""
    if text is None:
        return None
    try:
        fractions = [float(part) for part in text.split(',') if part.strip()]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise ValueError(f'--label-fractions must be comma-separated numbers in (0, 1], got {text!r}')
    return fractions


def study_inputs(args, what: str) -> tuple[list[str], list[int]]:
    """The pretext tasks (``--tasks``) and seeds (``--seeds``) of a tool that trains each task alone for ``--epochs``
    (budget curves, the LR check); a PlanError / ValueError naming the flag otherwise. ``what``: what the epochs
    are the length of, for the message."""
    from .errors import PlanError

    if args.epochs is None:
        raise PlanError(f'--epochs is required: the length of {what}')
    seeds = parse_seeds(args.seeds)
    tasks = [task.strip() for task in args.tasks.split(',') if task.strip()]
    if not tasks or 'none' in tasks:
        raise PlanError('--tasks needs at least one pretext task (and not "none")')
    return tasks, seeds


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults-showing help that never cuts a word: a long default (the comma-separated list of every
    registered task) stays whole on its line instead of being split inside a task name."""

    def _split_lines(self, text, width):
        import textwrap

        text = self._whitespace_matcher.sub(' ', text).strip()
        return textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)


def study_parser(description: str, tool: str, tasks: str, seeds: str, seeds_help: str) -> argparse.ArgumentParser:
    """The flags of a tool that trains each task alone (``tools/<tool>.py``): ``--tasks`` (default ``tasks``),
    ``--seeds`` (default ``seeds``), ``--out``, the shared run flags, and ``--work-root`` defaulting to
    ``work_dirs/<tool>``. The tool may add its own flags."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument('--tasks', default=tasks, help='comma-separated pretext tasks')
    parser.add_argument('--seeds', default=seeds, help=seeds_help)
    parser.add_argument('--out', default=None, help=f'output folder (default docs/{tool}/<dataset>-<size>px)')
    add_run_arguments(parser)
    parser.set_defaults(work_root=os.path.join('work_dirs', tool))
    return parser


@dataclass
class Study:
    """What a tool that trains each task alone works from (made by :func:`study_setup`)."""

    args: argparse.Namespace
    tasks: list[str]
    seeds: list[int]
    #: dotted config overrides: the flags and --cfg-options, then the tool's own
    options: dict
    #: the config those overrides give (before any per-seed or per-task override)
    config: dict
    out_dir: str
    results_url: str

    def run(self, plan, name: str) -> dict:
        """Run one plan in ``<work root>/runs/<name>-amp_<amp>``, its stages cached under the work root."""
        from .run import run_curriculum

        work_dir = os.path.join(self.args.work_root, 'runs', f'{name}-amp_{plan.config.get("amp")}')
        return run_curriculum(plan, work_dir, self.args.work_root, self.results_url,
                              optuna_storage=self.args.optuna_storage)

    def write(self, write_report, report: dict) -> int:
        """Write ``report`` into the output folder with ``write_report(folder, report)`` (which returns the paths),
        print each path; the tool's exit status (0)."""
        for path in write_report(self.out_dir, report):
            print(f'written: {path}')
        return 0

    def settings(self, **extra) -> dict:
        """The report's ``settings``: dataset, data root, image size, epochs, seeds and tasks, then ``extra``."""
        config = self.config
        return {'dataset': config['dataset'], 'data_root': config.get('data_root'),
                'image_size': config['image_size'], 'epochs': int(self.args.epochs), 'seeds': self.seeds,
                'tasks': self.tasks, **extra}


def study_setup(args, tool: str, what: str, fixed: dict, defaults: dict | None = None) -> Study:
    """The common start of a tool that trains each task alone for ``--epochs`` (``tools/budget.py``,
    ``tools/lr_check.py``): CUDA hidden for ``--device cpu``; the tasks and seeds (:func:`study_inputs`; ``what`` is
    what the epochs are the length of); the config overrides (the flags and ``--cfg-options``, then ``defaults``
    where those leave a key unset, then ``fixed``) and the config they give; the output folder (``--out`` or
    ``docs/<tool>/<dataset>-<size>px``) and the results store (``--results`` or SQLite under ``--work-root``).
    A PlanError / ValueError names the flag or key at fault."""
    from .plan import load_config
    from .results import default_results_url

    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    tasks, seeds = study_inputs(args, what)
    options = config_overrides(args)
    for key, value in (defaults or {}).items():
        options.setdefault(key, value)
    options.update(fixed)
    config = load_config(args.config, options)
    out_dir = args.out or os.path.join('docs', tool, f'{config["dataset"]}-{config["image_size"]}px')
    return Study(args=args, tasks=tasks, seeds=seeds, options=options, config=config, out_dir=out_dir,
                 results_url=args.results or default_results_url(args.work_root))


def report_header(tool: str, argv) -> dict:
    """The provenance of a tool's report: its command line, the date (UTC) and the machine (CPU model, CPU count,
    torch version and threads)."""
    from datetime import datetime, timezone

    import torch

    from .precision import cpu_model

    return {'command': f'python tools/{tool}.py ' + ' '.join(argv if argv is not None else sys.argv[1:]),
            'date': datetime.now(timezone.utc).isoformat(timespec='seconds'),
            'machine': f'{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__} with '
                       f'{torch.get_num_threads()} threads'}


def provenance_lines(report: dict) -> list[str]:
    """The Markdown lines (hard line breaks) of a report's :func:`report_header` fields."""
    return [f'Command: `{report["command"]}`  ', f'Date: {report["date"]}  ', f'Machine: {report["machine"]}  ']


def config_overrides(args) -> dict:
    """Dotted config overrides from the shared flags and ``--cfg-options`` (flags win)."""
    options = parse_key_values(args.cfg_options, '--cfg-options')
    flags = {
        'dataset': args.dataset, 'data_root': args.data_root, 'downstream': args.downstream,
        'downstream_root': args.downstream_root, 'epochs': args.epochs, 'lr_search.trials': args.lr_trials,
        'evaluation.label_fraction': args.label_fraction, 'evaluation.protocols': args.protocols,
        'seed': getattr(args, 'seed', None), 'device': args.device, 'image_size': args.image_size,
        'amp': getattr(args, 'amp', None),
    }
    if getattr(args, 'fuse', None):
        flags['evaluation.fuse'] = [os.path.abspath(path) for path in args.fuse]
    flags['evaluation.uda.target'] = getattr(args, 'target', None)
    flags['evaluation.uda.target_root'] = getattr(args, 'target_root', None)
    options.update({key: value for key, value in flags.items() if value is not None})
    if args.deterministic:
        options['deterministic'] = True
    return options


def parse_key_values(pairs, flag: str) -> dict:
    """``KEY=VALUE`` strings as a dict, values read as YAML (safe loading; an empty value is None); a ValueError
    naming ``flag`` for an entry without ``=``."""
    import yaml

    parsed = {}
    for pair in pairs:
        if '=' not in pair:
            raise ValueError(f'{flag} entry {pair!r} is not KEY=VALUE')
        key, value = pair.split('=', 1)
        parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
    return parsed


def main_on_work_dir(args, run) -> int:
    """The entry of the tools that read a finished run's folder (``args.work_dir``): ``run(args)``, or one line
    on stderr and exit code 2 when the folder is missing or a user error is raised."""
    if not os.path.isdir(args.work_dir):
        return fail(FileNotFoundError(f'work dir not found: {args.work_dir}'))
    from .errors import USER_ERRORS

    try:
        return run(args)
    except USER_ERRORS as exc:
        return fail(exc)


def fail(exc: BaseException) -> int:
    """Print ``error: <one line>`` to stderr and return exit code 2."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f'error: {message}', file=sys.stderr)
    return EXIT_USER_ERROR


def progress_printer():
    """A progress callback: a tqdm bar per stage's iterations, one line per trial, epoch and stage."""
    from tqdm import tqdm

    state = {'bar': None, 'label': ''}

    def close_bar():
        if state['bar'] is not None:
            state['bar'].close()
            state['bar'] = None

    def callback(kind: str, step: int, total: int, info: dict) -> None:
        if kind == 'stage':
            close_bar()
            state['label'] = info.get('task', '')
            tqdm.write(f'[stage {step}/{total}] {info.get("task")} (key {info.get("key")})')
        elif kind == 'trial':
            tqdm.write(f'  lr trial {step}/{total}: lr={info["lr"]:.3g} score={info["score"]:.4f}')
        elif kind == 'lr_search':
            spread, noise = info.get('spread'), info.get('noise')
            if spread is not None and noise is not None:
                tqdm.write(f'  lr search: chose lr={info["lr"]:.3g}; trial spread {spread:.4f} vs noise {noise:.4f}'
                           f' ({"discriminates" if spread > noise else "does NOT discriminate"})')
        elif kind == 'iter':
            if state['bar'] is None or state['bar'].total != total:
                close_bar()
                state['bar'] = tqdm(total=total, desc=f'  {state["label"]}', unit='it', leave=False,
                                    mininterval=1.0, file=sys.stderr)
                state['bar'].update(step - 1)
            state['bar'].update(1)
        elif kind == 'epoch':
            parts = [f'  epoch {step}/{total}:' if step else f'  epoch 0/{total} (start):']
            if info.get('loss') is not None:
                parts.append(f'loss={info["loss"]:.4f}')
            if 'pretext_acc' in info:
                parts.append(f'pretext_acc={info["pretext_acc"]:.3f}')
            if 'knn' in info:
                parts.append(f'knn={info["knn"]:.3f}')
            tqdm.write(' '.join(parts))
        elif kind == 'downstream':
            close_bar()
            tqdm.write(f'[downstream] {info.get("dataset")}')
    return callback


def print_summary(result: dict, path: str) -> None:
    """A short Markdown-style table of stages and downstream metrics."""
    precision = result.get('precision') or {}
    print(f'\norder: {",".join(result["order"]) or "none"}   dataset: {result["dataset"]} -> '
          f'{result["downstream_dataset"]}   seed: {result["seed"]}   '
          f'label fraction: {result["label_fraction"]}   precision: {precision.get("used", "fp32")} '
          f'({precision.get("reason", "")})')
    if result['stages']:
        print('\n| stage | task | lr | epochs | first loss | final loss | seconds | cache hit |')
        print('|---|---|---|---|---|---|---|---|')
        for index, stage in enumerate(result['stages'], 1):
            first = '-' if stage.get('first_loss') is None else f'{stage["first_loss"]:.4f}'
            final = '-' if stage.get('final_loss') is None else f'{stage["final_loss"]:.4f}'
            print(f'| {index} | {stage["task"]} | {stage["lr"]:.3g} | {stage["epochs"]} | {first} | {final} | '
                  f'{stage["seconds"]:.1f} | {"yes" if stage["cache_hit"] else "no"} |')
    metrics = ('balanced_accuracy', 'accuracy', 'macro_f1', 'auc', 'kappa')
    print('\n| protocol | ' + ' | '.join(metrics) + ' |')
    print('|---|' + '---|' * len(metrics))
    for protocol, values in result['downstream'].items():
        cells = []
        for metric in metrics:
            value = values.get(metric)
            cells.append('-' if value is None else f'{value:.4f}')
        print(f'| {protocol} | ' + ' | '.join(cells) + ' |')
    print(f'\nresult: {path}  ({result["seconds"]:.0f} s)')
