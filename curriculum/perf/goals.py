"""The speed goals of ``tools/benchmark.py`` and their verdicts: for each goal its target, the measured value,
whether the value reaches the target, and what limits it, explained from the numbers of the benchmark's output.

A profile explains a miss; it never turns a miss into ``met``.
"""
from __future__ import annotations

from .text import chosen_precision, fixed, percent, scaled

#: the targets: ours / mmpretrain (ratio), ours / lightly (ratio_lightly), fraction of the ceiling of the dtype
#: used (for FRACTION_TASKS), default precision / fp32 of every pretext step (speedup) and of every downstream
#: protocol (downstream_speedup), sweep stage runs with / without cache, LR-search share of a stage
GOALS = {'ratio': 2.0, 'ratio_lightly': 1.2, 'fraction': 0.35, 'speedup': 2.0, 'downstream_speedup': 1.8,
         'sweep': 0.5, 'lr': 0.2}
FRACTION_TASKS = ('moco', 'odc', 'rotation')
#: the tasks measured against mmpretrain's and a lightly user's pipelines
PEER_TASKS = ('moco', 'swav')
DOWNSTREAM_PROTOCOLS = ('linear', 'knn', 'finetune')


def evaluate_goals(out: dict) -> list[dict]:
    """Each goal with its target, the measured value, whether the value reaches the target and what limits it
    (from the numbers), for every goal that ``out`` (the benchmark's output) has numbers for."""
    ceiling = out.get('ceiling') or {}
    pretext = out.get('pretext') or {}
    return (peer_goals(out)
            + speedup_goals(pretext, ceiling, out.get('device', 'cpu'))
            + fraction_goals(pretext)
            + downstream_goals(out.get('downstream') or {}, ceiling)
            + sweep_goals(out.get('sweep'))
            + lr_search_goals(out.get('lr_search_fraction')))


def _goal(what: str, relation: str, target: float, measured: float, limit: str, suffix: str = '',
          **extra) -> dict:
    """One verdict: ``met`` when ``measured <relation> target`` (``>=`` or ``<=``)."""
    met = measured >= target if relation == '>=' else measured <= target
    return {'goal': f'{what} {relation} {target}{suffix}', 'target': target, 'measured': measured, 'met': met,
            **extra, 'limit': limit}


# -- the goals, one kind each -------------------------------------------------------------------------------------
def peer_goals(out: dict) -> list[dict]:
    """Ours / mmpretrain's pipeline (``ratio``) and ours / a lightly user's loop (``ratio_lightly``) per peer task."""
    goals = []
    pretext = out.get('pretext') or {}
    for key, name, side in (('ratio', 'peer', 'peer'), ('ratio_lightly', 'peer_lightly', 'lightly')):
        for task in PEER_TASKS:
            ratio, peer, ours = (out.get(key) or {}).get(task), (out.get(name) or {}).get(task), pretext.get(task)
            if not ratio or not peer or not ours:
                continue
            goals.append(_goal(f'{key}.{task}', '>=', GOALS[key], ratio['value'],
                               peer_limit(ours, peer, ratio, side)))
    return goals


def speedup_goals(pretext: dict, ceiling: dict, device: str) -> list[dict]:
    """Default precision / fp32 images/s of every pretext step."""
    return [_goal(f'pretext.{task}.speedup_vs_fp32', '>=', GOALS['speedup'], entry['speedup_vs_fp32'],
                  speedup_limit(entry, ceiling, device))
            for task, entry in pretext.items() if entry.get('speedup_vs_fp32') is not None]


def fraction_goals(pretext: dict) -> list[dict]:
    """Achieved FLOP/s as a fraction of the matmul rate of the dtype used, for FRACTION_TASKS."""
    goals = []
    for task in FRACTION_TASKS:
        entry = pretext.get(task)
        if not entry or entry.get('fraction_of_ceiling') is None:
            continue
        dtype = entry.get('ceiling_dtype', 'fp32')
        goals.append(_goal(f'pretext.{task}.fraction_of_ceiling', '>=', GOALS['fraction'],
                           entry['fraction_of_ceiling'], fraction_limit(entry), f' ({dtype} ceiling)',
                           explained_by_profile=bool(entry.get('profile'))))
    return goals


