#!/usr/bin/env python
"""Measure the engine's speed against the device's FLOP ceiling, across precisions, and against peers.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--out DIR] [--only ceiling,pretext,...]

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default out: ``benchmarks/results/<date>-<device>``):

* ``ceiling``: large-matmul FLOP/s of fp32 and bf16 measured in alternating rounds (``fp32_gflops``,
  ``bf16_gflops``; ``matmul_flops_per_s`` is the fp32 rate), ResNet-18 forward FLOPs per image, FLOP-bound
  training images/s;
* ``pretext.<task>``: images/s of our training step for every registered task on ResNet-18 (a task that needs
  patch tokens, iBOT, on the ViT below; ``pretext.<task>@vit-tiny`` for DINO also measures it on that ViT: DeiT-tiny
  with an 8 x 8 patch grid at the benchmark's image size; each entry names its ``backbone``) (data loading,
  augmentation, hooks and the optimiser included) in the default precision (``amp=auto``: whatever this machine resolves), and of the
  same step in fp32 (``fp32_images_per_s``, ``amp=none``) and bf16 (``bf16_images_per_s``), measured in
  alternating blocks; ``speedup_vs_fp32`` (default / fp32), ``bf16_speedup_vs_fp32``; FLOPs per image actually
  processed, fraction of the ceiling of the dtype the default step uses (``ceiling_dtype``), the bf16 step's
  fraction of the bf16 ceiling (``fraction_of_ceiling_bf16_step``) and a profile;
* ``peer.moco`` / ``peer.swav``: mmpretrain's own MoCo v2 / SwAV pipelines on the same images, measured side by
  side with ours; ``ratio.<task>`` = ours / peer;
* ``peer_lightly.moco`` / ``peer_lightly.swav``: the same algorithms as a lightly user writes them (lightly's heads,
  losses, momentum helpers and transforms in a plain PyTorch loop with a DataLoader), in the same alternating
  blocks; ``ratio_lightly.<task>`` = ours / lightly, with the precision of both sides;
* ``downstream.<protocol>``: seconds and images/s of the linear probe, kNN and fine-tuning (1 epoch) in the
  default precision, fp32 and bf16, their speed-ups and balanced accuracies;
* ``kmeans``: FAISS and plain torch k-means seconds;
* ``sweep``: stage runs and seconds of a leaderboard sweep with the prefix cache versus without;
* ``lr_search_fraction``: LR-search seconds / stage-training seconds from a real stage record;
* ``goals``: each goal, its measured value, whether the value reaches the target, and what limits it.

This file runs the measurements and writes the two files; the goals and their verdicts are
:mod:`curriculum.perf.goals`, the Markdown report :mod:`curriculum.perf.report`.

``--quick`` is a smoke test (small images, batches and iteration counts, a 2-task sweep, a 96-image downstream
set): its numbers are flagged and not comparable with a full run. Measurements on a shared machine are noisy: the
load average before and after is recorded, and the sides compared with each other are measured in alternating
blocks in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from curriculum.perf.goals import PEER_TASKS, evaluate_goals  # noqa: E402
from curriculum.perf.report import render_markdown  # noqa: E402

SECTIONS = ('ceiling', 'pretext', 'downstream', 'kmeans', 'sweep', 'lr_search_fraction')
#: sweep tasks in order of preference (relloc last: its patches go to the backbone at 32 px whatever the image
#: size, so it does not get cheaper with the sweep's tiny images)
SWEEP_PREFERENCE = ('rotation', 'moco', 'swav', 'odc', 'relloc')
#: fallback tasks for the LR-search measurement, cheapest default stage first (FLOPs per epoch)
LR_PREFERENCE = ('moco', 'odc', 'relloc', 'swav', 'rotation')

#: tasks measured on the vision transformer as well (their ResNet-18 step stays under pretext.<task>)
VIT_TASKS = ('dino',)
VIT_SUFFIX = '@vit-tiny'


def vit_backbone(image_size: int) -> dict:
    """The benchmark's vision transformer: mmpretrain's DeiT-tiny at ``image_size`` px with an 8 x 8 patch grid."""
    return dict(type='VisionTransformer', arch='deit-tiny', img_size=int(image_size),
                patch_size=max(1, int(image_size) // 8))


def pretext_entries(task: str, image_size: int) -> list[tuple[str, dict | None]]:
    """``(entry name, backbone config or None for ResNet-18)`` of one task's pretext measurements."""
    from pretext_tasks.registry import TASKS

    if getattr(TASKS.get(task), 'needs_patch_tokens', False):
        return [(task, vit_backbone(image_size))]
    return [(task, None)] + ([(f'{task}{VIT_SUFFIX}', vit_backbone(image_size))] if task in VIT_TASKS else [])


