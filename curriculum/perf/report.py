"""The Markdown report of ``tools/benchmark.py`` (``benchmark.md``), rendered from its output (``benchmark.json``):
one section per measurement that ran, each a table of the numbers and a note on how they were taken."""
from __future__ import annotations

import json

from .goals import DOWNSTREAM_PROTOCOLS
from .text import chosen_precision, fixed, percent, scaled

LOADER_NOTE = ('Loader workers: before every timed block the peers\' loader workers are left to finish prefetching '
               '(untimed), so that no side\'s block pays for another side\'s data loading; the part of a peer\'s data '
               'loading done in those waits is not in its images/s (which flatters the peer), but it is in its CPU '
               'seconds (CPU ratio, workers included).')


def render_markdown(out: dict) -> str:
    """The whole report: header, then every section ``out`` has numbers for."""
    sections = (header_lines, error_lines, ceiling_lines, pretext_lines, peer_lines, lightly_lines, downstream_lines,
                profile_lines, kmeans_lines, sweep_lines, lr_search_lines, goal_lines)
    return '\n'.join(line for section in sections for line in section(out))


def _row(*cells) -> str:
    """One Markdown table row."""
    return '| ' + ' | '.join(str(cell) for cell in cells) + ' |'


def _rounds(pairs) -> str:
    """Per-round images/s of two sides: ``a / b; a / b``."""
    return '; '.join(f'{a:.2f} / {b:.2f}' for a, b in pairs)


# -- sections -----------------------------------------------------------------------------------------------------
def header_lines(out: dict) -> list[str]:
    machine = out['machine']
    return [f'# Benchmark ({out["device"]}{", quick smoke test: numbers not comparable" if out["quick"] else ""})', '',
            f'Command: `{out["command"]}`  ', f'Date: {out["date"]}  ',
            f'Machine: {machine["processor"]}, {machine["cpu_count"]} CPUs, torch {machine["torch"]} with '
            f'{machine["torch_threads"]} threads, {machine["platform"]}  ',
            f'Load average before: {out["load_average"]["before"]}, after: {out["load_average"].get("after")} '
            f'(1, 5, 15 min; above the CPU count means other processes shared the machine)  ',
            f'Total: {out.get("total_seconds", 0):.0f} s', '']


def error_lines(out: dict) -> list[str]:
    if not out['errors']:
        return []
    return (['## Errors', '', '| section | error |', '|---|---|']
            + [f'| {k} | {v} |' for k, v in out['errors'].items()] + [''])


def ceiling_lines(out: dict) -> list[str]:
    ceiling = out.get('ceiling')
    if not ceiling:
        return []
    mm = ceiling['matmul']
    lines = ['## Ceiling', '', '| quantity | value |', '|---|---|',
             f'| fp32 matmul {mm["size"]}² (best of {mm["repeats"]} × {mm.get("rounds", 1)} rounds) | '
             f'{fixed(ceiling.get("fp32_gflops"), 1)} GFLOP/s |']
    for name in ('bf16', 'fp16'):
        if ceiling.get(f'{name}_gflops'):
            gflops = ceiling[f'{name}_gflops']
            lines.append(f'| {name} matmul {ceiling[f"matmul_{name}"]["size"]}² (same rounds, alternating) | '
                         f'{fixed(gflops, 1)} GFLOP/s ({fixed(gflops / ceiling["fp32_gflops"])} × fp32) |')
    lines += [f'| ResNet-18 forward at {ceiling["image_size"]} px | '
              f'{scaled(ceiling["backbone_forward_flops_per_image"], 1e9, 3)} GFLOP/image |',
              f'| training step (3 × forward) | {scaled(ceiling["training_step_flops_per_image"], 1e9, 3)} '
              f'GFLOP/image |',
              f'| FLOP-bound training throughput, fp32 | {fixed(ceiling["flop_bound_images_per_s"], 1)} images/s |']
    if ceiling.get('bf16_flop_bound_images_per_s'):
        lines.append(f'| FLOP-bound training throughput, bf16 | {fixed(ceiling["bf16_flop_bound_images_per_s"], 1)} '
                     f'images/s |')
    lines.append('')
    return lines


