"""Plan-time checks of everything outside the config that a run needs, before any compute and before anything is
written: the work dir and work root can be created and written, the results store and the Optuna storage can be
opened, ``--init`` weights load weights-only and fit the backbone, the downstream data have at least two classes
with labeled training images, every stage's batch fits the training images, the backbone gives every stage's
task what it reads (a vision transformer's patch tokens, convolutional feature maps, inputs of at least one patch),
the backbones named by ``--fuse`` (protocol dvme) exist and fit their configs, and the target of protocol uda
loads and shares at least two classes with the downstream data.

Each problem is a one-line :class:`~curriculum.errors.PlanError` (or the data layer's / checkpoint layer's own
error), so the tools end with exit code 2 and leave existing folders as they were. Nothing here creates a file or a
folder: writability is probed with an anonymous temporary file, a store that does not exist yet only needs a
writable folder.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .errors import CheckpointError, PlanError


def check_writable_dir(path: str, what: str) -> None:
    """``path`` is a writable folder, or a folder that can be created (its nearest existing ancestor is a writable
    folder)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        where = 'is a file' if existing == path else f'is under {existing}, which is a file'
        raise PlanError(f'{what} {path} {where}, not a folder')
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        where = '' if existing == path else f' (its folder {existing} is not writable)'
        raise PlanError(f'{what} {path} is not writable{where}: {exc.strerror or exc}') from None


def public_url(url: str) -> str:
    """``url`` with its password hidden (for messages)."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it is a secret we could recognise
        return str(url)


def check_database(url: str, what: str, timeout: int = 10) -> None:
    """An SQLAlchemy URL that can be opened now: a server that answers, or an SQLite file that is a database (a
    file that does not exist yet needs only a writable folder; it is created when first used)."""
    import sqlalchemy as sa

    try:
        parsed = sa.engine.make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError and friends
        raise PlanError(f'{what} {url!r} is not a database URL ({str(exc).splitlines()[0]})') from None
    connect_args = {}
    if parsed.get_backend_name() == 'sqlite':
        database = parsed.database
        if database and database != ':memory:' and not database.startswith('file:'):
            if os.path.isdir(database):
                raise PlanError(f'{what} {database} is a folder, not an SQLite file')
            if not os.path.exists(database):
                check_writable_dir(os.path.dirname(os.path.abspath(database)), f'folder of the {what}')
                return
        query = 'SELECT count(*) FROM sqlite_master'   # fails on a file that is not a database
    else:
        if parsed.get_backend_name() in ('postgresql', 'mysql', 'mariadb'):
            connect_args['connect_timeout'] = timeout
        query = 'SELECT 1'
    try:
        engine = sa.create_engine(url, connect_args=connect_args)
        try:
            with engine.connect() as connection:
                connection.execute(sa.text(query))
        finally:
            engine.dispose()
    except Exception as exc:  # unreachable server, wrong credentials, missing driver, not a database file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f'cannot open {what} {public_url(url)!r}: {detail}') from None


def check_outputs(work_dir: str, work_root: str, results_url: str, optuna_storage: str | None) -> None:
    """Work dir, work root, results store and (when it will be used) the Optuna storage."""
    check_writable_dir(work_dir, 'work dir')
    check_writable_dir(work_root, 'work root')
    check_database(results_url, 'results store')
    if optuna_storage:
        check_database(optuna_storage, 'Optuna storage')


def load_init_weights(init_path: str, backbone_cfg: dict, seed: int) -> dict:
    """``--init`` weights, loaded weights-only, checked key by key against the configured backbone."""
    from pretext_tasks.base import initial_backbone

    from .compat import load_user_weights

    state = load_user_weights(init_path)
    result = initial_backbone(backbone_cfg, seed).load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f'{init_path}: weights do not match the configured backbone '
                              f'(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})')
    return state


def check_batch_sizes(plan, train_images: int, world_size: int) -> None:
    """Every stage's batch fits the training images (per process under DDP)."""
    per_rank = train_images // max(world_size, 1)
    for stage in plan.stages:
        if int(stage.cfg['batch_size']) > per_rank:
            raise PlanError(f'{stage.task}: batch size {stage.cfg["batch_size"]} exceeds the {per_rank} training '
                            f'images per process')


