"""Run one curriculum: per stage an LR search and a training run (cached by stage key), then downstream evaluation.

The scheduler is generic: it walks the planned stages, passing only the backbone file from one to the next, and
never refers to a task by name.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import torch
from mmengine.dist import barrier, get_rank, get_world_size, is_distributed

from benchmarks.datasets import TooFewClassesError, load_dataset
from pretext_tasks.base import initial_backbone

from . import preflight, stage_store
from .cache import stage_dir, stage_key
from .compat import atomic_torch_save, file_sha256, load_checkpoint_file, load_user_weights
from .distributed import from_rank0
from .errors import CheckpointError, EngineError, PlanError
from .lr_search import default_storage, search_lr
from .monitor import KnnMonitor
from .plan import RunPlan, stage_image_size
from .precision import apply_precision, log_once, resolve_precision
from .results import store_run
from .stage import BACKBONE_FILE, STAGE_FILE, StageInputs, stage_groups, train_stage, write_json_atomic

RESULT_FILE = 'result.json'
# An LR trial interrupted by a kill is run again under its own number (curriculum.lr_search); Optuna then
# warns that the intermediate scores the killed process reported are "already reported" (they are the same values).
warnings.filterwarnings('ignore', message='The reported value is ignored because this')


def resolve_device(requested: str) -> str:
    if requested == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return requested


def versions() -> dict:
    import mmengine
    import mmpretrain
    import optuna

    out = {'python': platform.python_version(), 'torch': torch.__version__, 'mmengine': mmengine.__version__,
           'mmpretrain': mmpretrain.__version__, 'optuna': optuna.__version__, 'numpy': np.__version__,
           'platform': platform.platform()}
    try:
        import faiss
        out['faiss'] = faiss.__version__
        out['faiss_gpus'] = int(faiss.get_num_gpus())
    except ImportError:
        out['faiss'] = None
    if torch.cuda.is_available():
        out['cuda_device'] = torch.cuda.get_device_name(0)
    return out


#: the datasets this process loaded last, when it keeps them (:func:`keep_loaded_datasets`)
_LOADED: dict[str, object] = {}
_KEEP = {'count': 0}


def keep_loaded_datasets(count: int) -> None:
    """Keep the last ``count`` loaded pretext datasets in memory: a sweep's worker runs many stages and evaluations
    on the same data (which does not change during a sweep); a single run loads its data once anyway."""
    _KEEP['count'] = int(count)


def _load_pretext_data(config: dict, image_size: int | None = None):
    args = (config['dataset'], config.get('data_root'), int(image_size or config['image_size']), int(config['seed']),
            config.get('dataset_options') or {})
    memo = json.dumps(args, sort_keys=True, default=str)
    if memo in _LOADED:
        return _LOADED[memo]
    data = load_dataset(args[0], args[1], image_size=args[2], seed=args[3], **args[4])
    if _KEEP['count'] > 0:
        while len(_LOADED) >= _KEEP['count']:
            _LOADED.pop(next(iter(_LOADED)))
        _LOADED[memo] = data
    return data


def stage_inputs(ctx: RunContext, stage) -> StageInputs:
    """The run's stage inputs, with the pretext images decoded at the stage's own side when its ``image_scale``
    is not 1 (same images, same split: only the resolution differs; the decoded copies are cached on disk and
    kept for the run)."""
    size = stage_image_size(stage, ctx.inputs.image_size)
    if size == ctx.inputs.image_size:
        return ctx.inputs
    if size not in ctx.scaled_inputs:
        data = _load_pretext_data(ctx.config, size)
        if not np.array_equal(data.split, ctx.pretext.split):
            raise EngineError(f'{data.name} decoded at {size} px has a different split than at '
                              f'{ctx.inputs.image_size} px')
        ctx.scaled_inputs[size] = replace(ctx.inputs, train_images=data.unlabeled('train').images,
                                          val_images=data.unlabeled('val').images, image_size=size)
    return ctx.scaled_inputs[size]


def stage_data_fingerprint(ctx: RunContext, stage) -> str:
    """The data part of a stage's key: the pretext data's fingerprint, plus a digest of the training images' group
    ids for a task that draws on them (their metadata can change while the pixels, labels and split do not)."""
    if stage_groups(stage.task, ctx.inputs) is None:
        return ctx.pretext.fingerprint
    digest = hashlib.sha256(np.ascontiguousarray(ctx.inputs.train_groups, dtype=np.int64).tobytes()).hexdigest()
    return f'{ctx.pretext.fingerprint}:groups={digest[:16]}'


def _load_downstream_data(config: dict, pretext):
    name = config.get('downstream') or config['dataset']
    root = config.get('downstream_root') if config.get('downstream') or config.get('downstream_root') \
        else config.get('data_root')
    options = config.get('downstream_options') or (config.get('dataset_options') if name == config['dataset']
                                                   else {}) or {}
    if name == config['dataset'] and root == config.get('data_root') and options == (
            config.get('dataset_options') or {}):
        return pretext
    return load_dataset(name, root, image_size=int(config['image_size']), seed=int(config['seed']), **options)


def _init_backbone_file(init_path: str, work_root: str, state: dict | None = None) -> tuple[str, str]:
    """Convert user weights (loaded weights-only; ``state`` when already loaded) to an engine backbone file;
    returns (path, parent key)."""
    digest = file_sha256(init_path)
    target = os.path.join(work_root, 'init', f'{digest[:16]}.pth')
    if not os.path.exists(target):
        atomic_torch_save(state if state is not None else load_user_weights(init_path), target)
    return target, f'init:{digest}'


def build_monitor(config: dict, pretext, device: str):
    """The online kNN monitor of the run's stages (also the LR search's ``knn`` objective) and its interval:
    ``(KnnMonitor | None, every)``. None when ``monitor.knn`` is off and the LR search does not need it."""
    settings = dict(config.get('monitor') or {})
    search = config.get('lr_search') or {}
    objective = search.get('objective', 'auto')
    knn_search = objective == 'knn' and int(search.get('trials', 0)) > 0
    if not settings.get('knn', True) and not knn_search:
        return None, 1
    evaluation = config.get('evaluation') or {}
    label_fraction = float(evaluation.get('label_fraction', 1.0))
    try:  # pretext labels of one class would score every backbone 1.0: no monitor rather than a meaningless one
        pretext.check_classes(label_fraction, int(config['seed']))
    except TooFewClassesError as exc:
        if knn_search:
            raise PlanError(f'lr_search.objective=knn cannot rank learning rates on this pretext data: {exc}') \
                from None
        log_once(f'kNN monitor off (the LR search scores trials by the pretext objective): {exc}')
        return None, 1
    monitor = KnnMonitor.from_dataset(pretext, label_fraction, int(config['seed']),
                                      int(settings.get('max_images', 1000)), int(settings.get('k', 20)), device)
    return monitor, int(settings.get('every', 1)) if settings.get('knn', True) else 0


def precision_key(precision, deterministic: bool) -> str:
    """The stage-key part for numerics: device, precision used (fp32 on a CPU key as before this option), model
    memory format where it is not that device's default, deterministic kernels."""
    text = f'{precision.device}:{precision.used}:det={bool(deterministic)}'
    if precision.channels_last != (precision.device == 'cuda' or precision.used != 'fp32'):
        text += f':cl={precision.channels_last}'
    return text


