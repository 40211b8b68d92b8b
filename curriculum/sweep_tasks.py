"""What each node of a sweep does, in whichever process runs it (the sweep's own process, a local worker process or
a Ray worker on another machine): plan the stage keys of the sweep's jobs, run one stage, evaluate and record one
job. Plain data in and out, so that every backend can ship them; the stages, results and LR studies go to the shared
stores named in :class:`SweepSettings`.

A job is ``{'order': 'odc,moco' | 'none', 'seed': 0, 'init': None | '/path/weights.pth'}``.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class SweepSettings:
    """Everything a node needs besides its job, the same on every machine (paths: on the shared file system)."""
    cwd: str                     # the folder relative paths of the command line are resolved against
    work_root: str
    results_url: str
    optuna_storage: str | None
    sweep_id: str                # names this sweep's stage nodes (see curriculum.run.run_planned_stage)
    # the config (file, defaults and overrides; no seed) and the jobs' task recipes as read once when the sweep
    # started: a config or recipe edited while the sweep runs changes none of its jobs (before, every node read the
    # files again, so an edit made mid-study gave later jobs other settings and other identities)
    config: dict
    recipes: dict
    hide_cuda: bool = False      # --device cpu


def _enter(settings: SweepSettings) -> None:
    """Put this process where the sweep's command was given (a Ray worker starts elsewhere), keeping the data it
    loads for the sweep's next nodes."""
    from .run import keep_loaded_datasets

    keep_loaded_datasets(4)
    if settings.hide_cuda:
        os.environ['CUDA_VISIBLE_DEVICES'] = ''
    if os.path.abspath(os.getcwd()) != settings.cwd:
        if not os.path.isdir(settings.cwd):
            from .errors import PlanError

            raise PlanError(f'{settings.cwd} (the folder of the sweep command) does not exist on '
                            f'{socket.gethostname()}: every node needs the shared file system at the same path')
        os.chdir(settings.cwd)


def job_config(settings: SweepSettings, job: dict) -> dict:
    """The sweep's config with the job's seed (and label fraction)."""
    from .plan import apply_dotted

    options = {'seed': job['seed']}
    if job.get('label_fraction') is not None:    # a sweep over several label fractions (--label-fractions)
        options['evaluation.label_fraction'] = job['label_fraction']
    return apply_dotted(settings.config, options)   # both keys are known ones: the schema check ran at the start


def job_plan(settings: SweepSettings, job: dict):
    from .plan import build_plan

    return build_plan(job['order'], job_config(settings, job), settings.recipes)


def job_work_dir(settings: SweepSettings, job: dict, plan) -> str:
    """``<work_root>/sweeps/<ordering>/seed<N>[-labels<fraction>]`` (:func:`curriculum.leaderboard.sweep_work_dir`)."""
    from .leaderboard import sweep_work_dir

    label = plan.label if not job['init'] else f'init-{os.path.basename(job["init"])}'
    fraction = (plan.config.get('evaluation') or {}).get('label_fraction', 1.0)
    return sweep_work_dir(settings.work_root, label, job['seed'], fraction)


def stored_result(results: list[dict], plan, job: dict) -> dict | None:
    """The result of ``job`` among ``results`` (the results store decides what is recorded), or None."""
    from .leaderboard import comparison_key, run_label

    probe = {'config': plan.config, 'order': plan.order, 'init': job['init'], 'seed': job['seed']}
    for stored in results:
        if (comparison_key(stored) == comparison_key(probe) and run_label(stored) == run_label(probe)
                and stored['seed'] == job['seed']):
            return stored
    return None


#: the run contexts this process prepared last (data, monitor, precision, stage inputs), by job
_CONTEXTS: dict[str, object] = {}
_CONTEXTS_KEEP = 3


def job_context(settings: SweepSettings, job: dict):
    """The job's :class:`curriculum.run.RunContext` (every plan-time check included), kept for the next node of
    the same job in this process."""
    from .run import prepare_run

    memo = json.dumps([settings.sweep_id, job], sort_keys=True)
    if memo not in _CONTEXTS:
        plan = job_plan(settings, job)
        while len(_CONTEXTS) >= _CONTEXTS_KEEP:
            _CONTEXTS.pop(next(iter(_CONTEXTS)))
        _CONTEXTS[memo] = prepare_run(plan, settings.work_root, settings.results_url, job['init'],
                                      settings.optuna_storage, job_work_dir(settings, job, plan))
    return _CONTEXTS[memo]


