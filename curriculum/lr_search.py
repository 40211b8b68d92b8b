"""Per-stage learning-rate search with Optuna.

One study per stage key (name ``lr/<task>/<key>``) in a persistent storage (SQLite under the work root by default,
so ``optuna-dashboard sqlite:///work_dirs/optuna.db`` opens it). Each trial trains a fraction of an epoch at a
log-uniform LR from the task's ``lr_range``, starting from the parent backbone, and is scored by the task's own
validation objective on the validation split (or a kNN probe on it) — never on the test split. Intermediate reports
let the median pruner stop poor trials early. A rerun reuses completed trials, so a killed search resumes.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace

import numpy as np
import optuna
from mmengine.dist import get_rank
from optuna.trial import TrialState

from pretext_tasks.errors import NonFiniteLossError

from .distributed import from_rank0
from .errors import EngineError
from .stage import StageInputs, run_trial

#: seed offset of the repeated trial that measures the search's noise
NOISE_SEED_OFFSET = 7919

optuna.logging.set_verbosity(optuna.logging.WARNING)
logger = logging.getLogger(__name__)


def default_storage(work_root: str) -> str:
    return f'sqlite:///{os.path.abspath(os.path.join(work_root, "optuna.db"))}'


def open_study_storage(url: str, attempts: int = 5) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage for ``url``. Workers that create a new database at the same moment race on its schema
    (SQLite: a UNIQUE error on ``alembic_version`` or "database is locked"); the loser retries."""
    import sqlalchemy as sa

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except (sa.exc.OperationalError, sa.exc.IntegrityError) as exc:
            if attempt == attempts - 1:
                raise EngineError(f'cannot open Optuna storage {url!r}: {str(exc).splitlines()[0]}') from None
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError('unreachable')


def _sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == 'random':
        return optuna.samplers.RandomSampler(seed=seed)
    # 'tpe', and 'stratified' once its enqueued points are used up
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=3)


def stratified_lrs(low: float, high: float, count: int, seed: int) -> list[float]:
    """``count`` learning rates, one drawn uniformly inside each of ``count`` equal bins of the log-range (a 1-D
    Latin hypercube): a handful of trials cover the range evenly, which plain random sampling does not."""
    rng = np.random.RandomState(seed)
    positions = (np.arange(count) + rng.uniform(size=count)) / count
    values = np.exp(np.log(low) + positions * (np.log(high) - np.log(low)))
    return [float(v) for v in values]


def _pruner(kind: str) -> optuna.pruners.BasePruner:
    if kind == 'none':
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)


def trial_records(study: optuna.Study) -> list[dict]:
    """Every finished trial of a study as ``{lr, score, state}`` (stale RUNNING ones are left out)."""
    out = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state == TrialState.RUNNING:
            continue
        score = trial.value
        if score is None and trial.intermediate_values:
            score = trial.intermediate_values[max(trial.intermediate_values)]
        out.append({'lr': float(trial.params.get('lr', float('nan'))),
                    'score': None if score is None or not math.isfinite(score) else float(score),
                    'state': trial.state.name.lower()})
    return out