def final_backbone(backbone_cfg: dict, backbone_file: str | None, seed: int) -> torch.nn.Module:
    """The backbone evaluated downstream: the last stage's weights, or a seeded random initialisation."""
    torch.manual_seed(seed)   # the protocols that follow start from the seed's global RNG state, as before
    backbone = initial_backbone(backbone_cfg, seed)
    if backbone_file:
        state = load_checkpoint_file(backbone_file, map_location='cpu')
        result = backbone.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(f'{backbone_file}: weights do not match the backbone config '
                                  f'(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})')
    return backbone


@dataclass
class RunContext:
    """What every step of one run reads: the checked config, the data, the stage inputs and where things go."""
    plan: RunPlan
    config: dict
    device: str
    seed: int
    storage: str                      # Optuna storage of the LR studies
    pretext: object                   # benchmarks.datasets.PreparedDataset
    downstream_data: object
    evaluation: dict
    monitor: KnnMonitor | None
    monitor_every: int
    inputs: StageInputs
    precision: str                    # the stage-key part for numerics
    search_cfg: dict
    init_path: str | None
    init_state: dict | None
    scaled_inputs: dict = field(default_factory=dict)  # side (px) → StageInputs of stages with an image_scale
    fused: list = field(default_factory=list)          # protocol dvme: [(curriculum.fusion.FusedSource, backbone)]
    target: object = None                              # protocol uda: the target PreparedDataset