def plan_sweep(settings: SweepSettings, jobs: list[dict]) -> list[list[tuple[str, str]]]:
    """Per job, its stages as ``(task, key)`` (run where the stages run, so that device and precision resolve
    as they will for them); every job's plan-time checks pass first."""
    from .run import stage_chain

    _enter(settings)
    chains = []
    for job in jobs:
        chain, _ = stage_chain(job_context(settings, job), settings.work_root)
        chains.append([(planned.stage.task, planned.key) for planned in chain])
    return chains


def where() -> str:
    """This process as ``host:pid`` (plus the Ray node's first characters under Ray)."""
    import sys

    ray = sys.modules.get('ray')
    node = ''
    if ray is not None and ray.is_initialized():
        node = f' node {ray.get_runtime_context().get_node_id()[:8]}'
    return f'{socket.gethostname()}:{os.getpid()}{node}'


def run_stage(settings: SweepSettings, job: dict, index: int, key: str, parent=None) -> dict:
    """Stage ``index`` of ``job`` (whose key the planner computed as ``key``) from the cache or trained; returns its
    record. ``parent``: the parent stage's record (what makes Ray wait for it; unused here)."""
    from .errors import EngineError
    from .run import run_planned_stage, stage_chain

    _enter(settings)
    ctx = job_context(settings, job)
    chain, _ = stage_chain(ctx, settings.work_root)
    planned = chain[index]
    if planned.key != key:
        raise EngineError(f'stage {index + 1} of {job["order"]} (seed {job["seed"]}) has key {planned.key} on '
                          f'{socket.gethostname()}, not the planned {key}: this machine resolves the device or '
                          f'precision differently (give --device and --amp explicitly)')
    record = run_planned_stage(ctx, planned, node_token=f'{settings.sweep_id}:{key}')
    record['where'] = where()
    return record


def evaluate_job(settings: SweepSettings, job: dict, owned: list[bool], *stage_records: dict) -> dict:
    """Evaluate ``job``'s final backbone downstream and record the run (unless the results store holds it already);
    returns a summary. ``stage_records``: the records of its stages, in order; ``owned[i]``: whether this job is
    the first of the sweep to use stage ``i`` (its record then says whether the stage was trained; the other jobs
    report it as reused from the cache)."""
    from .results import load_runs
    from .run import evaluate_backbone, record_result, result_record, stage_chain

    _enter(settings)
    plan = job_plan(settings, job)
    stored = stored_result(load_runs(settings.results_url), plan, job)
    if stored is not None:
        return summary(stored, already=True)
    started = time.time()
    ctx = job_context(settings, job)
    chain, backbone_file = stage_chain(ctx, settings.work_root)
    if chain:
        backbone_file = os.path.join(chain[-1].directory, 'backbone.pth')
    stages = []
    for first, record in zip(owned, stage_records):
        record = {k: v for k, v in record.items() if k != 'where'}
        stages.append(record if first else dict(record, cache_hit=True, seconds=0.0))
    trained = sum(float(s.get('seconds') or 0.0) for s in stages if not s['cache_hit'])
    downstream, finetuned = evaluate_backbone(ctx, backbone_file)
    result = result_record(ctx, stages, downstream, started - trained, settings.work_root, settings.results_url)
    work_dir = job_work_dir(settings, job, plan)
    path = record_result(ctx, result, finetuned, work_dir, settings.results_url)
    out = summary(result, already=False)
    out['result_file'] = path
    out['where'] = where()
    return out


def summary(result: dict, already: bool) -> dict:
    """What the sweep prints of a recorded run: its label, seed, store id and headline metric per protocol."""
    from .leaderboard import run_label

    metrics = {protocol: values.get(values.get('headline', 'balanced_accuracy'))
               for protocol, values in (result.get('downstream') or {}).items()}
    headline = next((values.get('headline') for values in (result.get('downstream') or {}).values()),
                    'balanced_accuracy')
    return {'label': run_label(result), 'seed': result['seed'], 'results_id': result.get('results_id',
                                                                                      result.get('_id')),
            'headline': headline, 'metrics': metrics, 'already_recorded': already}
