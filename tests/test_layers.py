"""The package layers run one way — tools → curriculum → pretext_tasks → benchmarks — and no module imports
itself through others. Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide a back-edge or a circle."""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('curriculum', 'pretext_tasks', 'benchmarks')
#: what each package may import of the project (besides itself)
ALLOWED = {'benchmarks': set(), 'pretext_tasks': {'benchmarks'}, 'curriculum': {'pretext_tasks', 'benchmarks'}}


def project_modules() -> dict[str, str]:
    """``{dotted module name: file path}`` of every module of the three packages."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith('.py'):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
                    modules[dotted.removesuffix('.__init__')] = path
    return modules


def imports_of(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The project modules ``module`` imports (relative imports resolved; ``from pkg import name`` counts as
    ``pkg.name`` when that is a module, else ``pkg``)."""
    is_package = path.endswith('__init__.py')
    with open(path) as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split('.')
                base = parts if is_package else parts[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = '.'.join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ''
            names = [f'{prefix}.{alias.name}' if f'{prefix}.{alias.name}' in modules else prefix
                     for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition('.')[0]
            if name and name != module:
                found.add(name)
    return found


def test_packages_import_only_the_layers_below_them():
    modules = project_modules()
    wrong = []
    for module, path in modules.items():
        package = module.split('.')[0]
        for target in imports_of(module, path, modules):
            other = target.split('.')[0]
            if other != package and other not in ALLOWED[package]:
                wrong.append(f'{module} imports {target}')
        with open(path) as handle:
            if "'tools'" in handle.read():
                wrong.append(f'{module} refers to the tools/ folder')
    assert not wrong, '\n'.join(sorted(wrong))


def test_no_module_imports_itself_through_others():
    modules = project_modules()
    graph = {module: imports_of(module, path, modules) for module, path in modules.items()}
    # a submodule importing its own package's __init__ (which imports the submodules for registration) is the
    # package's business, not a circle between modules: those edges are left out
    for module in graph:
        graph[module] = {target for target in graph[module] if not module.startswith(target + '.')}
    circles = []
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append(' → '.join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not circles, '\n'.join(circles)
