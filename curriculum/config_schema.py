"""The config schema: which keys a run config may hold, and a one-line error for any other.

The schema is what the config files define, nothing written twice: every key of ``configs/default.yaml``; under
``tasks.<task>`` every key of ``configs/tasks/<task>.yaml`` plus the options the task's own module reads
(``self.cfg('name', default)`` in ``pretext_tasks/<task>.py``: options with a default in the code and no line in the
recipe) and the engine's per-stage options (:data:`ENGINE_TASK_OPTIONS`). Some mappings are free-form and not
looked into (:data:`OPEN_MAPPINGS`: the backbone and optimizer configs, dataset options, the study section of
``configs/experiments/*.yaml``). An unknown key ends the run before anything is written, with the closest known key
(difflib) when there is one::

    unknown config key 'lr_serach.trials' (did you mean 'lr_search.trials'?)
"""
from __future__ import annotations

import ast
import difflib
import functools
import inspect
import os
import sys

import yaml

from pretext_tasks.registry import TASKS

from .errors import PlanError

#: mappings whose keys belong to another component (mmpretrain, the optimizer, a dataset layout, tools/study.py)
OPEN_MAPPINGS = {('backbone',), ('dataset_options',), ('downstream_options',), ('study',),
                 ('tasks', '*', 'optimizer'), ('tasks', '*', 'paramwise_cfg'), ('tasks', '*', 'clip_grad'),
                 ('evaluation', 'uda', 'target_options'), ('evaluation', 'uda', 'class_map')}
#: per-stage options every task accepts (curriculum/stage.py reads them)
ENGINE_TASK_OPTIONS = ('clip_grad', 'image_scale')
#: top-level sections a config file may hold for a tool (configs/experiments/*.yaml: tools/study.py)
TOOL_SECTIONS = {'study': {}}
#: the target of the uda protocol (read by curriculum/run.py); its other options are the protocol's own
UDA_DATA_KEYS = ('target', 'target_root', 'target_options')


def _task_module_options(task_class) -> set[str]:
    """The option names a task's module reads with ``self.cfg('name', ...)`` or ``cfg.get('name', ...)``."""
    module = sys.modules.get(task_class.__module__)
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == 'cfg':
            names.add(node.args[0].value)
        elif isinstance(func, ast.Attribute) and func.attr == 'get':   # cfg.get('name') / self.task_cfg.get(...)
            owner = func.value
            if getattr(owner, 'id', getattr(owner, 'attr', None)) in ('cfg', 'task_cfg'):
                names.add(node.args[0].value)
    return names


def read_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise PlanError(f'config file not found: {path}')
    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        raise PlanError(f'{path}: invalid YAML ({str(exc).splitlines()[0]})') from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PlanError(f'{path}: expected a mapping at the top level')
    return data


def recipe_path(task: str, config_dir: str) -> str:
    """A task's recipe: ``<config_dir>/tasks/<task>.yaml``, or else the YAML beside the task's own file
    (``<module>.yaml``, for a task kept outside this repository); the first path when neither exists."""
    shipped = os.path.join(config_dir, 'tasks', f'{task}.yaml')
    task_class = TASKS.get(task)
    module = sys.modules.get(task_class.__module__) if task_class is not None else None
    beside = os.path.splitext(os.path.abspath(module.__file__))[0] + '.yaml' \
        if module is not None and getattr(module, '__file__', None) else None
    if not os.path.isfile(shipped) and beside and os.path.isfile(beside):
        return beside
    return shipped


@functools.lru_cache(maxsize=None)
def _schema(config_dir: str, protocols: tuple[str, ...], tasks: tuple[str, ...]) -> dict:
    """The nested dict of known keys (values: sub-schemas, or None for a leaf)."""

    def shape(value):
        if isinstance(value, dict):
            return {key: shape(sub) for key, sub in value.items()}
        return None

    schema = shape(read_yaml(os.path.join(config_dir, 'default.yaml')))
    schema.update(TOOL_SECTIONS)
    evaluation = schema.setdefault('evaluation', {}) or {}
    evaluation['epochs'] = {name: None for name in protocols}   # a budget per downstream protocol
    # options of the dvme and uda protocols, known without a line in default.yaml (a default there would change
    # the config, hence the identity, of every run made before them)
    from benchmarks.protocols.uda import OPTIONS as UDA_OPTIONS

    evaluation.setdefault('fuse', None)
    evaluation.setdefault('uda', {name: None for name in (*UDA_DATA_KEYS, *UDA_OPTIONS)})
    schema['evaluation'] = evaluation
    tasks = {}
    for name, task_class in TASKS.items():
        recipe = recipe_path(name, config_dir)
        keys = shape(read_yaml(recipe)) if os.path.isfile(recipe) else {}
        for option in _task_module_options(task_class) | set(ENGINE_TASK_OPTIONS):
            keys.setdefault(option, None)
        tasks[name] = keys
    schema['tasks'] = tasks
    return schema


def _is_open(path: tuple[str, ...]) -> bool:
    return any(len(path) == len(pattern) and all(p in ('*', part) for p, part in zip(pattern, path))
               for pattern in OPEN_MAPPINGS)


def _unknown(config: dict, schema: dict, path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The path of the first key of ``config`` (in file order) that ``schema`` does not know, or None."""
    if _is_open(path):
        return None
    for key, value in config.items():
        if not isinstance(key, str) or key not in schema:
            path += (str(key),)
            while isinstance(value, dict) and value:  # name the first full key: 'lr_serach.trials', not 'lr_serach'
                key, value = next(iter(value.items()))
                path += (str(key),)
            return path
        if isinstance(value, dict) and schema[key] is not None:
            found = _unknown(value, schema[key], path + (key,))
            if found:
                return found
    return None


def _suggestion(path: tuple[str, ...], schema: dict) -> str | None:
    """The known key closest to ``path``, correcting each part in turn among the keys known at its level."""
    fixed, node = [], schema
    for part in path:
        if not isinstance(node, dict) or _is_open(tuple(fixed)):
            fixed.append(part)
            node = None
            continue
        if part in node:
            match = part
        else:
            close = difflib.get_close_matches(part, list(node), n=1, cutoff=0.6)
            if not close:
                return None
            match = close[0]
        fixed.append(match)
        node = node[match]
    return '.'.join(fixed)


def check_config_keys(config: dict, config_dir: str, protocols: tuple[str, ...]) -> None:
    """PlanError naming the first unknown key of ``config`` (and the closest known one); ``protocols`` are the
    downstream protocols (each may have an ``evaluation.epochs`` budget)."""
    schema = _schema(config_dir, tuple(protocols), tuple(sorted(TASKS)))  # a task registered later: new schema
    path = _unknown(config, schema, ())
    if path is None:
        return
    key = '.'.join(path)
    suggestion = _suggestion(path, schema)
    if suggestion and suggestion != key:
        hint = f' (did you mean {suggestion!r}?)'
    else:  # nothing close: list what that level knows
        node, level = schema, []
        for part in path[:-1]:
            if not isinstance(node, dict) or part not in node:
                break
            node, level = node[part], level + [part]
        known = sorted(node) if isinstance(node, dict) and len(level) == len(path) - 1 else []
        hint = f' (known {"under " + ".".join(level) if level else "keys"}: {", ".join(known)})' if known else ''
    raise PlanError(f'unknown config key {key!r}{hint}')
