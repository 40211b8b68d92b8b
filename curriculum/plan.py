"""Configs and plans: parse ``--order odc,moco`` and the YAML config into a validated list of stages.

Everything a run needs is checked here, before any compute and before anything is written, so a bad flag, order
or config ends with one line and exit code 2 and leaves existing work directories untouched. YAML is read with
``yaml.safe_load`` only.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pretext_tasks.errors import PretextError
from pretext_tasks.registry import TASKS

from .config_schema import check_config_keys, read_yaml, recipe_path
from .errors import PlanError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
DEFAULT_CONFIG = os.path.join(CONFIG_DIR, 'default.yaml')
NO_PRETRAINING = 'none'
KNOWN_PROTOCOLS = ('linear', 'finetune', 'knn', 'dvme', 'uda')
STAGE_KEYS_REQUIRED = ('epochs', 'batch_size', 'lr', 'lr_range', 'optimizer')
#: the largest side (px) any stage decodes its images at (image_size, and image_size × a stage's image_scale)
MAX_IMAGE_SIZE = 1024


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_dotted(config: dict, options: dict[str, Any]) -> dict:
    """Apply mmengine-style ``--cfg-options a.b=value`` overrides."""
    out = copy.deepcopy(config)
    for dotted, value in (options or {}).items():
        node = out
        parts = dotted.split('.')
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return out


def load_config(path: str | None = None, options: dict[str, Any] | None = None) -> dict:
    """The default config, merged with a user config file (which may hold only some keys) and overrides. A key
    the schema does not know (a typo) is a PlanError naming it and the closest known key
    (:mod:`curriculum.config_schema`)."""

    config = read_yaml(DEFAULT_CONFIG)
    if path and os.path.abspath(path) != os.path.abspath(DEFAULT_CONFIG):
        user = read_yaml(path)
        backbone = user.get('backbone')
        config = deep_merge(_without_other_backbone(config, backbone.get('type') if isinstance(backbone, dict)
                                                    else None), user)
    options = options or {}
    config = apply_dotted(_without_other_backbone(config, options.get('backbone.type')), options)
    check_config_keys(config, CONFIG_DIR, KNOWN_PROTOCOLS)
    return config


def _without_other_backbone(config: dict, new_type: Any) -> dict:
    """``config`` with an empty backbone mapping when an override names another backbone ``type``: the keys of the
    backbone it replaces (a ResNet's ``depth``, ``out_indices``) mean something else or nothing to the new class,
    so ``--cfg-options backbone.type=VisionTransformer backbone.arch=deit-tiny`` builds exactly what it names. The
    same type (or none named) keeps the mapping for the override to merge into."""
    backbone = config.get('backbone')
    if new_type is None or not isinstance(backbone, dict) or backbone.get('type') == new_type:
        return config
    return {**config, 'backbone': {}}


def task_recipe(task: str) -> dict:
    """``configs/tasks/<task>.yaml``."""
    return read_yaml(recipe_path(task, CONFIG_DIR))


def recipes_for(orders: list[str]) -> dict[str, dict]:
    """The recipe of every task named in ``orders`` (``'odc,moco'``, ``'none'``), read now: what a sweep hands its
    nodes so that a recipe edited while it runs changes none of its jobs."""
    return {task: task_recipe(task) for task in sorted({task for text in orders for task in parse_order(text)})}


@dataclass
class StagePlan:
    task: str
    cfg: dict                       # the task's resolved recipe (epochs, batch_size, lr, lr_range, optimizer, ...)

    @property
    def epochs(self) -> int:
        return int(self.cfg['epochs'])


@dataclass
class RunPlan:
    order: list[str]
    stages: list[StagePlan]
    config: dict
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return ','.join(self.order) if self.order else NO_PRETRAINING


def parse_order(text: str) -> list[str]:
    """``'odc,moco'`` → ``['odc', 'moco']``; ``'none'`` → ``[]``. Unknown, repeated or empty → PlanError."""
    if text is None or not str(text).strip():
        raise PlanError('--order is empty: give comma-separated task names or "none"')
    names = [part.strip() for part in str(text).split(',')]
    if any(not name for name in names):
        raise PlanError(f'--order {text!r} has an empty task name')
    if names == [NO_PRETRAINING]:
        return []
    if NO_PRETRAINING in names:
        raise PlanError(f'--order {text!r}: "none" cannot be combined with tasks')
    unknown = [name for name in names if name not in TASKS]
    if unknown:
        raise PlanError(f'unknown pretext task {unknown[0]!r} in --order; known: {", ".join(sorted(TASKS))}')
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise PlanError(f'task {repeated[0]!r} appears more than once in --order {text!r}')
    return names


def _positive_number(value: Any, what: str, integer: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlanError(f'{what} must be a number, got {value!r}') from None
    if not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        raise PlanError(f'{what} must be a positive {"integer" if integer else "number"}, got {value!r}')
    return number


def resolve_stage(task: str, config: dict, recipe: dict | None = None) -> StagePlan:
    """``task``'s stage: its recipe (``recipe``, else read from ``configs/tasks/<task>.yaml``) under the config's
    ``tasks.<task>`` entries and ``epochs``; impossible values are a PlanError."""
    cfg = deep_merge(task_recipe(task) if recipe is None else recipe, (config.get('tasks') or {}).get(task, {}))
    if config.get('epochs') is not None:
        cfg['epochs'] = config['epochs']
    missing = [key for key in STAGE_KEYS_REQUIRED if key not in cfg]
    if missing:
        raise PlanError(f'{recipe_path(task, CONFIG_DIR)} lacks key(s) {", ".join(missing)}')
    _positive_number(cfg['epochs'], f'{task}: epochs', integer=True)
    cfg['epochs'] = int(cfg['epochs'])
    batch = _positive_number(cfg['batch_size'], f'{task}: batch_size', integer=True)
    if batch < 2:
        raise PlanError(f'{task}: batch_size must be at least 2, got {cfg["batch_size"]}')
    cfg['batch_size'] = int(batch)
    _positive_number(cfg['lr'], f'{task}: lr')
    lr_range = cfg['lr_range']
    if not (isinstance(lr_range, (list, tuple)) and len(lr_range) == 2):
        raise PlanError(f'{task}: lr_range must be [low, high], got {lr_range!r}')
    low = _positive_number(lr_range[0], f'{task}: lr_range low')
    high = _positive_number(lr_range[1], f'{task}: lr_range high')
    if not low < high:
        raise PlanError(f'{task}: lr_range low {low} must be below high {high}')
    if not isinstance(cfg['optimizer'], dict) or 'type' not in cfg['optimizer']:
        raise PlanError(f'{task}: optimizer must be a mapping with a "type" (e.g. SGD)')
    if 'image_scale' in cfg:
        scale = _positive_number(cfg['image_scale'], f'{task}: image_scale', integer=True)
        cfg['image_scale'] = int(scale)
    return StagePlan(task, cfg)


def stage_image_size(stage: StagePlan, image_size: int) -> int:
    """The side at which ``stage`` sees its pretext images: ``image_size`` × the stage's ``image_scale`` (an engine
    option of every task, default 1; e.g. relative location cuts its patch grid from a sharper copy of each image).
    The monitor, the LR search's kNN objective and the downstream protocols stay at ``image_size``."""
    return int(image_size) * int(stage.cfg.get('image_scale', 1))