def prepare_run(plan: RunPlan, work_root: str, results_url: str, init_path: str | None,
                optuna_storage: str | None, work_dir: str) -> RunContext:
    """Every check before any compute (:mod:`curriculum.preflight`: folders, stores, ``--init``, the downstream
    labels, batch sizes, the monitor's labels), then the data and the stage inputs. Writes nothing but the work
    root folder."""
    config = plan.config
    device = resolve_device(config['device'])
    seed = int(config['seed'])
    storage = optuna_storage or default_storage(work_root)
    searching = bool(plan.stages) and int((config.get('lr_search') or {}).get('trials', 0)) > 0
    preflight.check_outputs(work_dir, work_root, results_url, storage if searching or optuna_storage else None)
    preflight.check_backbone(plan)   # the backbone gives each task what it reads (patch tokens, feature maps)
    init_state = preflight.load_init_weights(init_path, dict(config['backbone']), seed) if init_path else None
    pretext = _load_pretext_data(config)
    downstream_data = _load_downstream_data(config, pretext)
    evaluation = dict(config.get('evaluation') or {})
    downstream_data.check_classes(float(evaluation.get('label_fraction', 1.0)), seed)
    fused = preflight.fused_backbones(evaluation, dict(config['backbone']), seed)
    target = preflight.uda_target(evaluation, downstream_data, int(config['image_size']), seed)
    preflight.check_batch_sizes(plan, len(pretext.unlabeled('train')), get_world_size())
    train_groups = preflight.check_groups(plan, pretext)   # None unless a stage's task needs them
    preflight.check_colour(plan, pretext)
    monitor, monitor_every = build_monitor(config, pretext, device)
    os.makedirs(work_root, exist_ok=True)
    inputs = StageInputs(
        train_images=pretext.unlabeled('train').images,
        val_images=pretext.unlabeled('val').images,
        image_size=int(config['image_size']), backbone_cfg=dict(config['backbone']), seed=seed, device=device,
        # rank 0 decides (auto may measure the CPU) and every rank trains in its precision
        precision=from_rank0(resolve_precision(config.get('amp'), device, config.get('channels_last', 'auto'))
                             if get_rank() == 0 else None),
        deterministic=bool(config.get('deterministic')), train_groups=train_groups)
    precision = precision_key(inputs.precision, inputs.deterministic)
    if get_world_size() > 1:  # DDP: the global batch is world size × batch_size, a different stage
        precision += f':ws={get_world_size()}'
    return RunContext(plan=plan, config=config, device=device, seed=seed, storage=storage, pretext=pretext,
                      downstream_data=downstream_data, evaluation=evaluation, monitor=monitor,
                      monitor_every=monitor_every, inputs=inputs, precision=precision,
                      search_cfg=dict(config.get('lr_search') or {}), init_path=init_path, init_state=init_state,
                      fused=fused, target=target)


@dataclass
class PlannedStage:
    """One stage of a run with its cache key and folder; ``parent_file`` is the backbone it starts from (None:
    the seed's random initialisation)."""
    index: int
    stage: object                     # curriculum.plan.StagePlan
    key: str
    parent_key: str | None
    parent_file: str | None
    directory: str


def stage_chain(ctx: RunContext, work_root: str) -> tuple[list[PlannedStage], str | None]:
    """The run's stages with their keys and folders, each starting from the previous one's backbone (or
    ``--init``), and the backbone the run evaluates when it has no stage (the ``--init`` file or None). Writes
    nothing but the engine's copy of ``--init`` weights. The keys make orderings that share a prefix share those
    stages; the scheduler knows stages only by their keys and files, never a task by name."""
    parent_file, parent_key = (None, None)
    if ctx.init_path:
        parent_file, parent_key = _init_backbone_file(ctx.init_path, work_root, ctx.init_state)
    start_file = parent_file
    chain = []
    for index, stage in enumerate(ctx.plan.stages):
        key = stage_key(parent_key, stage.task, stage.cfg, ctx.search_cfg, ctx.seed,
                        stage_data_fingerprint(ctx, stage), ctx.inputs.image_size, ctx.inputs.backbone_cfg,
                        ctx.precision)
        directory = stage_dir(work_root, stage.task, key)
        chain.append(PlannedStage(index, stage, key, parent_key, parent_file, directory))
        parent_file, parent_key = os.path.join(directory, BACKBONE_FILE), key
    return chain, start_file