def pretext_lines(out: dict) -> list[str]:
    """Our training steps in the default precision, then the precision variants."""
    if not out['pretext']:
        return []
    lines = ['## Pretext training steps (ours, default precision)', '',
             'Data loading, augmentation, forward, backward, optimiser step and task hooks included. FLOPs are '
             'those actually processed per image per step (all views / patches, forward and backward), counted '
             'with FlopCounterMode; fraction = achieved FLOP/s / matmul FLOP/s of the dtype the step uses '
             '(column "ceiling").', '',
             '| task | precision | images/s | s/step | GFLOP/image/step | achieved GFLOP/s | ceiling | '
             'fraction of ceiling | FLOP-bound images/s | conv+matmul share of op time | kernel efficiency | '
             'augmentation share | CPU use |', '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for task, e in out['pretext'].items():
        p = e.get('profile') or {}
        backbone = e.get('backbone')
        task = task if not backbone or backbone == 'ResNet-18' else f'{task} ({backbone})'
        lines.append(_row(task, e.get('precision', '-'), fixed(e['images_per_s']), fixed(e['seconds_per_step']),
                          scaled(e['flops_per_image_step'], 1e9, 2), scaled(e['achieved_flops_per_s']),
                          e.get('ceiling_dtype', 'fp32'), percent(e['fraction_of_ceiling']),
                          fixed(e['flop_bound_images_per_s'], 1), percent(p.get('flop_kernel_share')),
                          percent(p.get('kernel_efficiency')), percent(e.get('augment_share_of_step')),
                          percent(e.get('cpu_utilisation'))))
    first = next(iter(out['pretext'].values()))
    timing = first.get('timing') or {}
    lines += ['', f'Batch {first["batch_size"]}, {first["image_size"]} px, {timing.get("rounds", 1)} round(s) of '
              f'{timing.get("steps_per_block", first.get("steps_timed"))} timed step(s) per side after '
              f'{timing.get("warmup_steps", first.get("warmup_steps"))} warm-up step(s). "CPU use": process CPU '
              'time / (wall time × torch threads) during the timed steps; well below 100% means the process did '
              'not get its cores.', '']
    return lines + precision_lines(out['pretext'])


def precision_lines(pretext: dict) -> list[str]:
    """Default vs fp32 vs bf16 of the same step, for the tasks measured in every precision."""
    with_variants = {t: e for t, e in pretext.items() if e.get('precision_variants')}
    if not with_variants:
        return []
    first = next(iter(pretext.values()))
    lines = ['## Precision: default vs fp32 vs bf16 (same step, alternating blocks)', '',
             f'Default = `amp=auto`, whatever this machine resolves: {chosen_precision(first)}. fp32 = `amp=none`; '
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
        bf16_cell = fixed(e.get('bf16_images_per_s')) + ('' if bf16_used == 'bf16' else f' (ran {bf16_used})')
        lines.append(_row(task, e.get('precision'), fixed(e['images_per_s']), fixed(e.get('fp32_images_per_s')),
                          bf16_cell, f'**{fixed(e.get("speedup_vs_fp32"))}**', fixed(e.get('bf16_speedup_vs_fp32')),
                          f'{percent(e["fraction_of_ceiling"])} ({e.get("ceiling_dtype", "fp32")})',
                          percent(e.get('fraction_of_ceiling_bf16_step')), rounds))
    lines.append('')
    return lines


def _comparison_head(name: str, *last: str) -> list[str]:
    """Heading and separator of a comparison table of ours against ``name``; ``last``: its own last columns."""
    columns = ['algorithm', 'ours images/s', f'{name} images/s', 'ratio', f'per round (ours / {name})',
               f'CPU ms/image ours / {name} (+workers)', 'CPU ratio', f'{name} data pipeline ms CPU/image',
               f'{name} pipeline share of step', *last, f'GFLOP/image ours / {name}', f'precision ours / {name}']
    return [_row(*columns), '|' + '---|' * len(columns)]


def _comparison_cells(task: str, ours: dict, peer: dict, ratio: dict, name: str) -> list:
    """The cells a peer table and a lightly table share: images/s of both sides, the ratio, its rounds, CPU per
    image of both sides and their ratio, the other side's data-pipeline cost and share."""
    return [task, fixed(ours['images_per_s']), fixed(peer['images_per_s']), f'**{fixed(ratio["value"])}**',
            _rounds(ratio['rounds']),
            f'{fixed(ratio["ours_cpu_seconds_per_image"] * 1e3, 0)} / '
            f'{fixed(ratio[f"{name}_cpu_seconds_per_image"] * 1e3, 0)}',
            fixed(ratio['cpu_ratio']), fixed(peer['pipeline_cpu_seconds_per_image'] * 1e3),
            percent(peer['pipeline_share_of_step'])]


def _gflop_cell(ours: dict, peer: dict) -> str:
    return f'{scaled(ours["flops_per_image_step"], 1e9, 2)} / {scaled(peer["flops_per_image_step"], 1e9, 2)}'


def peer_lines(out: dict) -> list[str]:
    """Ours vs mmpretrain's own MoCo v2 / SwAV pipelines."""
    if not out['peer']:
        return []
    lines = ['## Ours vs mmpretrain\'s own pipelines (same images, backbone, resolution, batch; alternating '
             'blocks)', '', *_comparison_head('peer', 'ours augmentation share')]
    for task, peer in out['peer'].items():
        ours = out['pretext'][task]
        cells = _comparison_cells(task, ours, peer, out['ratio'][task], 'peer')
        lines.append(_row(*cells, percent(ours.get('augment_share_of_step')), _gflop_cell(ours, peer),
                          f'{ours.get("precision")} / {peer.get("precision", "fp32")}'))
    first = next(iter(out['peer'].values()))
    configs = ', '.join(p['pipeline_changes']['config'] for p in out['peer'].values())
    lines += ['', f'Peer: mmpretrain config pipelines ({configs}) '
              f'with crops, crop areas, view counts and blur sigma scaled like ours; CustomDataset over PNG files; '
              f'DataLoader with {first["num_workers"]} workers and {first["collate"]} ({first["collate_note"]}); '
              'SelfSupDataPreprocessor; ResNet-18 MoCo/SwAV with necks and heads sized for it; fp32 (the '
              'configs train without autocast).', '', LOADER_NOTE, '']
    return lines


def lightly_lines(out: dict) -> list[str]:
    """Ours vs MoCo v2 / SwAV as a lightly user writes them."""
    if not out.get('peer_lightly'):
        return []
    lines = ['## Ours vs a lightly user\'s loop (same images, resolution, batch, queue / prototypes; '
             'alternating blocks)', '', *_comparison_head('lightly')]
    for task, peer in out['peer_lightly'].items():
        ours = out['pretext'][task]
        autocast = f' (autocast {peer["autocast"]})' if peer.get('autocast') else ''
        cells = _comparison_cells(task, ours, peer, out['ratio_lightly'][task], 'lightly')
        lines.append(_row(*cells, _gflop_cell(ours, peer), f'{ours.get("precision")} / {peer.get("precision")}'
                                                           f'{autocast}'))
    first = next(iter(out['peer_lightly'].values()))
    lines += ['', f'lightly {first.get("lightly_version")}: torchvision ResNet-18 without fc, lightly\'s '
              'MoCoProjectionHead + NTXentLoss(memory_bank_size) + update_momentum / SwaVProjectionHead + '
              'SwaVPrototypes + SwaVLoss, MoCoV2Transform / SwaVTransform on PIL images of the same uint8 images '
              f'(crops, areas, view counts, jitter strength, blur sigma sized like ours), torch DataLoader with '
              f'{first.get("num_workers")} workers; SGD with our lr; autocast in bf16 (and channels_last) only '
              f'when our resolved precision is bf16; here {first.get("precision_rule")}.', '',
              'Loader workers: as for mmpretrain above.' if out['peer'] else LOADER_NOTE, '']
    return lines


def downstream_lines(out: dict) -> list[str]:
    """The linear probe, kNN and fine-tuning in the default precision, fp32 and bf16."""
    downstream = out.get('downstream') or {}
    protocols = [p for p in DOWNSTREAM_PROTOCOLS if p in downstream]
    if not protocols:
        return []
    setup = downstream.get('setup', {})
    lines = ['## Downstream protocols: default vs fp32 vs bf16', '',
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
        accuracies = ' / '.join(fixed(e.get(key), 3) for key in ('balanced_accuracy', 'fp32_balanced_accuracy',
                                                                 'bf16_balanced_accuracy'))
        lines.append(_row(f'{protocol}{budget}', e['images'], e.get('precision'), fixed(e['seconds'], 1),
                          fixed(e['fp32_seconds'], 1), fixed(e['bf16_seconds'], 1), fixed(e['images_per_s'], 1),
                          f'**{fixed(e["speedup_vs_fp32"])}**', fixed(e['bf16_speedup_vs_fp32']),
                          percent(e.get('backbone_bound_share')), accuracies))
    lines += ['', 'Backbone-bound share: feature extraction (linear, kNN) or val/test prediction (fine-tuning) '
              'as a share of the protocol\'s seconds in the default precision.', '']
    return lines


def profile_lines(out: dict) -> list[str]:
    """The top operators of every profiled step: ours, then the peers'."""
    steps = (list(out['pretext'].items()) + [(f'peer {k}', v) for k, v in out['peer'].items()]
             + [(f'lightly {k}', v) for k, v in (out.get('peer_lightly') or {}).items()])
    profiled = [(name, e['profile']) for name, e in steps if e.get('profile')]
    if not profiled:
        return []
    lines = ['## Profiles (top operators by self time, per step)', '',
             '| step | op | ms/step | share | calls |', '|---|---|---|---|---|']
    for name, profile in profiled:
        for row in profile['top'][:6]:
            lines.append(f'| {name} | {row["op"]} | {row["self_ms"]:.0f} | {percent(row["share"])} | {row["calls"]} |')
    lines.append('')
    return lines


def kmeans_lines(out: dict) -> list[str]:
    km = out.get('kmeans')
    if not km:
        return []
    return ['## k-means', '', '| data | iterations | FAISS s | torch s | torch k-means++ seeding s |',
            '|---|---|---|---|---|',
            f'| {km["n"]:,} × {km["dim"]}, k={km["k"]} | {km["iterations"]} | {fixed(km.get("faiss_seconds"))} | '
            f'{fixed(km["torch_seconds"])} | {fixed(km["torch_kmeanspp_seeding_seconds"])} |', '',
            f'FAISS {km.get("faiss_version")} with {km.get("faiss_gpus", 0)} GPUs ({km.get("faiss_init")}); '
            f'torch with random initialisation.', '']


def sweep_lines(out: dict) -> list[str]:
    sweep = out.get('sweep')
    if not sweep:
        return []
    s = sweep['settings']
    lines = ['## Leaderboard sweep: prefix cache vs none', '',
             f'Tasks {",".join(sweep["tasks"])}, max-len {sweep["max_len"]} ({sweep["orderings"]} orderings), '
             f'{s["image_size"]} px, {s["num_images"]} images, {s["epochs"]} epoch, no LR search, downstream '
             f'{s["protocols"]}.', '',
             '| | stage runs | stage reuses | total s | stage s | other s (downstream, store, rendering) |',
             '|---|---|---|---|---|---|']
    for label, key in (('with cache (tools/leaderboard.py)', 'with_cache'),
                       ('without (fresh work root per ordering)', 'without_cache')):
        e = sweep[key]
        lines.append(_row(label, e['stage_runs'], e['stage_reuses'], fixed(e['seconds'], 1),
                          fixed(e['stage_seconds'], 1), fixed(e['seconds'] - e['stage_seconds'], 1)))
    lines += [f'| ratio | **{fixed(sweep["stage_runs_ratio"])}** | | {fixed(sweep["seconds_ratio"])} | '
              f'{fixed(sweep["stage_seconds_ratio"])} | |', '']
    return lines


def lr_search_lines(out: dict) -> list[str]:
    lr = out.get('lr_search_fraction')
    if not lr:
        return []
    st = lr['settings']
    note = f' {lr["note"]}.' if lr.get('note') else ''
    return ['## LR search share of a stage', '',
            '| task | image px | epochs | train images | trials × iterations | LR search s | training s | '
            'fraction |', '|---|---|---|---|---|---|---|---|',
            f'| {lr["task"]} | {st["image_size"]} | {st["epochs"]} | {st["num_train_images"]} | '
            f'{lr["trials"]} × {lr["iterations_per_trial"]} (vs {lr["training_iterations"]} training) | '
            f'{fixed(lr["lr_search_seconds"], 1)} | {fixed(lr["train_seconds"], 1)} | **{fixed(lr["fraction"])}** |',
            '', f'Config: configs/default.yaml with {json.dumps(st["overrides"])}. Training seconds: '
            f'{lr.get("train_seconds_rule", "measured")} ({fixed(lr.get("measured_epoch_seconds"), 1)} s measured).'
            + note, '']


def goal_lines(out: dict) -> list[str]:
    if not out.get('goals'):
        return []
    lines = ['## Goals', '', '| goal | measured | met | what limits it |', '|---|---|---|---|']
    for goal in out['goals']:
        lines.append(_row(goal['goal'], fixed(goal['measured']), 'yes' if goal['met'] else 'no', goal['limit']))
    lines.append('')
    return lines
