"""The package's shape (issue 27): layers that import only downward, no import cycle, small files, a public API
per layer, and a text layer without torch. Read from the source with `ast`, so that a lazy import counts too."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import storygpt

PKG = Path(storygpt.__file__).parent
LAYERS = ["text", "model", "data", "train", "generate", "eval", "convert", "serve", "app", "cli"]
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = ["storygpt", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def rank(module: str) -> int:
    """A module's layer: 0 for the package's root (errors, files, the lazy top-level API), else 1 + its index;
    `python -m storygpt` (__main__) is the command, the top."""
    parts = module.split(".")
    if module == "storygpt.__main__":
        return len(LAYERS)
    return LAYERS.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in LAYERS else 0


def imports(module: str) -> list[tuple[str, int, bool]]:
    """(storygpt module imported, line, at module level) for every import in the module's source."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target]
            # `from storygpt.model import adapters`: the submodule itself is imported
            targets += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            if target == "storygpt" or target.startswith("storygpt."):
                found.append((target, node.lineno, id(node) in top))
    return found


def test_every_layer_is_a_package_with_a_public_api():
    for layer in LAYERS:
        package = importlib.import_module(f"storygpt.{layer}")
        assert package.__doc__, layer
        assert package.__all__, layer
        for name in package.__all__:
            assert getattr(package, name, None) is not None, f"storygpt.{layer}.{name}"


def test_layers_import_only_downward():
    upward = [f"{m}:{line} imports {target}" for m in MODULES for target, line, _ in imports(m)
              if m != "storygpt" and rank(target) > rank(m)]
    assert not upward, "\n".join(upward)


def test_no_import_cycle():
    """Modules and the packages they run (`from storygpt.model.load import x` runs storygpt.model's __init__ too),
    at module level: a strongly connected component of more than one module is a cycle."""
    graph = {m: set() for m in MODULES}
    for m in MODULES:
        for target, _, at_top in imports(m):
            if not at_top or target not in MODULES:
                continue
            parts = target.split(".")
            for i in range(2, len(parts) + 1):  # the packages on the way run first
                owner = ".".join(parts[:i])
                if owner in MODULES and owner != m and not m.startswith(owner + "."):
                    graph[m].add(owner)
    cycles = [c for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, cycles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert [c for c in strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) if len(c) > 1] == [["a", "b"]]


def test_files_are_small():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize("layer", ["text"])
def test_text_needs_no_torch(layer):
    code = f"import sys, storygpt.{layer}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_import_storygpt_is_light_and_its_api_loads_on_use():
    code = "import sys, storygpt; print('torch' in sys.modules); print(storygpt.load.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "storygpt.generate.story_model"]
    assert set(storygpt.__all__) <= set(dir(storygpt))
    with pytest.raises(AttributeError):
        storygpt.no_such_name  # noqa: B018


def test_shipped_models_come_from_the_package_resources():
    from importlib import resources

    from storygpt.model import default_model_path

    assert default_model_path() == Path(str(resources.files("storygpt") / "default_model"))