def validate_config(config: dict) -> None:
    size = _positive_number(config.get('image_size'), 'image_size', integer=True)
    if not 16 <= size <= MAX_IMAGE_SIZE:
        raise PlanError(f'image_size must be between 16 and {MAX_IMAGE_SIZE}, got {int(size)}')
    if not isinstance(config.get('seed'), int) or isinstance(config.get('seed'), bool) or config['seed'] < 0:
        raise PlanError(f'seed must be a non-negative integer, got {config.get("seed")!r}')
    if config.get('device') not in ('auto', 'cpu', 'cuda'):
        raise PlanError(f'device must be auto, cpu or cuda, got {config.get("device")!r}')
    if config.get('amp') not in ('auto', 'bf16', 'fp16', 'none', None):
        raise PlanError(f'amp must be auto, bf16, fp16 or none, got {config.get("amp")!r}')
    if config.get('channels_last', 'auto') not in ('auto', True, False):
        raise PlanError(f'channels_last must be auto, true or false, got {config.get("channels_last")!r}')
    search = config.get('lr_search') or {}
    trials = search.get('trials', 0)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 0:
        raise PlanError(f'lr_search.trials must be a non-negative integer, got {trials!r}')
    _positive_number(search.get('trial_fraction', 0.2), 'lr_search.trial_fraction')  # > 1: several epochs
    if search.get('objective', 'auto') not in ('auto', 'pretext', 'knn'):
        raise PlanError(f'lr_search.objective must be auto, pretext or knn, got {search.get("objective")!r}')
    monitor = config.get('monitor') or {}
    if not isinstance(monitor, dict):
        raise PlanError(f'monitor must be a mapping (knn, every, max_images, k), got {monitor!r}')
    if not isinstance(monitor.get('knn', True), bool):
        raise PlanError(f'monitor.knn must be true or false, got {monitor.get("knn")!r}')
    for name, default in (('every', 1), ('max_images', 1000), ('k', 20)):
        _positive_number(monitor.get(name, default), f'monitor.{name}', integer=True)
    if search.get('sampler', 'stratified') not in ('stratified', 'tpe', 'random'):
        raise PlanError(f'lr_search.sampler must be stratified, tpe or random, got {search.get("sampler")!r}')
    if search.get('pruner', 'median') not in ('median', 'none'):
        raise PlanError(f'lr_search.pruner must be median or none, got {search.get("pruner")!r}')
    if search.get('when_noisy', 'default_lr') not in ('default_lr', 'best_trial'):
        raise PlanError(f'lr_search.when_noisy must be default_lr or best_trial, got {search.get("when_noisy")!r}')
    _positive_number(search.get('reports', 2), 'lr_search.reports', integer=True)
    _positive_number(search.get('val_images', 256), 'lr_search.val_images', integer=True)
    evaluation = config.get('evaluation') or {}
    protocols = evaluation.get('protocols') or []
    if isinstance(protocols, str):
        protocols = [p.strip() for p in protocols.split(',') if p.strip()]
        evaluation['protocols'] = protocols
    unknown = [p for p in protocols if p not in KNOWN_PROTOCOLS]
    if unknown:
        raise PlanError(f'unknown protocol {unknown[0]!r}; known: {", ".join(KNOWN_PROTOCOLS)}')
    fraction = _positive_number(evaluation.get('label_fraction', 1.0), 'label_fraction')
    if fraction > 1:
        raise PlanError(f'label_fraction must be in (0, 1], got {fraction}')
    finetune = evaluation.get('finetune') or {}
    if not isinstance(finetune, dict):
        raise PlanError(f'evaluation.finetune must be a mapping (steps, eval_every, patience, lr), got {finetune!r}')
    for name in ('steps', 'eval_every', 'patience'):
        value = finetune.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise PlanError(f'evaluation.finetune.{name} must be null or a positive integer, got {value!r}')
    lr = finetune.get('lr')
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < 1):
        raise PlanError(f'evaluation.finetune.lr must be null or a learning rate in (0, 1), got {lr!r}')
    steps = finetune.get('steps')
    if steps is None and (finetune.get('eval_every') is not None or finetune.get('patience') is not None):
        raise PlanError('evaluation.finetune.eval_every and .patience need evaluation.finetune.steps (step-based '
                        'fine-tuning)')
    if steps is not None and (finetune.get('eval_every') or 0) > steps:
        raise PlanError(f'evaluation.finetune.eval_every ({finetune["eval_every"]}) must not exceed '
                        f'evaluation.finetune.steps ({steps})')
    validate_fusion(evaluation, protocols)
    validate_uda(evaluation, protocols)