def run_planned_stage(ctx: RunContext, planned: PlannedStage, progress=None, total: int | None = None,
                      node_token: str | None = None) -> dict:
    """One stage from the cache, or its LR search and training (an attempt folder published into the cache, see
    :mod:`curriculum.stage_store`); its parent's backbone must be in the cache. ``node_token`` names the sweep
    node that runs it: a retried node that finds the stage published by its own earlier try reports it as
    trained, not as a cache hit."""
    if progress:
        progress('stage', planned.index + 1, total or len(ctx.plan.stages),
                 {'task': planned.stage.task, 'key': planned.key})
    return _cached_or_train(ctx, planned, progress, time.time(), node_token)


def run_stages(ctx: RunContext, work_root: str, progress=None) -> tuple[list[dict], str | None]:
    """Each planned stage in turn, from the cache or trained (its LR search first); returns the stage records and
    the last backbone file."""
    chain, backbone_file = stage_chain(ctx, work_root)
    stages = []
    for planned in chain:
        stages.append(run_planned_stage(ctx, planned, progress, len(chain)))
        backbone_file = os.path.join(planned.directory, BACKBONE_FILE)
    return stages, backbone_file


def evaluate_backbone(ctx: RunContext, backbone_file: str | None, progress=None) -> tuple[dict, object]:
    """The downstream protocols on the final backbone (or the seed's random initialisation): ``(metrics per
    protocol, the fine-tuned model or None)``."""
    from benchmarks.protocols import evaluate

    backbone = final_backbone(ctx.inputs.backbone_cfg, backbone_file, ctx.seed)
    apply_precision(backbone, backbone, ctx.inputs.precision)
    protocols = list(ctx.evaluation.get('protocols') or [])
    if progress:
        progress('downstream', 0, len(protocols), {'dataset': ctx.downstream_data.name})
    # the step budget of fine-tuning (evaluation.finetune: steps, eval_every, patience) and its learning rate, only
    # the keys set
    finetune = {name: float(value) if name == 'lr' else int(value)
                for name, value in (ctx.evaluation.get('finetune') or {}).items() if value is not None}
    options = {'finetune': finetune} if finetune else {}
    options.update(protocol_inputs(ctx))
    downstream = evaluate(backbone, ctx.downstream_data, protocols,
                          label_fraction=float(ctx.evaluation.get('label_fraction', 1.0)), seed=ctx.seed,
                          device=ctx.device, epochs=ctx.evaluation.get('epochs'),
                          batch_size=int(ctx.evaluation.get('batch_size', 64)), options=options or None)
    if 'dvme' in downstream:
        downstream['dvme']['fused_runs'] = [source.describe() for source, _ in getattr(ctx, 'fused', [])]
    finetuned = (downstream.get('finetune') or {}).pop('model', None)
    for metrics in downstream.values():
        metrics.pop('model', None)
    return downstream, finetuned


def protocol_inputs(ctx: RunContext) -> dict:
    """The options of protocols dvme (the other backbones, in the run's precision, and this run's name) and uda
    (the target dataset and the protocol's settings from ``evaluation.uda``), for those requested."""
    from .config_schema import UDA_DATA_KEYS
    from .leaderboard import run_label

    options = {}
    fused, target = getattr(ctx, 'fused', None), getattr(ctx, 'target', None)   # a partial context: neither
    if fused:
        sources = [(source.name, apply_precision(module, module, ctx.inputs.precision)) for source, module in fused]
        options['dvme'] = {'sources': sources,
                           'name': run_label({'order': ctx.plan.order, 'init': ctx.init_path})}
    if target is not None:
        settings = {key: value for key, value in (ctx.evaluation.get('uda') or {}).items()
                    if key not in UDA_DATA_KEYS and value is not None}
        options['uda'] = {**settings, 'target': target}
    return options