#: steps: timed steps per block; rounds: alternating blocks per side (ours, fp32, bf16, the peers); profile /
#: peer_profile: profiled steps of ours / of each peer
FULL = dict(image_size=64, batch_size=64, num_images=None, warmup=2, steps=2, rounds=2, profile=1, peer_profile=1,
            kmeans=dict(n=25_000, dim=256, k=1000, iters=20),
            downstream=dict(image_size=64, num_images=None, epochs={'finetune': 1}, rounds=1),
            sweep=dict(tasks=3, max_len=3, image_size=24, num_images=200, epochs=1), lr_quick=False)
QUICK = dict(image_size=32, batch_size=8, num_images=96, warmup=1, steps=1, rounds=1, profile=1, peer_profile=0,
             kmeans=dict(n=5_000, dim=64, k=100, iters=10),
             downstream=dict(image_size=32, num_images=96, epochs={'finetune': 1, 'linear': 20}, rounds=1),
             sweep=dict(tasks=2, max_len=2, image_size=16, num_images=64, epochs=1, batch_size=16), lr_quick=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smoke test: small sizes and iteration counts')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--out', default=None, help='output folder (default benchmarks/results/<date>-<device>)')
    parser.add_argument('--only', default=','.join(SECTIONS),
                        help=f'comma-separated sections to run (of {",".join(SECTIONS)}; pretext includes the '
                             f'precision variants and the peers)')
    parser.add_argument('--tasks', default=None, help='pretext tasks to measure (default: every registered task)')
    parser.add_argument('--sweep-tasks', default=None,
                        help=f'comma-separated tasks of the sweep; when unset, the first {FULL["sweep"]["tasks"]} '
                             f'({QUICK["sweep"]["tasks"]} with --quick) of {",".join(SWEEP_PREFERENCE)} that have '
                             f'a configs/tasks recipe')
    parser.add_argument('--lr-task', default='moco', help='task of the LR-search measurement')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
