#!/usr/bin/env python
"""Measure the engine's speed against the device's FLOP ceiling, across precisions, and against peers.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--out DIR] [--only ceiling,pretext,...]

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default out: ``benchmarks/results/<date>-<device>``):

* ``ceiling``: large-matmul FLOP/s of fp32 and bf16 measured in alternating rounds (``fp32_gflops``,
  ``bf16_gflops``; ``matmul_flops_per_s`` is the fp32 rate), ResNet-18 forward FLOPs per image, FLOP-bound
  training images/s;
* ``pretext.<task>``: images/s of our training step for the five tasks (data loading, augmentation, hooks and
  the optimiser included) in the default precision (``amp=auto``: whatever this machine resolves), and of the
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

SECTIONS = ('ceiling', 'pretext', 'downstream', 'kmeans', 'sweep', 'lr_search_fraction')
#: sweep tasks in order of preference (relloc last: its patches go to the backbone at 32 px whatever the image
#: size, so it does not get cheaper with the sweep's tiny images)
SWEEP_PREFERENCE = ('rotation', 'moco', 'swav', 'odc', 'relloc')
#: fallback tasks for the LR-search measurement, cheapest default stage first (FLOPs per epoch)
LR_PREFERENCE = ('moco', 'odc', 'relloc', 'swav', 'rotation')
#: the targets: ours / mmpretrain (ratio), ours / lightly (ratio_lightly), fraction of the ceiling of the dtype
#: used (for FRACTION_TASKS), default precision / fp32 of every pretext step (speedup) and of every downstream
#: protocol (downstream_speedup), sweep stage runs with / without cache, LR-search share of a stage
GOALS = {'ratio': 2.0, 'ratio_lightly': 1.2, 'fraction': 0.35, 'speedup': 2.0, 'downstream_speedup': 1.8,
         'sweep': 0.5, 'lr': 0.2}
FRACTION_TASKS = ('moco', 'odc', 'rotation')
LOADER_NOTE = ('Loader workers: before every timed block the peers\' loader workers are left to finish prefetching '
               '(untimed), so that no side\'s block pays for another side\'s data loading; the part of a peer\'s data '
               'loading done in those waits is not in its images/s (which flatters the peer), but it is in its CPU '
               'seconds (CPU ratio, workers included).')
PEER_TASKS = ('moco', 'swav')
DOWNSTREAM_PROTOCOLS = ('linear', 'knn', 'finetune')

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

        for task in [t.strip() for t in (args.tasks or ','.join(task_names())).split(',') if t.strip()]:
            def one(task=task):
                nonlocal png_dir
                entry_meta = meta()
                peers = {}
                if task in PEER_TASKS:
                    if png_dir is None:
                        png_dir = peer_png_folder(images)
                    peers = {'peer': peer_factory(task, png_dir, settings['batch_size'], device),
                             'lightly': lightly_factory(task, images, settings['batch_size'], device)}
                ours, peer_results, peer_errors = speed.measure_task(task, images, rates, peers=peers,
                                                                     peer_profile=settings['peer_profile'], **common)
                out['pretext'][task] = {**ours, 'meta': entry_meta}
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
            run_section(f'pretext.{task}', out, errors, one)
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


# ----------------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return '-' if x is None else f'{100 * x:.0f}%'


def _top_ops(profile: dict | None, count: int = 4) -> str:
    if not profile:
        return 'no profile'
    return ', '.join(f'{row["op"].replace("aten::", "")} {_pct(row["share"])}' for row in profile['top'][:count])


def _amdahl(share, ratio) -> float | None:
    """Whole-step speed-up when a ``share`` of the time speeds up by ``ratio`` and the rest not at all."""
    if share is None or not ratio:
        return None
    return 1.0 / ((1.0 - share) + share / ratio)


def _chosen(entry: dict) -> str:
    used, reason = entry.get('precision', '?'), entry.get('precision_reason')
    return f'auto chose {used}' + (f' ({reason})' if reason else '')


def _amdahl_text(share, ratio, what: str, rest: str) -> str | None:
    bound = _amdahl(share, ratio)
    if bound is None:
        return None
    return (f'{what} {_pct(share)} of the time: at the bf16/fp32 matmul ratio ({_f(ratio)}x) a bf16 run would reach '
            f'{_f(bound)}x fp32 ({rest})')


def _speedup_limit(entry: dict, ceiling: dict, device: str = 'cpu') -> str:
    """Why a pretext step's default precision is (not) faster than fp32, from the numbers."""
    parts = [f'{_chosen(entry)}; bf16 measured {_f(entry.get("bf16_speedup_vs_fp32"))}x fp32 on this '
             f'{"GPU" if device == "cuda" else "CPU"} for this step'
             + (' (the default is the fp32 step, so its speed-up is 1 up to noise)'
                if entry.get('precision') == 'fp32' else '')]
    ratio = ceiling.get('bf16_over_fp32')
    if ratio:
        parts.append(f'matmul ceiling bf16 {_f(ceiling.get("bf16_gflops"), 0)} vs fp32 '
                     f'{_f(ceiling.get("fp32_gflops"), 0)} GFLOP/s = {_f(ratio)}x')
    text = _amdahl_text((entry.get('profile') or {}).get('flop_kernel_share'), ratio, 'conv/matmul kernels are',
                        'batch norm, element-wise work, the optimiser and the augmentation are not sped up by '
                        'autocast')
    if text:
        parts.append(text)
    return '; '.join(parts)