def check_groups(plan, pretext):
    """The training images' int64 group ids (patient / lesion) when a stage's task ``needs_groups``, else None. A
    PlanError when such a task meets data without group ids, or a split that puts one group in two splits (the
    task's positives are drawn within the training split; a shared group would also leak between the splits)."""
    from pretext_tasks.registry import TASKS

    needing = [stage.task for stage in plan.stages if getattr(TASKS.get(stage.task), 'needs_groups', False)]
    if not needing:
        return None
    if not pretext.has_groups:
        raise PlanError(f'{needing[0]}: needs group ids (patient or lesion) of the training images, and dataset '
                        f'{pretext.name} has none; use a layout that gives them (e.g. ham10000, isic2019 with its '
                        f'metadata, nih_cxr14, chexpert, siim_covid, synthetic_derm)')
    shared = pretext.groups_across_splits()
    if shared:
        raise PlanError(f'{needing[0]}: {len(shared)} group(s) of {pretext.name} span two splits (e.g. '
                        f'{shared[0]!r}); it needs a split grouped by patient / lesion')
    return pretext.group_ids('train')


def is_grayscale(images, sample: int = 256) -> bool:
    """Whether ``(N, H, W, C)`` uint8 images carry no colour: one channel, or (in the first ``sample`` images) three
    equal ones."""
    if images.shape[-1] == 1:
        return True
    head = np.asarray(images[:sample])
    return bool((head == head[..., :1]).all())


def check_colour(plan, pretext) -> None:
    """A PlanError when a stage's task ``needs_colour`` and the pretext training images are grayscale (there would
    be no colour to learn from)."""
    from pretext_tasks.registry import TASKS

    needing = [stage.task for stage in plan.stages if getattr(TASKS.get(stage.task), 'needs_colour', False)]
    if needing and is_grayscale(pretext.unlabeled('train').images):
        raise PlanError(f'{needing[0]}: predicts colour, and the training images of {pretext.name} are grayscale; '
                        f'use colour images or leave {needing[0]} out of the order')


#: (backbone config, image size) → (patch size or None, output shape): the probe of :func:`check_backbone`, once
#: per process (a sweep checks the same backbone for every ordering)
_BACKBONE_PROBES: dict[tuple[str, int], tuple[int | None, tuple[int, ...]]] = {}