def downstream_goals(downstream: dict, ceiling: dict) -> list[dict]:
    """Default precision / fp32 seconds of every downstream protocol measured."""
    goals = []
    for protocol in DOWNSTREAM_PROTOCOLS:
        entry = downstream.get(protocol)
        if not entry or entry.get('speedup_vs_fp32') is None:
            continue
        goals.append(_goal(f'downstream.{protocol}.speedup_vs_fp32', '>=', GOALS['downstream_speedup'],
                           entry['speedup_vs_fp32'], downstream_limit(protocol, entry, ceiling)))
    return goals


def sweep_goals(sweep: dict | None) -> list[dict]:
    """Stage runs of a leaderboard sweep with the prefix cache / without."""
    if not sweep:
        return []
    limit = (f"{sweep['with_cache']['stage_runs']} distinct prefixes vs {sweep['without_cache']['stage_runs']} "
             f"stages of all orderings (fixed by the number of tasks and max-len); seconds ratio "
             f"{sweep['seconds_ratio']:.2f} (downstream evaluation of every ordering is not cached)")
    return [_goal('sweep stage runs with cache', '<=', GOALS['sweep'], sweep['stage_runs_ratio'], limit,
                  ' x without')]


def lr_search_goals(lr: dict | None) -> list[dict]:
    """LR-search seconds / stage-training seconds."""
    if not lr:
        return []
    search = lr['settings']['lr_search']
    share_of_steps = lr['trials'] * (lr['iterations_per_trial'] or 0) / max(1, lr['training_iterations'])
    limit = (f"{lr['trials']} trials x {lr['iterations_per_trial']} iterations "
             f"(trial_fraction {search.get('trial_fraction')}) vs {lr['training_iterations']} training iterations = "
             f"{share_of_steps:.2f} of the steps; the rest is {search.get('reports')} validation reports per trial on "
             f"up to {search.get('val_images')} val images and per-trial Runner set-up; "
             f"trial states {lr['trial_states']}")
    return [_goal('lr_search_fraction', '<=', GOALS['lr'], lr['fraction'], limit)]


# -- what limits a value ------------------------------------------------------------------------------------------
def top_ops(profile: dict | None, count: int = 4) -> str:
    """The ``count`` operators with the most self time, with their shares."""
    if not profile:
        return 'no profile'
    return ', '.join(f'{row["op"].replace("aten::", "")} {percent(row["share"])}' for row in profile['top'][:count])


def amdahl(share, ratio) -> float | None:
    """Whole-step speed-up when a ``share`` of the time speeds up by ``ratio`` and the rest not at all."""
    if share is None or not ratio:
        return None
    return 1.0 / ((1.0 - share) + share / ratio)


def amdahl_text(share, ratio, what: str, rest: str) -> str | None:
    """What a bf16 run would reach when ``what`` (a ``share`` of the time) runs at the bf16/fp32 ``ratio``."""
    bound = amdahl(share, ratio)
    if bound is None:
        return None
    return (f'{what} {percent(share)} of the time: at the bf16/fp32 matmul ratio ({fixed(ratio)}x) a bf16 run would '
            f'reach {fixed(bound)}x fp32 ({rest})')