def result_record(ctx: RunContext, stages: list[dict], downstream: dict, started: float, work_root: str,
                  results_url: str) -> dict:
    """The run's ``result.json`` content."""
    config, data = ctx.config, ctx.downstream_data
    return {
        'order': list(ctx.plan.order),
        'dataset': ctx.pretext.name,
        'downstream_dataset': data.name,
        'seed': ctx.seed,
        'label_fraction': float(ctx.evaluation.get('label_fraction', 1.0)),
        'image_size': ctx.inputs.image_size,
        'init': os.path.abspath(ctx.init_path) if ctx.init_path else None,
        'stages': [_stage_summary(record) for record in stages],
        'downstream': downstream,
        'classes': list(data.class_names),
        'split': {'origin': data.split_origin,
                  **{name: int((data.split == name).sum()) for name in ('train', 'val', 'test')}},
        'device': ctx.device,
        'precision': ctx.inputs.precision.as_dict(),
        'seconds': time.time() - started,
        'created': datetime.now(timezone.utc).isoformat(timespec='seconds'),
        'config': config,
        'config_hash': hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12],
        'work_root': os.path.abspath(work_root),
        'optuna_storage': ctx.storage,
        'results_url': _public_url(results_url),
        'versions': versions(),
    }


def record_result(ctx: RunContext, result: dict, finetuned, work_dir: str, results_url: str) -> str | None:
    """Write ``result.json`` (beside the work dir when it cannot take it), the fine-tuned model, one record in the
    results store and the TensorBoard scalars; returns the result file's path (None when nowhere could take it)."""
    with _work_dir_lock(work_dir):  # two runs in one work dir write, record and rewrite their results in turn
        _remove_temporaries(work_dir)
        if finetuned is not None:  # kept for Grad-CAM / attention analysis (loaded back only by this engine)
            _save_finetuned(finetuned, ctx.inputs.backbone_cfg, list(ctx.downstream_data.class_names), work_dir)
        path = _write_result(work_dir, result)
        try:
            result['results_id'], stored = store_run(results_url, result)
        except EngineError as exc:
            where = f'the result is in {path}' if path else 'the result could not be written either'
            raise EngineError(f'{exc} ({where})') from None
        if not stored:
            _warn(f'note: the results store already holds this run (id {result["results_id"]}); not stored again')
        if path:
            _rewrite_result(path, result)
    try:
        _write_tensorboard(work_dir, result)
    except OSError as exc:
        _warn(f'cannot write TensorBoard scalars under {work_dir} ({exc.strerror or exc})')
    return path


def run_curriculum(plan: RunPlan, work_dir: str, work_root: str, results_url: str, init_path: str | None = None,
                   optuna_storage: str | None = None, progress=None) -> dict:
    """Execute ``plan``; write ``<work_dir>/result.json`` and one record in the results store; return the result.

    Everything the run needs is checked first and nothing is written before those checks pass
    (:func:`prepare_run`); the work dir itself is made only when the result is written. Under DDP every rank
    trains the stages and rank 0 alone evaluates and records (the others return None)."""
    started = time.time()
    ctx = prepare_run(plan, work_root, results_url, init_path, optuna_storage, work_dir)
    stages, backbone_file = run_stages(ctx, work_root, progress)
    if get_rank() != 0:
        return None
    downstream, finetuned = evaluate_backbone(ctx, backbone_file, progress)
    result = result_record(ctx, stages, downstream, started, work_root, results_url)
    path = record_result(ctx, result, finetuned, work_dir, results_url)
    if path:
        result['result_file'] = path  # where it was written (not part of the file itself)
    return result


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _remove_temporaries(work_dir: str) -> None:
    """Temporary files a killed run left in its work dir (the caller holds the work dir lock)."""
    try:
        for name in os.listdir(work_dir):
            if name.endswith('.tmp'):
                os.remove(os.path.join(work_dir, name))
    except OSError:
        pass  # an unwritable work dir: _write_result writes beside it


def _save_finetuned(model, backbone_cfg: dict, classes: list[str], work_dir: str) -> None:
    path = os.path.join(work_dir, 'finetuned.pth')
    try:
        atomic_torch_save({'backbone': model.backbone.state_dict(), 'head': model.head.state_dict(),
                           'backbone_cfg': backbone_cfg, 'classes': classes}, path)
    except OSError as exc:
        _warn(f'warning: cannot write {path} ({exc.strerror or exc}); the fine-tuned model is not kept')