def probe_backbone(backbone_cfg: dict, image_size: int) -> tuple[int | None, tuple[int, ...]]:
    """``(patch size of a vision transformer or None, shape of the last output for image_size px images)`` of the
    configured backbone, built once per process and configuration (no weights are loaded; the caller's random
    stream is left as it was). A backbone that cannot be built, or fails on such images, is a one-line error."""
    import json

    import torch

    from benchmarks.backbones import output_shape, patch_size_of
    from pretext_tasks.base import build_backbone

    key = (json.dumps(backbone_cfg, sort_keys=True, default=str), int(image_size))
    if key not in _BACKBONE_PROBES:
        with torch.random.fork_rng(devices=[]):
            backbone = build_backbone(dict(backbone_cfg))
        try:
            shape = output_shape(backbone, int(image_size))
        except (RuntimeError, ValueError, AssertionError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise PlanError(f'backbone {backbone_cfg.get("type", "backbone")} fails on {image_size} px images: '
                            f'{detail}') from None
        _BACKBONE_PROBES[key] = (patch_size_of(backbone), shape)
    return _BACKBONE_PROBES[key]


def check_backbone(plan) -> None:
    """The configured backbone can be built and run on the run's images, and it gives every stage's task what the
    task reads: a PlanError when a task that ``needs_patch_tokens`` (iBOT) meets a backbone that is not a vision
    transformer, when a task that ``needs_feature_map`` (ColorMe's decoder) meets one that returns vectors or
    tokens, or when a task feeds a vision transformer inputs smaller than one of its patches (e.g. small local
    crops or relloc's patches against a large ``patch_size``). The backbone is probed once per configuration
    (:func:`probe_backbone`)."""
    from pretext_tasks.registry import TASKS

    from .plan import stage_image_size

    if not plan.stages:
        return
    config = plan.config
    name = config['backbone'].get('type', 'backbone')
    image_size = int(config['image_size'])
    patch, shape = probe_backbone(dict(config['backbone']), image_size)
    for stage in plan.stages:
        task = TASKS[stage.task]
        if getattr(task, 'needs_patch_tokens', False) and patch is None:
            raise PlanError(f'{stage.task}: needs the patch tokens of a vision transformer, and the backbone {name} '
                            f'has none; use e.g. --cfg-options backbone.type=VisionTransformer '
                            f'backbone.arch=deit-tiny backbone.img_size={image_size} '
                            f'backbone.patch_size={max(1, image_size // 8)}')
        if getattr(task, 'needs_feature_map', False) and len(shape) != 4:
            hint = ' (a VisionTransformer returns them with backbone.out_type=featmap)' if patch else ''
            returned = '(N, ' + ', '.join(str(v) for v in shape[1:]) + ')'
            raise PlanError(f'{stage.task}: needs convolutional feature maps (N, C, H, W) from the backbone, and '
                            f'{name} returns {returned} for {image_size} px images{hint}')
        if patch is not None:
            sizes = task.backbone_input_sizes(stage.cfg, stage_image_size(stage, image_size))
            small = [size for size in sizes if size < patch]
            if small:
                raise PlanError(f'{stage.task}: feeds its backbone {small[0]} px inputs, smaller than one '
                                f'{patch} px patch of {name}; use a smaller backbone.patch_size or larger inputs')


def fused_backbones(evaluation: dict, backbone_cfg: dict, seed: int) -> list:
    """The backbones protocol dvme fuses with the run's own (``evaluation.fuse``), resolved and loaded:
    ``[(FusedSource, backbone)]``; empty when dvme is not requested (:mod:`curriculum.fusion`)."""
    if 'dvme' not in (evaluation.get('protocols') or []):
        return []
    from .fusion import fused_backbones as load

    return load(evaluation.get('fuse') or [], backbone_cfg, seed)


def uda_target(evaluation: dict, source, image_size: int, seed: int):
    """The target dataset of protocol uda (``evaluation.uda.target``, ``target_root``, ``target_options``) decoded
    at ``image_size``, or None when uda is not requested. Its split is drawn without its labels where the layout
    publishes none, and no decision here uses its labels: only its class names are matched against the downstream
    (source) classes. A PlanError when fewer than two classes match, or when the matched classes have fewer than
    two with labelled source training images."""
    if 'uda' not in (evaluation.get('protocols') or []):
        return None
    from benchmarks.datasets import load_dataset
    from benchmarks.protocols.uda import ClassMatchError, match_classes

    uda = evaluation.get('uda') or {}
    target = load_dataset(uda['target'], uda.get('target_root'), image_size=image_size, seed=seed, stratify=False,
                          **(uda.get('target_options') or {}))
    if source.multilabel or target.multilabel:
        which = source.name if source.multilabel else target.name
        raise PlanError(f'uda: {which} is multi-label; domain adaptation here is single-label')
    try:
        mapping, _ = match_classes(list(source.class_names), list(target.class_names), uda.get('class_map'))
    except ClassMatchError as exc:
        raise PlanError(f'uda ({source.name} -> {target.name}): {exc}') from None
    train = source.train_indices(float(evaluation.get('label_fraction', 1.0)), seed)
    present = {mapping[c] for c in np.unique(source.labels[train]).tolist() if c in mapping}
    if len(present) < 2:
        raise PlanError(f'uda ({source.name} -> {target.name}): the labelled source training images hold '
                        f'{len(present)} of the matched classes; at least 2 are needed')
    target.indices('train')   # EmptySplitError (one line) when the target has no training or test images
    target.indices('test')
    return target