def _downstream_limit(protocol: str, entry: dict, ceiling: dict) -> str:
    parts = [f'{_chosen(entry)}; bf16 measured {_f(entry.get("bf16_speedup_vs_fp32"))}x fp32 for this protocol']
    share = entry.get('backbone_bound_share')
    if protocol in ('linear', 'knn'):
        fit = 'the L-BFGS fits and metrics' if protocol == 'linear' else 'the kNN similarities and metrics'
        text = _amdahl_text(share, ceiling.get('bf16_over_fp32'), 'feature extraction is',
                            f'{fit} stay fp32 by design')
        parts.append(text or f'feature extraction is {_pct(share)} of the time, the rest is {fit} (fp32 by design)')
    else:
        parts.append(f'val/test prediction is {_pct(share)} of the time, the rest is the training steps (backbone '
                     f'forward + backward under autocast, head and AdamW in fp32)')
    diff = entry.get('bf16_minus_fp32_balanced_accuracy')
    if diff is not None:
        parts.append(f'balanced accuracy bf16 - fp32 {diff * 100:+.1f} points')
    return '; '.join(parts)


def _peer_limit(ours: dict, peer: dict, ratio: dict, name: str) -> str:
    share = peer.get('pipeline_share_of_step')
    return (f"both sides train a ResNet-18 (GFLOP per image: ours {_g(ours.get('flops_per_image_step'), 1e9, 2)}, "
            f"{name} {_g(peer.get('flops_per_image_step'), 1e9, 2)}); precision ours {ours.get('precision')}, {name} "
            f"{peer.get('precision')}; the {name} per-image data pipeline costs "
            f"{_f((peer.get('pipeline_cpu_seconds_per_image') or 0) * 1e3, 1)} ms CPU per image = {_pct(share)} of its "
            f"step time ({peer.get('num_workers')} loader workers), ours {_pct(ours.get('augment_share_of_step'))}; "
            f"removing the whole data pipeline could speed the {name} step up by at most "
            f"~{1 / max(1e-9, 1 - min(share or 0, 0.99)):.2f}x; CPU-seconds ratio ({name} incl. its loader workers / "
            f"ours) {_f(ratio.get('cpu_ratio'))}")