def leaderboard_main():
    """``main`` of ``tools/leaderboard.py`` (the sweep section measures that very command)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'leaderboard.py')
    spec = importlib.util.spec_from_file_location('_bench_leaderboard_tool', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def tasks_with_recipes(preference) -> list[str]:
    from curriculum.cli import task_names
    from curriculum.config_schema import recipe_path
    from curriculum.plan import CONFIG_DIR

    ordered = list(preference) + [t for t in task_names() if t not in preference]   # new tasks last
    return [t for t in ordered if os.path.isfile(recipe_path(t, CONFIG_DIR))]


def pretext_images(settings: dict):
    from benchmarks.datasets import load_dataset

    images = load_dataset('synthetic_derm', None, image_size=settings['image_size'], seed=0).unlabeled('train').images
    return images[:settings['num_images']] if settings['num_images'] else images


def run_section(name: str, results: dict, errors: dict, fn) -> None:
    """Run one measurement; a failure is recorded (and the run goes on) rather than ending the benchmark."""
    started = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # a broken task or peer must not hide the other numbers
        import traceback

        errors[name] = f'{type(exc).__name__}: {exc}'
        print(f'[benchmark] {name} FAILED: {errors[name]}', file=sys.stderr)
        traceback.print_exc()
    print(f'[benchmark] {name}: {time.perf_counter() - started:.0f} s', file=sys.stderr, flush=True)


def peer_ratio(ours: dict, peer: dict, name: str = 'peer') -> dict:
    """ours / peer images/s, per round, CPU-seconds view and the precision of both sides."""
    return {'value': ours['images_per_s'] / peer['images_per_s'],
            'ours_images_per_s': ours['images_per_s'], f'{name}_images_per_s': peer['images_per_s'],
            'rounds': list(zip(ours['round_images_per_s'], peer['round_images_per_s'])),
            'precision': {'ours': ours.get('precision'), name: peer.get('precision')},
            **cpu_ratio(ours, peer, name)}


def measure_all(args, settings: dict, command: str) -> dict:
    import torch

    from curriculum.perf import speed
    from curriculum.perf.speed_lightly import lightly_factory
    from curriculum.perf.speed_peer import peer_factory, peer_png_folder
    import pretext_tasks  # noqa: F401  (registers the tasks)

    device, quick = args.device, args.quick
    only = {s.strip() for s in args.only.split(',') if s.strip()}
    meta = lambda: speed.entry_meta(command, device, quick)  # noqa: E731
    out: dict = {'command': command, 'date': speed.now_iso(), 'quick': quick, 'device': device,
                 'machine': speed.machine_info(device), 'settings': settings,
                 'load_average': {'before': speed.load_average()}, 'uptime_before': _uptime(),
                 'pretext': {}, 'peer': {}, 'ratio': {}, 'peer_lightly': {}, 'ratio_lightly': {}, 'errors': {}}
    errors = out['errors']
    started = time.perf_counter()

    def ceiling():
        out['ceiling'] = {**speed.ceiling(device, quick, settings['image_size']), 'meta': meta()}
    run_section('ceiling', out, errors, ceiling)
    if out.get('ceiling'):
        rates = speed.ceiling_rates(out['ceiling'])
    else:
        rates = {name: r['flops_per_s'] for name, r in speed.matmul_rates(device).items()}

    if 'pretext' in only:
        images = pretext_images(settings)
        png_dir = None
        common = dict(device=device, batch_size=settings['batch_size'], warmup=settings['warmup'],
                      steps=settings['steps'], rounds=settings['rounds'], profile=settings['profile'])
        from curriculum.cli import task_names

        tasks = [t.strip() for t in (args.tasks or ','.join(task_names())).split(',') if t.strip()]
        for task, entry, backbone in [(t, *e) for t in tasks for e in pretext_entries(t, settings['image_size'])]:
            def one(task=task, entry=entry, backbone=backbone):
                nonlocal png_dir
                entry_meta = meta()
                peers = {}
                if task in PEER_TASKS and backbone is None:
                    if png_dir is None:
                        png_dir = peer_png_folder(images)
                    peers = {'peer': peer_factory(task, png_dir, settings['batch_size'], device),
                             'lightly': lightly_factory(task, images, settings['batch_size'], device)}
                ours, peer_results, peer_errors = speed.measure_task(task, images, rates, peers=peers,
                                                                     peer_profile=settings['peer_profile'],
                                                                     backbone_cfg=backbone, **common)
                out['pretext'][entry] = {**ours, 'meta': entry_meta}
                for name, error in peer_errors.items():
                    key = f'{"peer" if name == "peer" else "peer_lightly"}.{task}'
                    errors[key] = error
                    print(f'[benchmark] {key} FAILED: {error}', file=sys.stderr)
                if 'peer' in peer_results:
                    peer = peer_results['peer']
                    out['peer'][task] = {**peer, 'meta': entry_meta}
                    out['ratio'][task] = {**peer_ratio(ours, peer), 'meta': entry_meta}
                if 'lightly' in peer_results:
                    lightly = peer_results['lightly']
                    out['peer_lightly'][task] = {**lightly, 'meta': entry_meta}
                    out['ratio_lightly'][task] = {**peer_ratio(ours, lightly, 'lightly'), 'meta': entry_meta}
            run_section(f'pretext.{entry}', out, errors, one)
        if png_dir:
            import shutil
            shutil.rmtree(png_dir, ignore_errors=True)

    if 'downstream' in only:
        def downstream():
            from curriculum.perf.speed_downstream import measure_downstream

            cfg = settings['downstream']
            out['downstream'] = {**measure_downstream(cfg['image_size'], cfg['num_images'], device,
                                                      epochs=cfg['epochs'], rounds=cfg['rounds']),
                                 'meta': meta()}
        run_section('downstream', out, errors, downstream)

    if 'kmeans' in only:
        def kmeans():
            out['kmeans'] = {**speed.measure_kmeans(**settings['kmeans']), 'meta': meta()}
        run_section('kmeans', out, errors, kmeans)

    if 'sweep' in only:
        def sweep():
            from curriculum.perf.speed_sweep import measure_sweep

            sweep_cfg = settings['sweep']
            tasks = ([t.strip() for t in args.sweep_tasks.split(',')] if args.sweep_tasks
                     else tasks_with_recipes(SWEEP_PREFERENCE)[:sweep_cfg['tasks']])
            out['sweep'] = {**measure_sweep(tasks, min(sweep_cfg['max_len'], len(tasks)), sweep_cfg['image_size'],
                                            sweep_cfg['num_images'], leaderboard_main(), sweep_cfg['epochs'],
                                            batch_size=sweep_cfg.get('batch_size')), 'meta': meta()}
        run_section('sweep', out, errors, sweep)

    if 'lr_search_fraction' in only:
        def lr_fraction():
            from curriculum.perf.speed_sweep import measure_lr_search_fraction

            available = tasks_with_recipes((args.lr_task,) + LR_PREFERENCE)
            task = available[0] if available else args.lr_task
            entry = measure_lr_search_fraction(task, settings['lr_quick'])
            if task != args.lr_task:
                entry['note'] = f'{args.lr_task} has no configs/tasks recipe; measured {task} instead'
            out['lr_search_fraction'] = {**entry, 'meta': meta()}
        run_section('lr_search_fraction', out, errors, lr_fraction)

    out['total_seconds'] = time.perf_counter() - started
    out['load_average']['after'] = speed.load_average()
    out['uptime_after'] = _uptime()
    out['torch_threads'] = torch.get_num_threads()
    out['goals'] = evaluate_goals(out)
    return out


def cpu_ratio(ours: dict, peer: dict, name: str = 'peer') -> dict:
    """CPU seconds per image of both sides (the peer's loader workers included) and their ratio, peer / ours: a
    second view of the comparison that depends less on how much of the machine each side got."""
    ours_cpu = ours['cpu_seconds_per_step'] / ours['batch_size']
    peer_cpu = (peer['cpu_seconds_per_step'] + peer.get('worker_cpu_seconds_per_step', 0.0)) / peer['batch_size']
    return {'ours_cpu_seconds_per_image': ours_cpu, f'{name}_cpu_seconds_per_image': peer_cpu,
            'cpu_ratio': peer_cpu / ours_cpu if ours_cpu > 0 else None}


def _uptime() -> str:
    try:
        import subprocess
        return subprocess.run(['uptime'], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return ''


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == 'cpu':
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    import torch

    if args.device == 'cuda' and not torch.cuda.is_available():
        print('error: --device cuda requested but no CUDA device is available', file=sys.stderr)
        return 2
    settings = dict(QUICK if args.quick else FULL)
    out_dir = args.out or os.path.join('benchmarks', 'results',
                                       f'{datetime.now().strftime("%Y-%m-%d")}-{args.device}'
                                       f'{"-quick" if args.quick else ""}')
    os.makedirs(out_dir, exist_ok=True)
    command = 'python tools/benchmark.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
    from curriculum.perf.speed import quiet_logs

    with quiet_logs():
        out = measure_all(args, settings, command.strip())
    with open(os.path.join(out_dir, 'benchmark.json'), 'w') as handle:
        json.dump(out, handle, indent=2, default=str)
    markdown = render_markdown(out)
    with open(os.path.join(out_dir, 'benchmark.md'), 'w') as handle:
        handle.write(markdown)
    print(markdown)
    print(f'written: {os.path.join(out_dir, "benchmark.json")}, {os.path.join(out_dir, "benchmark.md")}')
    return 1 if out['errors'] else 0


if __name__ == '__main__':
    sys.exit(main())