@contextmanager
def _work_dir_lock(work_dir: str):
    """An exclusive lock on the work dir itself (flock on the folder, released by the OS if the process dies), when
    the folder can be made; without one the result is still written (beside the work dir, see _write_result). It
    only orders two copies of one run started by hand in one folder (each keeps its result.json); stages and sweeps
    take no lock (curriculum.stage_store, curriculum.sweep)."""
    try:
        os.makedirs(work_dir, exist_ok=True)
        handle = os.open(work_dir, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def _read_stage_record(directory: str) -> dict:
    with open(os.path.join(directory, STAGE_FILE)) as handle:
        return json.load(handle)


def _cached_or_train(ctx: RunContext, planned: PlannedStage, progress, stage_started: float,
                     node_token: str | None = None) -> dict:
    """The stage's record from the cache, or an LR search and a training run in an attempt folder that is then
    published into the cache. Under DDP every rank trains; rank 0 claims, writes and publishes the folder and
    shares the record."""
    stage, directory = planned.stage, planned.directory
    attempt = from_rank0(stage_store.claim(directory, log=_warn) if get_rank() == 0 else None)
    if attempt is None:
        record = None
        if get_rank() == 0:
            record = _read_stage_record(directory)
            ours = node_token is not None and record.get('trained_for') == node_token
            record.update(cache_hit=not ours, seconds=(
                float(record.get('lr_search_seconds') or 0) + float(record.get('train_seconds') or 0) if ours
                else time.time() - stage_started))
            _drop_epoch_checkpoints(directory)  # left behind by engines that published before dropping them
        return from_rank0(record)
    inputs = stage_inputs(ctx, stage)
    try:
        search = search_lr(stage.task, stage.cfg, ctx.search_cfg, inputs, planned.parent_file, planned.key,
                           ctx.storage, os.path.join(attempt, 'lr_search'), progress, ctx.monitor,
                           writer_alive=lambda name: stage_store.writer_may_be_alive(os.path.dirname(directory),
                                                                                     name))
        search_seconds = time.time() - stage_started
        if progress and search.get('searched'):
            progress('lr_search', 0, 0, search)
        record = train_stage(stage.task, stage.cfg, search['lr'], inputs, planned.parent_file, attempt, progress,
                             ctx.monitor if ctx.monitor_every > 0 else None, max(1, ctx.monitor_every))
    except BaseException:
        if get_rank() == 0:
            stage_store.release(attempt)   # a later attempt takes it over and resumes
        raise
    record.update(key=planned.key, parent_key=planned.parent_key, lr_search=search, lr_search_seconds=search_seconds,
                  precision=inputs.precision.as_dict(),
                  train_seconds=time.time() - stage_started - search_seconds, stage_dir=directory)
    if node_token is not None:
        record['trained_for'] = node_token
    published = True
    if get_rank() == 0:
        write_json_atomic(os.path.join(attempt, STAGE_FILE), record)
        _drop_epoch_checkpoints(attempt)
        published = stage_store.publish(attempt, directory)
        if not published:   # another writer published this stage first: its copy is the stage
            record = _read_stage_record(directory)
    if is_distributed():
        barrier()  # the next stage reads this stage's backbone file on every rank
    record = dict(record, cache_hit=not published, seconds=time.time() - stage_started)
    return from_rank0(record)


def _public_url(url: str) -> str:
    """A storage URL without its password (results are shared; credentials are not)."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL: keep nothing that could hold a secret
        return ''


def _drop_epoch_checkpoints(directory: str) -> None:
    """A finished stage needs only ``backbone.pth`` and ``stage.json``: its resume checkpoints (weights, optimizer
    state, memory banks) are removed to keep sweeps of many orderings within disk limits."""
    for name in os.listdir(directory):
        if name.startswith('epoch_') and (name.endswith('.pth') or name.endswith('.pth.sha256')):
            os.remove(os.path.join(directory, name))
    last = os.path.join(directory, 'last_checkpoint')
    if os.path.exists(last):
        os.remove(last)


def _write_tensorboard(work_dir: str, result: dict) -> None:
    """Per-stage epoch curves and downstream metrics of this run as TensorBoard scalars in ``<work_dir>/tb``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(work_dir, 'tb'))
    try:
        for index, stage in enumerate(result['stages'], 1):
            for entry in stage.get('history', []):
                for key, value in entry.items():
                    if key != 'epoch' and isinstance(value, (int, float)):
                        writer.add_scalar(f'stage{index}_{stage["task"]}/{key}', value, entry['epoch'])
        for protocol, metrics in result['downstream'].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    writer.add_scalar(f'downstream_{protocol}/{key}', value, 0)
    finally:
        writer.close()