def evaluate_goals(out: dict) -> list[dict]:
    """Each goal with its target, the measured value, whether the value reaches the target and what limits it
    (from the numbers). A profile explains a miss; it never turns a miss into ``met``."""
    goals = []
    ceiling = out.get('ceiling') or {}
    pretext = out.get('pretext') or {}
    for key, name, target in (('ratio', 'peer', GOALS['ratio']), ('ratio_lightly', 'peer_lightly',
                                                                   GOALS['ratio_lightly'])):
        for task in PEER_TASKS:
            ratio, peer, ours = (out.get(key) or {}).get(task), (out.get(name) or {}).get(task), pretext.get(task)
            if not ratio or not peer or not ours:
                continue
            goals.append({'goal': f'{key}.{task} >= {target}', 'target': target, 'measured': ratio['value'],
                          'met': ratio['value'] >= target,
                          'limit': _peer_limit(ours, peer, ratio, 'lightly' if key == 'ratio_lightly' else 'peer')})
    for task, entry in pretext.items():
        speedup = entry.get('speedup_vs_fp32')
        if speedup is None:
            continue
        goals.append({'goal': f'pretext.{task}.speedup_vs_fp32 >= {GOALS["speedup"]}', 'target': GOALS['speedup'],
                      'measured': speedup, 'met': speedup >= GOALS['speedup'],
                      'limit': _speedup_limit(entry, ceiling, out.get('device', 'cpu'))})
    for task in FRACTION_TASKS:
        entry = pretext.get(task)
        if not entry or entry.get('fraction_of_ceiling') is None:
            continue
        profile = entry.get('profile')
        fraction = entry['fraction_of_ceiling']
        dtype = entry.get('ceiling_dtype', 'fp32')
        limit = f"against the {dtype} matmul rate ({_g(entry.get('ceiling_flops_per_s'), 1e9, 0)} GFLOP/s)"
        if profile:
            limit += (f"; conv/matmul kernels take {_pct(profile.get('flop_kernel_share'))} of the op time and run at "
                      f"{_pct(profile.get('kernel_efficiency'))} of that rate; top ops: {_top_ops(profile)}")
        limit += f"; augmentation {_pct(entry.get('augment_share_of_step'))} of the step"
        if entry.get('fraction_of_ceiling_bf16_step') is not None:
            limit += f"; the bf16 step reaches {_pct(entry['fraction_of_ceiling_bf16_step'])} of the bf16 rate"
        goals.append({'goal': f'pretext.{task}.fraction_of_ceiling >= {GOALS["fraction"]} ({dtype} ceiling)',
                      'target': GOALS['fraction'], 'measured': fraction, 'met': fraction >= GOALS['fraction'],
                      'explained_by_profile': bool(profile), 'limit': limit})
    downstream = out.get('downstream') or {}
    for protocol in DOWNSTREAM_PROTOCOLS:
        entry = downstream.get(protocol)
        if not entry or entry.get('speedup_vs_fp32') is None:
            continue
        target = GOALS['downstream_speedup']
        goals.append({'goal': f'downstream.{protocol}.speedup_vs_fp32 >= {target}', 'target': target,
                      'measured': entry['speedup_vs_fp32'], 'met': entry['speedup_vs_fp32'] >= target,
                      'limit': _downstream_limit(protocol, entry, ceiling)})
    sweep = out.get('sweep')
    if sweep:
        goals.append({'goal': f'sweep stage runs with cache <= {GOALS["sweep"]} x without', 'target': GOALS['sweep'],
                      'measured': sweep['stage_runs_ratio'], 'met': sweep['stage_runs_ratio'] <= GOALS['sweep'],
                      'limit': (f"{sweep['with_cache']['stage_runs']} distinct prefixes vs "
                                f"{sweep['without_cache']['stage_runs']} stages of all orderings (fixed by the number "
                                f"of tasks and max-len); seconds ratio {sweep['seconds_ratio']:.2f} (downstream "
                                f"evaluation of every ordering is not cached)")})
    lr = out.get('lr_search_fraction')
    if lr:
        search = lr['settings']['lr_search']
        goals.append({'goal': f'lr_search_fraction <= {GOALS["lr"]}', 'target': GOALS['lr'], 'measured': lr['fraction'],
                      'met': lr['fraction'] <= GOALS['lr'],
                      'limit': (f"{lr['trials']} trials x {lr['iterations_per_trial']} iterations "
                                f"(trial_fraction {search.get('trial_fraction')}) vs {lr['training_iterations']} "
                                f"training iterations = {lr['trials'] * (lr['iterations_per_trial'] or 0) / max(1, lr['training_iterations']):.2f} "
                                f"of the steps; the rest is {search.get('reports')} validation reports per trial on "
                                f"up to {search.get('val_images')} val images and per-trial Runner set-up; "
                                f"trial states {lr['trial_states']}")})
    return goals


# ----------------------------------------------------------------------------------------------------------------
def _g(x, scale=1e9, digits=1) -> str:
    return '-' if x is None else f'{x / scale:.{digits}f}'


def _f(x, digits=2) -> str:
    return '-' if x is None else f'{x:.{digits}f}'


