#!/usr/bin/env python
"""Measure the engine's speed against the device's FLOP ceiling and against mmpretrain's own pipelines.

    python tools/benchmark.py [--quick] [--device cpu|cuda] [--out DIR] [--only ceiling,pretext,...]

Writes ``<out>/benchmark.json`` and ``<out>/benchmark.md`` (default out: ``benchmarks/results/<date>-<device>``):

* ``ceiling``: large fp32 matmul FLOP/s, ResNet-18 forward FLOPs per image, FLOP-bound training images/s;
* ``pretext.<task>``: images/s of our training step for the five tasks (data loading, augmentation, hooks and
  the optimiser included), FLOPs per image actually processed, fraction of the ceiling and a profile;
* ``peer.moco`` / ``peer.swav``: mmpretrain's own MoCo v2 / SwAV pipelines on the same images, measured side by
  side with ours; ``ratio.<task>`` = ours / peer;
* ``kmeans``: FAISS and plain torch k-means seconds;
* ``sweep``: stage runs and seconds of a leaderboard sweep with the prefix cache versus without;
* ``lr_search_fraction``: LR-search seconds / stage-training seconds from a real stage record;
* ``goals``: each goal, whether it is met, and what limits it.

``--quick`` is a smoke test (small images, batches and iteration counts, a 2-task sweep): its numbers are flagged
and not comparable with a full run. Measurements on a shared machine are noisy: the load average before and after
is recorded, and ours and the peers' are measured in alternating blocks in one process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SECTIONS = ('ceiling', 'pretext', 'kmeans', 'sweep', 'lr_search_fraction')
#: sweep tasks in order of preference (relloc last: its patches go to the backbone at 32 px whatever the image
#: size, so it does not get cheaper with the sweep's tiny images)
SWEEP_PREFERENCE = ('rotation', 'moco', 'swav', 'odc', 'relloc')
#: fallback tasks for the LR-search measurement, cheapest default stage first (FLOPs per epoch)
LR_PREFERENCE = ('moco', 'odc', 'relloc', 'swav', 'rotation')
GOALS = {'ratio': 1.5, 'fraction': 0.4, 'sweep': 0.5, 'lr': 0.2}

FULL = dict(image_size=64, batch_size=64, num_images=None, warmup=2, steps=4, peer_rounds=2, peer_steps=2,
            profile=1, kmeans=dict(n=25_000, dim=256, k=1000, iters=20),
            sweep=dict(tasks=3, max_len=3, image_size=24, num_images=200, epochs=1), lr_quick=False)
QUICK = dict(image_size=32, batch_size=8, num_images=96, warmup=1, steps=1, peer_rounds=1, peer_steps=1,
             profile=1, kmeans=dict(n=5_000, dim=64, k=100, iters=10),
             sweep=dict(tasks=2, max_len=2, image_size=16, num_images=64, epochs=1, batch_size=16), lr_quick=True)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--quick', action='store_true', help='smoke test: small sizes and iteration counts')
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--out', default=None, help='output folder (default benchmarks/results/<date>-<device>)')
    parser.add_argument('--only', default=','.join(SECTIONS),
                        help=f'comma-separated sections to run (of {",".join(SECTIONS)}; pretext includes the peers)')
    parser.add_argument('--tasks', default='relloc,rotation,moco,swav,odc', help='pretext tasks to measure')
    parser.add_argument('--sweep-tasks', default=None,
                        help='tasks of the sweep (default: rotation,relloc,moco order of preference, those with '
                             'a configs/tasks recipe)')
    parser.add_argument('--lr-task', default='moco', help='task of the LR-search measurement')
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
def tasks_with_recipes(preference) -> list[str]:
    from curriculum.plan import CONFIG_DIR

    return [t for t in preference if os.path.isfile(os.path.join(CONFIG_DIR, 'tasks', f'{t}.yaml'))]


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


def measure_all(args, settings: dict, command: str) -> dict:
    import torch

    from benchmarks import speed
    from benchmarks.speed_peer import compare_with_peer, peer_png_folder
    import pretext_tasks  # noqa: F401  (registers the tasks)

    device, quick = args.device, args.quick
    only = {s.strip() for s in args.only.split(',') if s.strip()}
    meta = lambda: speed.entry_meta(command, device, quick)  # noqa: E731
    out: dict = {'command': command, 'date': speed.now_iso(), 'quick': quick, 'device': device,
                 'machine': speed.machine_info(device), 'settings': settings,
                 'load_average': {'before': speed.load_average()}, 'uptime_before': _uptime(),
                 'pretext': {}, 'peer': {}, 'ratio': {}, 'errors': {}}
    errors = out['errors']
    started = time.perf_counter()

    def ceiling():
        out['ceiling'] = {**speed.ceiling(device, quick, settings['image_size']), 'meta': meta()}
    run_section('ceiling', out, errors, ceiling)
    matmul = out.get('ceiling', {}).get('matmul_flops_per_s') or speed.matmul_flops(device)['flops_per_s']

    if 'pretext' in only:
        images = pretext_images(settings)
        png_dir = None
        common = dict(device=device, batch_size=settings['batch_size'], warmup=settings['warmup'],
                      profile=settings['profile'])
        for task in [t.strip() for t in args.tasks.split(',') if t.strip()]:
            def one(task=task):
                nonlocal png_dir
                entry_meta = meta()
                if task in ('moco', 'swav'):
                    if png_dir is None:
                        png_dir = peer_png_folder(images)
                    ours, peer = compare_with_peer(task, images, png_dir, matmul, steps=settings['peer_steps'],
                                                   rounds=settings['peer_rounds'], **common)
                    out['pretext'][task] = {**ours, 'meta': entry_meta}
                    out['peer'][task] = {**peer, 'meta': entry_meta}
                    out['ratio'][task] = {'value': ours['images_per_s'] / peer['images_per_s'],
                                          'ours_images_per_s': ours['images_per_s'],
                                          'peer_images_per_s': peer['images_per_s'],
                                          'rounds': list(zip(ours['round_images_per_s'],
                                                             peer['round_images_per_s'])),
                                          **cpu_ratio(ours, peer), 'meta': entry_meta}
                else:
                    result = speed.measure_pretext(task, images, matmul, steps=settings['steps'], **common)
                    out['pretext'][task] = {**result, 'meta': entry_meta}
            run_section(f'pretext.{task}', out, errors, one)
        if png_dir:
            import shutil
            shutil.rmtree(png_dir, ignore_errors=True)

    if 'kmeans' in only:
        def kmeans():
            out['kmeans'] = {**speed.measure_kmeans(**settings['kmeans']), 'meta': meta()}
        run_section('kmeans', out, errors, kmeans)

    if 'sweep' in only:
        def sweep():
            from benchmarks.speed_sweep import measure_sweep

            sweep_cfg = settings['sweep']
            tasks = ([t.strip() for t in args.sweep_tasks.split(',')] if args.sweep_tasks
                     else tasks_with_recipes(SWEEP_PREFERENCE)[:sweep_cfg['tasks']])
            out['sweep'] = {**measure_sweep(tasks, min(sweep_cfg['max_len'], len(tasks)), sweep_cfg['image_size'],
                                            sweep_cfg['num_images'], sweep_cfg['epochs'],
                                            batch_size=sweep_cfg.get('batch_size')), 'meta': meta()}
        run_section('sweep', out, errors, sweep)

    if 'lr_search_fraction' in only:
        def lr_fraction():
            from benchmarks.speed_sweep import measure_lr_search_fraction

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


def cpu_ratio(ours: dict, peer: dict) -> dict:
    """CPU seconds per image of both sides (the peer's loader workers included) and their ratio, peer / ours: a
    second view of the comparison that depends less on how much of the machine each side got."""
    ours_cpu = ours['cpu_seconds_per_step'] / ours['batch_size']
    peer_cpu = (peer['cpu_seconds_per_step'] + peer.get('worker_cpu_seconds_per_step', 0.0)) / peer['batch_size']
    return {'ours_cpu_seconds_per_image': ours_cpu, 'peer_cpu_seconds_per_image': peer_cpu,
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


def evaluate_goals(out: dict) -> list[dict]:
    """Each goal with its target, the measured value, whether it is met and what limits it (from the numbers)."""
    goals = []
    for task in ('moco', 'swav'):
        ratio, peer, ours = out['ratio'].get(task), out['peer'].get(task), out['pretext'].get(task)
        if not ratio:
            continue
        share = peer.get('pipeline_share_of_step')
        limit = (f"both sides train the same ResNet-18 (FLOPs per image: ours {ours['flops_per_image_step'] / 1e9:.2f} G, "
                 f"peer {peer['flops_per_image_step'] / 1e9:.2f} G); the peer's per-image data pipeline costs "
                 f"{peer['pipeline_cpu_seconds_per_image'] * 1e3:.1f} ms CPU per image = {_pct(share)} of its step "
                 f"time, ours {_pct(ours.get('augment_share_of_step'))}; removing the whole data pipeline could "
                 f"speed the peer's step up by at most ~{1 / max(1e-9, 1 - min(share or 0, 0.99)):.2f}x; "
                 f"CPU-seconds ratio (peer incl. its loader workers / ours) {_f(ratio.get('cpu_ratio'))}")
        goals.append({'goal': f'ratio.{task} >= {GOALS["ratio"]}', 'measured': ratio['value'],
                      'met': ratio['value'] >= GOALS['ratio'], 'limit': limit})
    for task, entry in out['pretext'].items():
        profile = entry.get('profile')
        met = entry['fraction_of_ceiling'] >= GOALS['fraction']
        limit = '' if not profile else (
            f"conv/matmul kernels take {_pct(profile['flop_kernel_share'])} of the op time and run at "
            f"{_pct(profile.get('kernel_efficiency'))} of the large-matmul rate; top ops: {_top_ops(profile)}; "
            f"augmentation {_pct(entry.get('augment_share_of_step'))} of the step")
        goals.append({'goal': f'pretext.{task} >= {GOALS["fraction"]:.0%} of ceiling (or a profile)',
                      'measured': entry['fraction_of_ceiling'], 'met': met or bool(profile),
                      'fraction_met': met, 'limit': limit})
    sweep = out.get('sweep')
    if sweep:
        goals.append({'goal': f'sweep stage runs with cache <= {GOALS["sweep"]} x without',
                      'measured': sweep['stage_runs_ratio'], 'met': sweep['stage_runs_ratio'] <= GOALS['sweep'],
                      'limit': (f"{sweep['with_cache']['stage_runs']} distinct prefixes vs "
                                f"{sweep['without_cache']['stage_runs']} stages of all orderings (fixed by the number "
                                f"of tasks and max-len); seconds ratio {sweep['seconds_ratio']:.2f} (downstream "
                                f"evaluation of every ordering is not cached)")})
    lr = out.get('lr_search_fraction')
    if lr:
        search = lr['settings']['lr_search']
        goals.append({'goal': f'lr_search_fraction <= {GOALS["lr"]}', 'measured': lr['fraction'],
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
        lines += ['## Ceiling', '', '| quantity | value |', '|---|---|',
                  f'| fp32 matmul {ceiling["matmul"]["size"]}² (best of {ceiling["matmul"]["repeats"]}) | '
                  f'{_g(ceiling["matmul_flops_per_s"])} GFLOP/s |',
                  f'| ResNet-18 forward at {ceiling["image_size"]} px | {_g(ceiling["backbone_forward_flops_per_image"], 1e9, 3)} GFLOP/image |',
                  f'| training step (3 × forward) | {_g(ceiling["training_step_flops_per_image"], 1e9, 3)} GFLOP/image |',
                  f'| FLOP-bound training throughput | {_f(ceiling["flop_bound_images_per_s"], 1)} images/s |', '']
    if out['pretext']:
        lines += ['## Pretext training steps (ours)', '',
                  'Data loading, augmentation, forward, backward, optimiser step and task hooks included. FLOPs are '
                  'those actually processed per image per step (all views / patches, forward and backward), counted '
                  'with FlopCounterMode; fraction = achieved FLOP/s / matmul FLOP/s.', '',
                  '| task | images/s | s/step | GFLOP/image/step | achieved GFLOP/s | fraction of ceiling | '
                  'FLOP-bound images/s | conv+matmul share of op time | kernel efficiency | augmentation share | '
                  'CPU use |', '|---|---|---|---|---|---|---|---|---|---|---|']
        for task, e in out['pretext'].items():
            p = e.get('profile') or {}
            lines.append(f'| {task} | {_f(e["images_per_s"])} | {_f(e["seconds_per_step"])} | '
                         f'{_g(e["flops_per_image_step"], 1e9, 2)} | {_g(e["achieved_flops_per_s"])} | '
                         f'{_pct(e["fraction_of_ceiling"])} | {_f(e["flop_bound_images_per_s"], 1)} | '
                         f'{_pct(p.get("flop_kernel_share"))} | {_pct(p.get("kernel_efficiency"))} | '
                         f'{_pct(e.get("augment_share_of_step"))} | {_pct(e.get("cpu_utilisation"))} |')
        lines += ['', f'Batch {next(iter(out["pretext"].values()))["batch_size"]}, '
                  f'{next(iter(out["pretext"].values()))["image_size"]} px. "CPU use": process CPU time / (wall time '
                  '× torch threads) during the timed steps; well below 100% means the process did not get its '
                  'cores.', '']
    if out['peer']:
        lines += ['## Ours vs mmpretrain\'s own pipelines (same images, backbone, resolution, batch; alternating '
                  'blocks)', '',
                  '| algorithm | ours images/s | peer images/s | ratio | per round (ours / peer) | '
                  'CPU ms/image ours / peer (+workers) | CPU ratio | peer data pipeline ms CPU/image | '
                  'peer pipeline share of step | ours augmentation share | GFLOP/image ours / peer |',
                  '|---|---|---|---|---|---|---|---|---|---|---|']
        for task, peer in out['peer'].items():
            ours, ratio = out['pretext'][task], out['ratio'][task]
            rounds = '; '.join(f'{a:.2f} / {b:.2f}' for a, b in ratio['rounds'])
            lines.append(f'| {task} | {_f(ours["images_per_s"])} | {_f(peer["images_per_s"])} | '
                         f'**{_f(ratio["value"])}** | {rounds} | {_f(ratio["ours_cpu_seconds_per_image"] * 1e3, 0)} / '
                         f'{_f(ratio["peer_cpu_seconds_per_image"] * 1e3, 0)} | {_f(ratio["cpu_ratio"])} | '
                         f'{_f(peer["pipeline_cpu_seconds_per_image"] * 1e3)} | '
                         f'{_pct(peer["pipeline_share_of_step"])} | {_pct(ours.get("augment_share_of_step"))} | '
                         f'{_g(ours["flops_per_image_step"], 1e9, 2)} / {_g(peer["flops_per_image_step"], 1e9, 2)} |')
        first = next(iter(out['peer'].values()))
        lines += ['', f'Peer: mmpretrain config pipelines ({", ".join(p["pipeline_changes"]["config"] for p in out["peer"].values())}) '
                  f'with crops, crop areas, view counts and blur sigma scaled like ours; CustomDataset over PNG files; '
                  f'DataLoader with {first["num_workers"]} workers and {first["collate"]} ({first["collate_note"]}); '
                  'SelfSupDataPreprocessor; ResNet-18 MoCo/SwAV with necks and heads sized for it.', '']
    profiled = [(name, e['profile']) for name, e in list(out['pretext'].items()) + [
        (f'peer {k}', v) for k, v in out['peer'].items()] if e.get('profile')]
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
            met = 'yes' if goal['met'] else 'no'
            if 'fraction_met' in goal and not goal['fraction_met']:
                met = 'profile only'
            lines.append(f'| {goal["goal"]} | {_f(goal["measured"])} | {met} | {goal["limit"]} |')
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
    from benchmarks.speed import quiet_logs

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
