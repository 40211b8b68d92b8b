"""The scripts under tools/ imported as modules (they are scripts, not package members), once per process."""
from __future__ import annotations

import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tool_path(name: str) -> str:
    """Path of ``tools/<name>.py``."""
    return os.path.join(REPO, 'tools', f'{name}.py')


def load_tool(name: str):
    """``tools/<name>.py`` as the module ``<name>_tool`` (cached in ``sys.modules``)."""
    module_name = f'{name}_tool'
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, tool_path(name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[module_name] = module
    return sys.modules[module_name]