def validate_fusion(evaluation: dict, protocols: list[str]) -> None:
    """``evaluation.fuse`` (``--fuse``): a list of run folders, given exactly when protocol dvme is requested
    (normalised to a list in place)."""
    fuse = evaluation.get('fuse')
    if isinstance(fuse, str):
        fuse = evaluation['fuse'] = [fuse]
    if fuse is not None and (not isinstance(fuse, list) or not all(isinstance(p, str) and p for p in fuse)):
        raise PlanError(f'evaluation.fuse must be a list of run folders, got {fuse!r}')
    if fuse and 'dvme' not in protocols:
        raise PlanError('--fuse (evaluation.fuse) names backbones for the dvme protocol, which is not requested: '
                        'add dvme to --protocols')
    if 'dvme' in protocols and not fuse:
        raise PlanError('protocol dvme fuses this run\'s backbone with those of other runs: name them with --fuse '
                        'RUN_DIR [RUN_DIR ...] (evaluation.fuse)')


def validate_uda(evaluation: dict, protocols: list[str]) -> None:
    """``evaluation.uda``: the target (``--target``) given exactly when protocol uda is requested, and the
    protocol's options (method, selection, class_map, positive numbers)."""
    from benchmarks.protocols.adaptation import METHODS
    from benchmarks.protocols.uda import OPTIMIZERS, SELECTIONS

    uda = evaluation.get('uda') or {}
    if not isinstance(uda, dict):
        raise PlanError(f'evaluation.uda must be a mapping (target, method, ...), got {uda!r}')
    target = uda.get('target')
    if 'uda' in protocols and not target:
        raise PlanError('protocol uda needs the unlabelled target dataset: --target NAME [--target-root PATH] '
                        '(evaluation.uda.target)')
    if target and 'uda' not in protocols:
        raise PlanError(f'--target {target} (evaluation.uda.target) is the target of the uda protocol, which is '
                        f'not requested: add uda to --protocols')
    if uda.get('method', 'dcan') not in METHODS:
        raise PlanError(f'evaluation.uda.method must be one of {", ".join(METHODS)}, got {uda.get("method")!r}')
    if uda.get('optimizer', 'adamw') not in OPTIMIZERS:
        raise PlanError(f'evaluation.uda.optimizer must be one of {", ".join(OPTIMIZERS)}, got '
                        f'{uda.get("optimizer")!r}')
    if uda.get('selection', 'last') not in SELECTIONS:
        raise PlanError(f'evaluation.uda.selection must be one of {", ".join(SELECTIONS)}, got '
                        f'{uda.get("selection")!r}')
    class_map = uda.get('class_map')
    if class_map is not None and (not isinstance(class_map, dict)
                                  or not all(isinstance(k, str) and isinstance(v, str) for k, v in class_map.items())):
        raise PlanError(f'evaluation.uda.class_map must map source class names to target class names, got '
                        f'{class_map!r}')
    if uda.get('target_options') is not None and not isinstance(uda['target_options'], dict):
        raise PlanError(f'evaluation.uda.target_options must be a mapping, got {uda["target_options"]!r}')
    for name in ('steps', 'eval_every', 'bottleneck'):
        if uda.get(name) is not None:
            _positive_number(uda[name], f'evaluation.uda.{name}', integer=True)
    for name in ('lr', 'backbone_lr_mult'):
        if uda.get(name) is not None:
            _positive_number(uda[name], f'evaluation.uda.{name}')
    for name in ('mmd_weight', 'entropy_weight', 'domain_weight'):
        value = uda.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
                                  or not math.isfinite(value)):
            raise PlanError(f'evaluation.uda.{name} must be a non-negative number, got {value!r}')


def build_plan(order_text: str, config: dict, recipes: dict[str, dict] | None = None) -> RunPlan:
    """Validate the order and the config; resolve every stage's recipe (from ``recipes``, task → recipe as read
    earlier, when given: a sweep reads them once, see :func:`recipes_for`; else from the recipe files)."""
    order = parse_order(order_text)
    validate_config(config)
    stages = [resolve_stage(task, config, None if recipes is None else recipes[task]) for task in order]
    for stage in stages:  # task checks that need only the image size (e.g. relloc's grid must fit the crop)
        size = stage_image_size(stage, int(config['image_size']))
        if size > MAX_IMAGE_SIZE:
            raise PlanError(f'{stage.task}: image_size {config["image_size"]} x image_scale '
                            f'{stage.cfg["image_scale"]} = {size} px exceeds {MAX_IMAGE_SIZE} px')
        try:
            TASKS[stage.task].check_config(stage.cfg, size)
        except PretextError as exc:
            raise PlanError(str(exc)) from None
    if config.get('device') == 'cuda':
        import torch
        if not torch.cuda.is_available():
            raise PlanError('--device cuda requested but no CUDA device is available')
    return RunPlan(order=order, stages=stages, config=config)
