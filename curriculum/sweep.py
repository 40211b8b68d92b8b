"""Sweeps over orderings shared by several worker processes through an Optuna study used as a job queue.

Each job (ordering, seed, init) is an enqueued trial of a study named ``sweep/<id>`` in the chosen storage (SQLite
by default, PostgreSQL for several machines). A worker takes a waiting trial, runs the curriculum and tells the
result. Workers record heartbeats; a trial whose worker died is failed after the grace period and put back in the
queue by Optuna's ``RetryHeartbeatStaleTrialCallback`` (``RetryFailedTrialCallback`` before Optuna 4.9), so another
worker picks it up. A job whose result is already in the
results store is not run again.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import threading
import time
import warnings

import optuna
from optuna.distributions import IntDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)
logger = logging.getLogger(__name__)
# The queue uses Optuna's heartbeat machinery (experimental since 2.8) with ask/tell instead of Study.optimize, on
# purpose: workers send their own heartbeats. Optuna warns about both on every call; the warnings say nothing a
# user can act on, so they are silenced here: Optuna's ExperimentalWarning and that one UserWarning.
warnings.filterwarnings('ignore', category=ExperimentalWarning)
warnings.filterwarnings('ignore', message='Heartbeat of storage is supposed to be used with Study.optimize')


def sweep_id(jobs: list[dict], config: dict) -> str:
    text = json.dumps({'jobs': jobs, 'config': config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _retry_stale_trials(max_retry: int = 5) -> dict:
    """The storage argument that re-enqueues a dead worker's job, under its name in the installed Optuna (renamed
    in 4.9, the old name goes in 6.0)."""
    if 'heartbeat_stale_trial_callback' in inspect.signature(RDBStorage.__init__).parameters:
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        return {'heartbeat_stale_trial_callback': RetryHeartbeatStaleTrialCallback(max_retry=max_retry)}
    from optuna.storages import RetryFailedTrialCallback
    return {'failed_trial_callback': RetryFailedTrialCallback(max_retry=max_retry)}


def open_storage(url: str, heartbeat: int = 10, grace: int = 60) -> RDBStorage:
    return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=grace, **_retry_stale_trials(),
                      engine_kwargs={'pool_pre_ping': True})


class SweepQueue:
    """The shared job queue of one sweep."""

    def __init__(self, storage: RDBStorage, name: str):
        self.storage = storage
        self.name = name
        self.study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True,
                                         direction='maximize')

    def fill(self, jobs: list[dict]) -> int:
        """Enqueue the jobs not already in the study (idempotent when several processes fill it)."""
        known = {t.user_attrs.get('job_index') for t in self.study.get_trials(deepcopy=False)}
        added = 0
        for index, job in enumerate(jobs):
            if index in known:
                continue
            self.study.enqueue_trial({'job': index}, user_attrs={'job_index': index, 'job': job},
                                     skip_if_exists=True)
            added += 1
        self.study.set_user_attr('jobs', len(jobs))
        return added

    def _pending(self) -> tuple[int, int]:
        trials = self.study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        waiting = sum(t.state == TrialState.WAITING for t in trials)
        return waiting, len(trials) - waiting

    def take(self, poll: float = 2.0):
        """The next job as ``(trial, job)``, waiting while other workers still hold running jobs; None when the
        sweep is complete."""
        jobs = int(self.study.user_attrs.get('jobs', 0))
        while True:
            fail_stale_trials(self.study)   # re-enqueues jobs of dead workers (retry callback)
            waiting, running = self._pending()
            if waiting:
                trial = self.study.ask({'job': IntDistribution(0, max(jobs - 1, 0))})
                if 'job' in trial.user_attrs:
                    return trial, trial.user_attrs['job']
                # another worker took the last waiting job between our check and ask: discard this empty trial
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            if not running:
                return None
            time.sleep(poll)

    def finish(self, trial, value: float | None) -> None:
        self.study.tell(trial, value if value is not None else float('nan'))

    def fail(self, trial) -> None:
        self.study.tell(trial, state=TrialState.FAIL)


class Heartbeat:
    """Records a trial's heartbeat from a background thread while its job runs."""

    def __init__(self, storage: RDBStorage, trial, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial._trial_id, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as exc:  # a transient storage error must not kill the job
                logger.warning('heartbeat failed: %s', exc)

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