def search_lr(task_name: str, cfg: dict, search_cfg: dict, inputs: StageInputs, parent_backbone: str | None,
              stage_key: str, storage: str, trials_dir: str, progress=None, monitor=None,
              writer_alive=None) -> dict:
    """Run (or resume) the study for one stage; returns ``{'lr', 'trials', 'study', 'storage', 'searched'}``.

    ``trials_dir`` is ``<attempt folder>/lr_search`` (:mod:`curriculum.stage_store`); each trial records the
    attempt that runs it. ``writer_alive(attempt name)`` says whether another attempt's writer may still be at
    work (None: no other writer can be)."""
    n_trials = int(search_cfg.get('trials', 0))
    if n_trials <= 0:
        return {'lr': float(cfg['lr']), 'trials': [], 'study': None, 'storage': None, 'searched': False}
    low, high = (float(v) for v in cfg['lr_range'])
    study_name = f'lr/{task_name}/{stage_key}'
    study = None
    if get_rank() == 0:
        study = optuna.create_study(study_name=study_name, storage=open_study_storage(storage),
                                    direction='maximize',
                                    sampler=_sampler(search_cfg.get('sampler', 'stratified'), inputs.seed),
                                    pruner=_pruner(search_cfg.get('pruner', 'median')), load_if_exists=True)
        study.set_user_attr('task', task_name)
        study.set_user_attr('lr_range', [low, high])
        # A trial left RUNNING by a killed process: when it started in this attempt folder (its trial_<n> folder is
        # here: this process took the folder over from its dead writer) it goes back to the queue with its number
        # and LR, so the resumed search runs exactly the trials of an uninterrupted one, in the same order (ties
        # between equal scores are broken by that order); one of another attempt whose writer may be alive is left
        # to it; any other is marked failed.
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            ours = os.path.isdir(os.path.join(trials_dir, f'trial_{trial.number}'))
            if not ours and writer_alive is not None and writer_alive(trial.user_attrs.get('attempt')):
                continue
            study._storage.set_trial_state_values(  # noqa: SLF001 (storage API)
                trial._trial_id, TrialState.WAITING if ours else TrialState.FAIL)
        if search_cfg.get('sampler', 'stratified') == 'stratified' and not study.get_trials(deepcopy=False):
            for lr in stratified_lrs(low, high, n_trials, inputs.seed):
                study.enqueue_trial({'lr': lr})
    iterations_per_epoch = max(1, len(inputs.train_images) // int(cfg['batch_size']))
    iterations = max(2, int(round(float(search_cfg.get('trial_fraction', 0.2)) * iterations_per_epoch)))
    reports = max(1, int(search_cfg.get('reports', 2)))
    report_at = sorted({max(1, round(iterations * (k + 1) / reports)) for k in range(reports)})
    val_count = min(len(inputs.val_images), int(search_cfg.get('val_images', 256)))
    score_fn = make_score_fn(search_cfg, inputs.val_images[:val_count], monitor)

    def run_one(lr: float, trial: optuna.Trial | None, number: int) -> float:
        """One trial on every rank; rank 0 holds the Optuna trial and decides pruning for all."""
        def on_report(score: float, step: int) -> None:
            prune = False
            if trial is not None:
                trial.report(score if math.isfinite(score) else -1e9, step)
                prune = trial.should_prune()
            if from_rank0(prune):
                raise optuna.TrialPruned()

        trial_dir = os.path.join(trials_dir, f'trial_{number}')
        try:
            return run_trial(task_name, cfg, lr, inputs, parent_backbone, trial_dir, iterations, report_at,
                             score_fn, on_report)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # a diverging LR (NaN loss) is a failed trial, not a failed search
            if isinstance(exc, NonFiniteLossError):
                if trial is not None:
                    trial.set_user_attr('error', str(exc))
                return -1e9
            raise

    # Ask-and-tell rather than study.optimize: under DDP (torchrun) every rank trains each trial in lockstep,
    # while only rank 0 talks to the storage and broadcasts the LR and the pruning decisions.
    done = 0 if study is None else len([t for t in study.get_trials(deepcopy=False)
                                        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)])
    remaining = from_rank0(n_trials - done)
    attempt = os.path.basename(os.path.dirname(os.path.abspath(trials_dir)))
    for _ in range(max(0, remaining)):
        trial = study.ask() if study is not None else None
        if trial is not None:
            trial.set_user_attr('attempt', attempt)
        lr, number = from_rank0((trial.suggest_float('lr', low, high, log=True), trial.number)
                             if trial is not None else None)
        try:
            score = run_one(lr, trial, number)
        except optuna.TrialPruned:
            if study is not None:
                study.tell(trial, state=TrialState.PRUNED)
            continue
        except BaseException:
            if study is not None:
                study.tell(trial, state=TrialState.FAIL)
            raise
        if study is not None:
            study.tell(trial, score)
        if progress:
            progress('trial', number + 1, n_trials, {'lr': lr, 'score': score})
    completed = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE] \
        if study is not None else []
    outcome = None
    if study is not None:
        if not completed:
            chosen = float(cfg['lr'])
            logger.warning('%s: every LR trial was pruned or failed; using the default lr %g', task_name, chosen)
        else:
            chosen = float(max(completed, key=lambda t: t.value).params['lr'])
        outcome = {'lr': chosen, 'trials': trial_records(study), 'study': study_name, 'storage': storage,
                   'searched': True, 'iterations_per_trial': iterations,
                   'objective': objective_name(search_cfg, monitor)}
    outcome = from_rank0(outcome)   # ranks other than 0 learn the outcome from rank 0
    scores = [t['score'] for t in outcome['trials'] if t['state'] == 'complete' and t['score'] is not None
              and t['score'] > -1e8]
    outcome['spread'] = float(max(scores) - min(scores)) if len(scores) >= 2 else None
    outcome['noise'] = None
    if search_cfg.get('noise_check', True) and scores:
        # the same trial (the chosen LR) again with another seed (initial draws, data order, augmentation):
        # the search discriminates only where the spread of its trials exceeds this
        best = max(scores)
        try:
            repeat = run_trial(task_name, cfg, outcome['lr'], replace(inputs, seed=inputs.seed + NOISE_SEED_OFFSET),
                               parent_backbone, os.path.join(trials_dir, 'noise_check'), iterations, report_at,
                               score_fn, lambda score, step: None)
        except NonFiniteLossError:
            repeat = float('nan')
        if math.isfinite(repeat):
            outcome['noise'] = float(abs(repeat - best))
            outcome['noise_repeat_score'] = float(repeat)
    # every rank trained the repeat, but each scored it on its own copy of the model: rank 0's figure decides for
    # all (under torchrun rank 1's differed, 0.0699 against 0.0472, so the ranks could choose different LRs)
    outcome = from_rank0(outcome)
    outcome['discriminates'] = (None if outcome['spread'] is None or outcome['noise'] is None
                                else bool(outcome['spread'] > outcome['noise']))
    outcome['chosen_by'] = 'best trial'
    if outcome['discriminates'] is False and search_cfg.get('when_noisy', 'default_lr') == 'default_lr':
        # the trials' ranking is within the noise of one trial: the recipe's LR is a better guess than the
        # "best" of them (which a repeat with another seed could reorder)
        outcome['best_trial_lr'] = outcome['lr']
        outcome['lr'] = float(cfg['lr'])
        outcome['chosen_by'] = (f"the recipe's lr: trial spread {outcome['spread']:.4g} <= noise "
                                f"{outcome['noise']:.4g}")
        logger.warning('%s: the LR trials do not discriminate (spread %.4g <= noise %.4g); training with the '
                       "recipe's lr %g rather than the best trial's %g", task_name, outcome['spread'],
                       outcome['noise'], outcome['lr'], outcome['best_trial_lr'])
    return outcome


def objective_name(search_cfg: dict, monitor) -> str:
    """``knn`` or ``pretext``: ``auto`` (the default) is ``knn`` when the pretext data has labels for the kNN
    monitor, else the task's own validation score."""
    objective = search_cfg.get('objective', 'auto')
    if objective == 'auto':
        return 'knn' if monitor is not None else 'pretext'
    return objective


def make_score_fn(search_cfg: dict, val_images: np.ndarray, monitor):
    """The trial objective (higher is better): the task's own validation score on val images, or the kNN
    monitor's balanced accuracy on val (:class:`curriculum.monitor.KnnMonitor`: labeled train memory at the run's
    label fraction, never the test split)."""
    if objective_name(search_cfg, monitor) == 'knn':
        if monitor is None:
            raise ValueError('lr_search.objective=knn needs a labeled pretext dataset')
        return lambda model: monitor.score(model.backbone)
    return lambda model: float(model.validation_score(val_images))