def _stage_summary(record: dict) -> dict:
    search = record.get('lr_search') or {}
    return {
        'task': record['task'], 'lr': record['lr'], 'epochs': record['epochs'],
        'num_images': record.get('num_images'), 'image_size': record.get('image_size'),
        'batch_size': record.get('batch_size'),
        'lr_search': {'trials': search.get('trials', []), 'study': search.get('study'),
                      'searched': search.get('searched', False),
                      'iterations_per_trial': search.get('iterations_per_trial'),
                      'objective': search.get('objective'), 'spread': search.get('spread'),
                      'noise': search.get('noise'), 'discriminates': search.get('discriminates'),
                      'chosen_by': search.get('chosen_by'), 'best_trial_lr': search.get('best_trial_lr')},
        'final_loss': record.get('final_loss'), 'first_loss': record.get('first_loss'),
        'seconds': record.get('seconds'), 'lr_search_seconds': record.get('lr_search_seconds'),
        'train_seconds': record.get('train_seconds'), 'cache_hit': bool(record.get('cache_hit')),
        'key': record.get('key'), 'stage_dir': record.get('stage_dir'), 'history': record.get('history', []),
        'resumed_at_epoch': record.get('resumed_at_epoch', 0),
        'precision': record.get('precision'),
        'monitor': record.get('monitor'),
    }


def _write_result(work_dir: str, result: dict) -> str | None:
    """Write result.json atomically; an earlier result is kept as ``result.<created>.json``, never overwritten.
    Where the work dir cannot be written (it became read-only, the disk is full, ...) the result is written beside
    it instead (:func:`_write_beside`) and a warning says where. Returns the path written (None: nowhere)."""
    path = os.path.join(work_dir, RESULT_FILE)
    try:
        os.makedirs(work_dir, exist_ok=True)
        if os.path.exists(path):
            try:
                with open(path) as handle:
                    previous = json.load(handle).get('created', 'previous')
            except (OSError, ValueError, AttributeError):
                previous = 'unreadable'
            stamp = str(previous).replace(':', '').replace('+', '_')
            target = os.path.join(work_dir, f'result.{stamp}.json')
            suffix = 1
            while os.path.exists(target):
                target = os.path.join(work_dir, f'result.{stamp}.{suffix}.json')
                suffix += 1
            os.replace(path, target)
        write_json_atomic(path, result)
        return path
    except OSError as exc:
        fallback = _write_beside(work_dir, result)
        _warn(f'warning: cannot write {path} ({exc.strerror or exc}); '
              + (f'the result is written to {fallback} instead' if fallback else 'nor anywhere beside it'))
        return fallback


def _write_beside(work_dir: str, result: dict) -> str | None:
    """Write the result next to the work dir (``<work dir>.result.json``, numbered if taken), else in the system's
    temporary folder; returns the path, or None when nothing could be written."""
    work_dir = os.path.abspath(work_dir)
    stem = os.path.basename(work_dir.rstrip(os.sep)) or 'run'
    for folder in (os.path.dirname(work_dir), tempfile.gettempdir()):
        candidate = os.path.join(folder, f'{stem}.{RESULT_FILE}')
        suffix = 1
        while os.path.exists(candidate):
            candidate = os.path.join(folder, f'{stem}.result.{suffix}.json')
            suffix += 1
        try:
            write_json_atomic(candidate, result)
            return candidate
        except OSError:
            continue
    return None


def _rewrite_result(path: str, result: dict) -> None:
    """Replace the result written at ``path`` by this run with its final version (with the store id)."""
    try:
        write_json_atomic(path, result)
    except OSError as exc:
        _warn(f'warning: cannot update {path} with the results-store id ({exc.strerror or exc})')