def speedup_limit(entry: dict, ceiling: dict, device: str = 'cpu') -> str:
    """Why a pretext step's default precision is (not) faster than fp32, from the numbers."""
    parts = [f'{chosen_precision(entry)}; bf16 measured {fixed(entry.get("bf16_speedup_vs_fp32"))}x fp32 on this '
             f'{"GPU" if device == "cuda" else "CPU"} for this step'
             + (' (the default is the fp32 step, so its speed-up is 1 up to noise)'
                if entry.get('precision') == 'fp32' else '')]
    ratio = ceiling.get('bf16_over_fp32')
    if ratio:
        parts.append(f'matmul ceiling bf16 {fixed(ceiling.get("bf16_gflops"), 0)} vs fp32 '
                     f'{fixed(ceiling.get("fp32_gflops"), 0)} GFLOP/s = {fixed(ratio)}x')
    text = amdahl_text((entry.get('profile') or {}).get('flop_kernel_share'), ratio, 'conv/matmul kernels are',
                       'batch norm, element-wise work, the optimiser and the augmentation are not sped up by '
                       'autocast')
    if text:
        parts.append(text)
    return '; '.join(parts)


def fraction_limit(entry: dict) -> str:
    """What keeps a pretext step below its dtype's matmul rate: kernel share and efficiency, top ops, augmentation."""
    profile = entry.get('profile')
    dtype = entry.get('ceiling_dtype', 'fp32')
    limit = f"against the {dtype} matmul rate ({scaled(entry.get('ceiling_flops_per_s'), 1e9, 0)} GFLOP/s)"
    if profile:
        limit += (f"; conv/matmul kernels take {percent(profile.get('flop_kernel_share'))} of the op time and run at "
                  f"{percent(profile.get('kernel_efficiency'))} of that rate; top ops: {top_ops(profile)}")
    limit += f"; augmentation {percent(entry.get('augment_share_of_step'))} of the step"
    if entry.get('fraction_of_ceiling_bf16_step') is not None:
        limit += f"; the bf16 step reaches {percent(entry['fraction_of_ceiling_bf16_step'])} of the bf16 rate"
    return limit


def downstream_limit(protocol: str, entry: dict, ceiling: dict) -> str:
    """Why a downstream protocol's default precision is (not) faster than fp32, from the numbers."""
    parts = [f'{chosen_precision(entry)}; bf16 measured {fixed(entry.get("bf16_speedup_vs_fp32"))}x fp32 for this '
             f'protocol']
    share = entry.get('backbone_bound_share')
    if protocol in ('linear', 'knn'):
        fit = 'the L-BFGS fits and metrics' if protocol == 'linear' else 'the kNN similarities and metrics'
        text = amdahl_text(share, ceiling.get('bf16_over_fp32'), 'feature extraction is',
                           f'{fit} stay fp32 by design')
        parts.append(text or f'feature extraction is {percent(share)} of the time, the rest is {fit} (fp32 by design)')
    else:
        parts.append(f'val/test prediction is {percent(share)} of the time, the rest is the training steps (backbone '
                     f'forward + backward under autocast, head and AdamW in fp32)')
    diff = entry.get('bf16_minus_fp32_balanced_accuracy')
    if diff is not None:
        parts.append(f'balanced accuracy bf16 - fp32 {diff * 100:+.1f} points')
    return '; '.join(parts)


def peer_limit(ours: dict, peer: dict, ratio: dict, name: str) -> str:
    """What the two sides of a peer comparison spend their time on (FLOPs, precision, data pipeline, CPU)."""
    share = peer.get('pipeline_share_of_step')
    return (f"both sides train a ResNet-18 (GFLOP per image: ours {scaled(ours.get('flops_per_image_step'), 1e9, 2)}, "
            f"{name} {scaled(peer.get('flops_per_image_step'), 1e9, 2)}); precision ours {ours.get('precision')}, "
            f"{name} {peer.get('precision')}; the {name} per-image data pipeline costs "
            f"{fixed((peer.get('pipeline_cpu_seconds_per_image') or 0) * 1e3, 1)} ms CPU per image = {percent(share)} "
            f"of its step time ({peer.get('num_workers')} loader workers), ours "
            f"{percent(ours.get('augment_share_of_step'))}; removing the whole data pipeline could speed the {name} "
            f"step up by at most ~{1 / max(1e-9, 1 - min(share or 0, 0.99)):.2f}x; CPU-seconds ratio ({name} incl. "
            f"its loader workers / ours) {fixed(ratio.get('cpu_ratio'))}")
