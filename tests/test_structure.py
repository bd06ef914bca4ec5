"""The package's shape: imports run one way through its layers, and kinds are attributes, not names compared.

Every import counts, those inside functions included (lazy imports are fine, hidden cycles are not). A module may
import modules of its own layer or below; within a layer, imports must not form a cycle.
"""

import ast
import os

import pytest

import hfpipe

ROOT = os.path.dirname(hfpipe.__file__)

#: lowest first; a module belongs to the first entry that is its name or a package above it
LAYERS = [
    ["hfpipe._version", "hfpipe.core"],
    ["hfpipe.pipeline", "hfpipe.schedules", "hfpipe.launch"],
    ["hfpipe.checkpoint", "hfpipe.generation", "hfpipe.verify", "hfpipe.plan", "hfpipe.hub"],
    ["hfpipe.training"],
    ["hfpipe.tasks", "hfpipe.metrics", "hfpipe.data"],
    ["hfpipe.cli", "hfpipe"],
]


def _modules() -> dict[str, str]:
    mods = {}
    for d, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = "hfpipe." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                mods[name[:-9] if name.endswith(".__init__") else name] = path
    return mods


def _imports(name: str, path: str, mods: dict[str, str]) -> set[str]:
    """hfpipe modules that ``name`` imports (anywhere in the file)."""
    out = set()
    is_pkg = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path).read(), path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name if is_pkg else name.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
                out.add(t)
    return out


def _layer(name: str) -> int:
    best = None
    for i, members in enumerate(LAYERS):
        for m in members:
            if (name == m or name.startswith(m + ".")) and (best is None or len(m) > len(best[1])):
                best = (i, m)
    assert best is not None, f"{name} is in no layer of tests/test_structure.py LAYERS; add it"
    return best[0]


def test_imports_run_one_way():
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, ts in sorted(edges.items()) for t in sorted(ts) if _layer(t) > _layer(m)]
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def test_no_import_cycles():
    mods = _modules()
    edges = {m: _imports(m, p, mods) for m, p in mods.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_walker_sees_function_level_and_relative_imports(tmp_path):
    """The two tests above would pass vacuously if the walker missed imports: check it on a hand-made module."""
    mods = {"hfpipe.core.x": "", "hfpipe.training.y": "", "hfpipe.core": ""}
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from ..training import y\n    import hfpipe.training.y\n")
    assert _imports("hfpipe.core.x", str(src), mods) == {"hfpipe.training.y"}
    assert _layer("hfpipe.training.y") > _layer("hfpipe.core.x")


def _names_owned() -> dict[str, str]:
    """Layer and head names -> the module that owns them."""
    from hfpipe.core import heads, layers
    from hfpipe.core.adapters import deberta_v2

    owned = {}
    for module in (layers, heads, deberta_v2):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, layers.LayerTraits) and obj.__module__ == module.__name__:
                for n in (obj.__name__, obj.layer_name):
                    if n:
                        owned[n] = module.__name__
    for head in heads.HEADS.values():
        owned[head.name] = heads.__name__
    return owned


def test_no_dispatch_on_layer_or_head_name_strings():
    """A comparison (``==``, ``!=``, ``in``) against a layer class name or a head name is allowed only in the module
    that owns the name; everywhere else the class attribute is asked (``layer.kind``, ``head.causal``, ...)."""
    owned = _names_owned()
    assert {"Block", "TokenEmbedding", "TiedLMHead", "causal-lm", "question-answering"} <= set(owned)
    found = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                for v in values:
                    if isinstance(v, ast.Constant) and v.value in owned and owned[v.value] != name:
                        found.append(f"{path}:{node.lineno} compares with {v.value!r} (owned by {owned[v.value]})")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("text,should_find", [("x.name == 'Block'", True), ("head.causal", False)])
def test_the_name_check_can_fail(text, should_find):
    owned = _names_owned()
    hits = [v.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Compare)
            for v in [n.left, *n.comparators] if isinstance(v, ast.Constant) and v.value in owned]
    assert bool(hits) is should_find
