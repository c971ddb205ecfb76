"""The import order of minift, checked without importing anything.

minift is built in layers, lowest first. A module may import from its own layer or a lower one, never from a
higher one, and the imports never form a cycle. The table below is the same one the package docstring
(minift/__init__.py, "Layers") explains in words; a module that is not in it fails the test until it is
given a place.

How the imports are found: every .py file under minift/ and kernels/ (kernels/X.py is the module
minift.kernels.X) is parsed with `ast`, and every `import` and `from ... import` statement counts, also
those inside functions (a lazy import is still an arrow). `from pkg import name` points at the submodule
pkg.name when there is one, else at pkg itself (its __init__); relative imports are resolved against the
importing module's package.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (module or package prefix, layer); the longest matching prefix decides. Inside layer 7 the training engine
# has its own order (7.0 first), so a module there may import only the ones before it.
LAYERS: list[tuple[str, float]] = [
    ("minift.config", 0), ("minift.tokenizer", 0), ("minift.dtypes", 0), ("minift.adapter_interface", 0),
    ("minift.machine", 0), ("minift.svg_chart", 0),
    ("minift.model", 1),
    ("minift.kernels", 2),
    ("minift.quant", 3),
    ("minift.io", 4), ("minift", 4),
    ("minift.peft", 5),
    ("minift.losses", 6), ("minift.fused_loss", 6), ("minift.data", 6), ("minift.datasets", 6),
    ("minift.schedules", 6), ("minift.align", 6),
    ("minift.train.fields", 7.0), ("minift.train.methods", 7.1), ("minift.train.tasks", 7.2),
    ("minift.train.preference_tasks", 7.25), ("minift.train.rl_tasks", 7.26), ("minift.train.run_config", 7.3),
    ("minift.train.batches", 7.4), ("minift.train.preference_data", 7.45), ("minift.train.rl_data", 7.46),
    ("minift.train.checkpoint", 7.5),
    ("minift.train.guards", 7.55), ("minift.train.distributed", 7.57), ("minift.train.compiled", 7.58), ("minift.train.optimizer_in_backward", 7.59), ("minift.train.loop", 7.6), ("minift.train", 7.7),
    ("minift.icl", 8), ("minift.export", 8), ("minift.plan", 8),
    ("minift.demo", 9),
    ("minift.cli", 10), ("minift.__main__", 10),
]


def module_files() -> dict[str, Path]:
    """Module name -> file, for every .py under minift/ and kernels/."""
    files = {}
    for folder, package in ((ROOT / "minift", "minift"), (ROOT / "kernels", "minift.kernels")):
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


def is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def imported_modules(module: str, files: dict[str, Path], source: str | None = None) -> set[str]:
    """The minift modules `module` imports (its file, or `source`), at any depth of its code."""
    source = files[module].read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source, filename=str(files[module]))
    package = module if is_package(module, files) else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from .x import y` inside package p is p.x
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in files else source)
    return {closest_module(name, files) for name in found if name == "minift" or name.startswith("minift.")} - {None}


def closest_module(name: str, files: dict[str, Path]) -> str | None:
    """`name`, or the longest prefix of it that is a module (`import minift.io.hf as h` is minift.io.hf)."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str) -> float | None:
    matches = [(prefix, layer) for prefix, layer in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return max(matches, key=lambda match: len(match[0]))[1] if matches else None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {module: imported_modules(module, files) - {module} for module in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan's algorithm, iteratively)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [cycle_through(component, graph) for component in components]


def cycle_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle inside one strongly connected component, starting at its first module by name."""
    start = min(component)
    paths, seen = {start: [start]}, {start}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    return paths[node] + [start]
                if child not in seen:
                    seen.add(child)
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    return [start]


def test_every_module_has_a_layer():
    missing = sorted(module for module in module_files() if layer_of(module) is None)
    assert not missing, f"modules missing from LAYERS (tests/test_layers.py and minift/__init__.py): {missing}"


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(cycle) for cycle in cycles)


def test_imports_point_down_the_layers():
    wrong = []
    for module, imports in sorted(import_graph().items()):
        for target in sorted(imports):
            here, there = layer_of(module), layer_of(target)
            if here is not None and there is not None and there > here:
                wrong.append(f"  {module} (layer {here:g}) -> {target} (layer {there:g})")
    assert not wrong, "imports from a lower layer to a higher one:\n" + "\n".join(wrong)


def test_library_modules_import_io_not_the_package_root():
    """`import minift` from inside the library runs minift/__init__ (layer 4) for a name io already has."""
    offenders = sorted(module for module, imports in import_graph().items() if "minift" in imports)
    assert not offenders, f"modules importing the package root (use `from minift.io import load`): {offenders}"


def test_the_checker_itself():
    """Submodules, relative and lazy imports are resolved as described above, and a planted cycle is found."""
    files = module_files()
    source = """
from minift.io import hf, load          # a submodule, and a name of the package (its __init__)
from .triton_support import tl          # relative to the importing module's package
import minift.io.bundled as bundled
def later():
    from minift.quant.nf4 import NF4Tensor  # a lazy import is an arrow too
"""
    assert imported_modules("minift.kernels.nf4_matmul_kernel", files, source) == {
        "minift.io.hf", "minift.io", "minift.kernels.triton_support", "minift.io.bundled", "minift.quant.nf4"}
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(planted) == [["a", "b", "c", "a"]]
    assert layer_of("minift.train.loop") > layer_of("minift.train.batches") > layer_of("minift.peft.lora")
    assert layer_of("minift.kernels.nf4_codes") < layer_of("minift.quant.nf4") < layer_of("minift")
    assert layer_of("minift") == layer_of("minift.io.hf")