def render_markdown(out: dict) -> str:
    lines = [f'# Benchmark ({out["device"]}{", quick smoke test: numbers not comparable" if out["quick"] else ""})', '',
             f'Command: `{out["command"]}`  ', f'Date: {out["date"]}  ',
             f'Machine: {out["machine"]["processor"]}, {out["machine"]["cpu_count"]} CPUs, torch '
             f'{out["machine"]["torch"]} with {out["machine"]["torch_threads"]} threads, {out["machine"]["platform"]}  ',
             f'Load average before: {out["load_average"]["before"]}, after: {out["load_average"].get("after")} '
             f'(1, 5, 15 min; above the CPU count means other processes shared the machine)  ',
             f'Total: {out.get("total_seconds", 0):.0f} s', '']
    if out['errors']:
        lines += ['## Errors', '', '| section | error |', '|---|---|']
        lines += [f'| {k} | {v} |' for k, v in out['errors'].items()] + ['']
    ceiling = out.get('ceiling')
    if ceiling:
        mm = ceiling['matmul']
        lines += ['## Ceiling', '', '| quantity | value |', '|---|---|',
                  f'| fp32 matmul {mm["size"]}² (best of {mm["repeats"]} × {mm.get("rounds", 1)} rounds) | '
                  f'{_f(ceiling.get("fp32_gflops"), 1)} GFLOP/s |']
        for name in ('bf16', 'fp16'):
            if ceiling.get(f'{name}_gflops'):
                gflops = ceiling[f'{name}_gflops']
                lines.append(f'| {name} matmul {ceiling[f"matmul_{name}"]["size"]}² (same rounds, alternating) | '
                             f'{_f(gflops, 1)} GFLOP/s ({_f(gflops / ceiling["fp32_gflops"])} × fp32) |')
        lines += [f'| ResNet-18 forward at {ceiling["image_size"]} px | {_g(ceiling["backbone_forward_flops_per_image"], 1e9, 3)} GFLOP/image |',
                  f'| training step (3 × forward) | {_g(ceiling["training_step_flops_per_image"], 1e9, 3)} GFLOP/image |',
                  f'| FLOP-bound training throughput, fp32 | {_f(ceiling["flop_bound_images_per_s"], 1)} images/s |']
        if ceiling.get('bf16_flop_bound_images_per_s'):
            lines.append(f'| FLOP-bound training throughput, bf16 | {_f(ceiling["bf16_flop_bound_images_per_s"], 1)} '
                         f'images/s |')
        lines.append('')
    if out['pretext']:
        lines += ['## Pretext training steps (ours, default precision)', '',
                  'Data loading, augmentation, forward, backward, optimiser step and task hooks included. FLOPs are '
                  'those actually processed per image per step (all views / patches, forward and backward), counted '
                  'with FlopCounterMode; fraction = achieved FLOP/s / matmul FLOP/s of the dtype the step uses '
                  '(column "ceiling").', '',
                  '| task | precision | images/s | s/step | GFLOP/image/step | achieved GFLOP/s | ceiling | '
                  'fraction of ceiling | FLOP-bound images/s | conv+matmul share of op time | kernel efficiency | '
                  'augmentation share | CPU use |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
        for task, e in out['pretext'].items():
            p = e.get('profile') or {}
            lines.append(f'| {task} | {e.get("precision", "-")} | {_f(e["images_per_s"])} | '
                         f'{_f(e["seconds_per_step"])} | {_g(e["flops_per_image_step"], 1e9, 2)} | '
                         f'{_g(e["achieved_flops_per_s"])} | '
                         f'{e.get("ceiling_dtype", "fp32")} | {_pct(e["fraction_of_ceiling"])} | '
                         f'{_f(e["flop_bound_images_per_s"], 1)} | '
                         f'{_pct(p.get("flop_kernel_share"))} | {_pct(p.get("kernel_efficiency"))} | '
                         f'{_pct(e.get("augment_share_of_step"))} | {_pct(e.get("cpu_utilisation"))} |')
        first = next(iter(out['pretext'].values()))
        timing = first.get('timing') or {}
        lines += ['', f'Batch {first["batch_size"]}, {first["image_size"]} px, {timing.get("rounds", 1)} round(s) of '
                  f'{timing.get("steps_per_block", first.get("steps_timed"))} timed step(s) per side after '
                  f'{timing.get("warmup_steps", first.get("warmup_steps"))} warm-up step(s). "CPU use": process CPU '
                  'time / (wall time × torch threads) during the timed steps; well below 100% means the process did '
                  'not get its cores.', '']
        with_variants = {t: e for t, e in out['pretext'].items() if e.get('precision_variants')}
        if with_variants:
            lines += ['## Precision: default vs fp32 vs bf16 (same step, alternating blocks)', '',
                      f'Default = `amp=auto`, whatever this machine resolves: {_chosen(first)}. fp32 = `amp=none`; '
                      'bf16 = `amp=bf16` (autocast of the backbone, channels_last). Speed-ups are images/s over the '
                      'fp32 step\'s.', '',
                      '| task | default | default images/s | fp32 images/s | bf16 images/s | default / fp32 | '
                      'bf16 / fp32 | fraction of ceiling (dtype) | bf16 step: fraction of bf16 ceiling | '
                      'per round default / fp32 / bf16 |', '|---|---|---|---|---|---|---|---|---|---|']
            for task, e in with_variants.items():
                variants = e['precision_variants']
                rows = [e.get('round_images_per_s') or []] + [variants.get(n, {}).get('round_images_per_s') or []
                                                              for n in ('fp32', 'bf16')]
                rounds = '; '.join(' / '.join(f'{x:.2f}' for x in values) for values in zip(*rows))
                bf16_used = variants.get('bf16', {}).get('precision', 'bf16')
                lines.append(f'| {task} | {e.get("precision")} | {_f(e["images_per_s"])} | '
                             f'{_f(e.get("fp32_images_per_s"))} | {_f(e.get("bf16_images_per_s"))}'
                             f'{"" if bf16_used == "bf16" else f" (ran {bf16_used})"} | '
                             f'**{_f(e.get("speedup_vs_fp32"))}** | {_f(e.get("bf16_speedup_vs_fp32"))} | '
                             f'{_pct(e["fraction_of_ceiling"])} ({e.get("ceiling_dtype", "fp32")}) | '
                             f'{_pct(e.get("fraction_of_ceiling_bf16_step"))} | {rounds} |')
            lines.append('')
    if out['peer']:
        lines += ['## Ours vs mmpretrain\'s own pipelines (same images, backbone, resolution, batch; alternating '
                  'blocks)', '',
                  '| algorithm | ours images/s | peer images/s | ratio | per round (ours / peer) | '
                  'CPU ms/image ours / peer (+workers) | CPU ratio | peer data pipeline ms CPU/image | '
                  'peer pipeline share of step | ours augmentation share | GFLOP/image ours / peer | '
                  'precision ours / peer |',
                  '|---|---|---|---|---|---|---|---|---|---|---|---|']
        for task, peer in out['peer'].items():
            ours, ratio = out['pretext'][task], out['ratio'][task]
            rounds = '; '.join(f'{a:.2f} / {b:.2f}' for a, b in ratio['rounds'])
            lines.append(f'| {task} | {_f(ours["images_per_s"])} | {_f(peer["images_per_s"])} | '
                         f'**{_f(ratio["value"])}** | {rounds} | {_f(ratio["ours_cpu_seconds_per_image"] * 1e3, 0)} / '
                         f'{_f(ratio["peer_cpu_seconds_per_image"] * 1e3, 0)} | {_f(ratio["cpu_ratio"])} | '
                         f'{_f(peer["pipeline_cpu_seconds_per_image"] * 1e3)} | '
                         f'{_pct(peer["pipeline_share_of_step"])} | {_pct(ours.get("augment_share_of_step"))} | '
                         f'{_g(ours["flops_per_image_step"], 1e9, 2)} / {_g(peer["flops_per_image_step"], 1e9, 2)} | '
                         f'{ours.get("precision")} / {peer.get("precision", "fp32")} |')
        first = next(iter(out['peer'].values()))
        lines += ['', f'Peer: mmpretrain config pipelines ({", ".join(p["pipeline_changes"]["config"] for p in out["peer"].values())}) '
                  f'with crops, crop areas, view counts and blur sigma scaled like ours; CustomDataset over PNG files; '
                  f'DataLoader with {first["num_workers"]} workers and {first["collate"]} ({first["collate_note"]}); '
                  'SelfSupDataPreprocessor; ResNet-18 MoCo/SwAV with necks and heads sized for it; fp32 (the '
                  'configs train without autocast).', '', LOADER_NOTE, '']
    if out.get('peer_lightly'):
        lines += ['## Ours vs a lightly user\'s loop (same images, resolution, batch, queue / prototypes; '
                  'alternating blocks)', '',
                  '| algorithm | ours images/s | lightly images/s | ratio | per round (ours / lightly) | '
                  'CPU ms/image ours / lightly (+workers) | CPU ratio | lightly data pipeline ms CPU/image | '
                  'lightly pipeline share of step | GFLOP/image ours / lightly | precision ours / lightly |',
                  '|---|---|---|---|---|---|---|---|---|---|---|']
        for task, peer in out['peer_lightly'].items():
            ours, ratio = out['pretext'][task], out['ratio_lightly'][task]
            rounds = '; '.join(f'{a:.2f} / {b:.2f}' for a, b in ratio['rounds'])
            lines.append(f'| {task} | {_f(ours["images_per_s"])} | {_f(peer["images_per_s"])} | '
                         f'**{_f(ratio["value"])}** | {rounds} | {_f(ratio["ours_cpu_seconds_per_image"] * 1e3, 0)} / '
                         f'{_f(ratio["lightly_cpu_seconds_per_image"] * 1e3, 0)} | {_f(ratio["cpu_ratio"])} | '
                         f'{_f(peer["pipeline_cpu_seconds_per_image"] * 1e3)} | '
                         f'{_pct(peer["pipeline_share_of_step"])} | '
                         f'{_g(ours["flops_per_image_step"], 1e9, 2)} / {_g(peer["flops_per_image_step"], 1e9, 2)} | '
                         f'{ours.get("precision")} / {peer.get("precision")}'
                         f'{" (autocast " + peer["autocast"] + ")" if peer.get("autocast") else ""} |')
        first = next(iter(out['peer_lightly'].values()))
        lines += ['', f'lightly {first.get("lightly_version")}: torchvision ResNet-18 without fc, lightly\'s '
                  'MoCoProjectionHead + NTXentLoss(memory_bank_size) + update_momentum / SwaVProjectionHead + '
                  'SwaVPrototypes + SwaVLoss, MoCoV2Transform / SwaVTransform on PIL images of the same uint8 images '
                  f'(crops, areas, view counts, jitter strength, blur sigma sized like ours), torch DataLoader with '
                  f'{first.get("num_workers")} workers; SGD with our lr; autocast in bf16 (and channels_last) only '
                  f'when our resolved precision is bf16; here {first.get("precision_rule")}.', '',
                  'Loader workers: as for mmpretrain above.' if out['peer'] else LOADER_NOTE, '']
    downstream = out.get('downstream') or {}
    protocols = [p for p in DOWNSTREAM_PROTOCOLS if p in downstream]
    if protocols:
        setup = downstream.get('setup', {})
        lines += ['## Downstream protocols: default vs fp32 vs bf16', '',
                  f'{setup.get("dataset")} at {setup.get("image_size")} px, {setup.get("num_images")} images '
                  f'(train / val / test {"/".join(str(v) for v in (setup.get("splits") or {}).values())}), '
                  f'{setup.get("backbone")}, each precision on a fresh copy; {setup.get("order")}. Linear and kNN '
                  'share one feature extraction per precision (one `evaluate` call, as a run asking for both): each '
                  'one\'s seconds = that extraction + its own fit. Images/s: images through the backbone per second '
                  '(linear / kNN: every split image once; fine-tuning: training images × epochs + val images × epochs '
                  '+ test images).', '',
                  '| protocol | images | default | default s | fp32 s | bf16 s | default images/s | default / fp32 | '
                  'bf16 / fp32 | backbone-bound share | balanced accuracy default / fp32 / bf16 |',
                  '|---|---|---|---|---|---|---|---|---|---|---|']
        for protocol in protocols:
            e = downstream[protocol]
            budget = ''
            if e.get('epochs'):
                unit = 'epoch' if protocol == 'finetune' else 'L-BFGS iteration'
                budget = f' ({e["epochs"]} {unit}{"" if e["epochs"] == 1 else "s"})'
            lines.append(f'| {protocol}{budget} | {e["images"]} | {e.get("precision")} | {_f(e["seconds"], 1)} | '
                         f'{_f(e["fp32_seconds"], 1)} | '
                         f'{_f(e["bf16_seconds"], 1)} | {_f(e["images_per_s"], 1)} | **{_f(e["speedup_vs_fp32"])}** | '
                         f'{_f(e["bf16_speedup_vs_fp32"])} | {_pct(e.get("backbone_bound_share"))} | '
                         f'{_f(e.get("balanced_accuracy"), 3)} / {_f(e.get("fp32_balanced_accuracy"), 3)} / '
                         f'{_f(e.get("bf16_balanced_accuracy"), 3)} |')
        lines += ['', 'Backbone-bound share: feature extraction (linear, kNN) or val/test prediction (fine-tuning) '
                  'as a share of the protocol\'s seconds in the default precision.', '']
    profiled = [(name, e['profile']) for name, e in list(out['pretext'].items()) + [
        (f'peer {k}', v) for k, v in out['peer'].items()] + [
        (f'lightly {k}', v) for k, v in (out.get('peer_lightly') or {}).items()] if e.get('profile')]
    if profiled:
        lines += ['## Profiles (top operators by self time, per step)', '',
                  '| step | op | ms/step | share | calls |', '|---|---|---|---|---|']
        for name, profile in profiled:
            for row in profile['top'][:6]:
                lines.append(f'| {name} | {row["op"]} | {row["self_ms"]:.0f} | {_pct(row["share"])} | {row["calls"]} |')
        lines.append('')
    km = out.get('kmeans')
    if km:
        lines += ['## k-means', '', '| data | iterations | FAISS s | torch s | torch k-means++ seeding s |',
                  '|---|---|---|---|---|',
                  f'| {km["n"]:,} × {km["dim"]}, k={km["k"]} | {km["iterations"]} | {_f(km.get("faiss_seconds"))} | '
                  f'{_f(km["torch_seconds"])} | {_f(km["torch_kmeanspp_seeding_seconds"])} |', '',
                  f'FAISS {km.get("faiss_version")} with {km.get("faiss_gpus", 0)} GPUs ({km.get("faiss_init")}); '
                  f'torch with random initialisation.', '']
    sweep = out.get('sweep')
    if sweep:
        s = sweep['settings']
        lines += ['## Leaderboard sweep: prefix cache vs none', '',
                  f'Tasks {",".join(sweep["tasks"])}, max-len {sweep["max_len"]} ({sweep["orderings"]} orderings), '
                  f'{s["image_size"]} px, {s["num_images"]} images, {s["epochs"]} epoch, no LR search, downstream '
                  f'{s["protocols"]}.', '',
                  '| | stage runs | stage reuses | total s | stage s | other s (downstream, store, rendering) |',
                  '|---|---|---|---|---|---|']
        for label, key in (('with cache (tools/leaderboard.py)', 'with_cache'),
                           ('without (fresh work root per ordering)', 'without_cache')):
            e = sweep[key]
            lines.append(f'| {label} | {e["stage_runs"]} | {e["stage_reuses"]} | {_f(e["seconds"], 1)} | '
                         f'{_f(e["stage_seconds"], 1)} | {_f(e["seconds"] - e["stage_seconds"], 1)} |')
        lines += [f'| ratio | **{_f(sweep["stage_runs_ratio"])}** | | {_f(sweep["seconds_ratio"])} | '
                  f'{_f(sweep["stage_seconds_ratio"])} | |', '']
    lr = out.get('lr_search_fraction')
    if lr:
        st = lr['settings']
        lines += ['## LR search share of a stage', '',
                  '| task | image px | epochs | train images | trials × iterations | LR search s | training s | '
                  'fraction |', '|---|---|---|---|---|---|---|---|',
                  f'| {lr["task"]} | {st["image_size"]} | {st["epochs"]} | {st["num_train_images"]} | '
                  f'{lr["trials"]} × {lr["iterations_per_trial"]} (vs {lr["training_iterations"]} training) | '
                  f'{_f(lr["lr_search_seconds"], 1)} | {_f(lr["train_seconds"], 1)} | **{_f(lr["fraction"])}** |',
                  '', f'Config: configs/default.yaml with {json.dumps(st["overrides"])}. Training seconds: '
                  f'{lr.get("train_seconds_rule", "measured")} ({_f(lr.get("measured_epoch_seconds"), 1)} s measured).'
                  + (f' {lr["note"]}.' if lr.get('note') else ''), '']
    if out.get('goals'):
        lines += ['## Goals', '', '| goal | measured | met | what limits it |', '|---|---|---|---|']
        for goal in out['goals']:
            lines.append(f'| {goal["goal"]} | {_f(goal["measured"])} | {"yes" if goal["met"] else "no"} | '
                         f'{goal["limit"]} |')
        lines.append('')
    return '\n'.join(lines)


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
