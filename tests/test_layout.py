"""The house rules, read from the source: packages import only the ones before them, no import
cycles, no private names across modules, kernels_pallas standalone, files under 400 lines."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "moe_jax"
# Each package may import itself and the ones before it.
ORDER = ("core", "experts", "parallel", "moe", "model", "data", "hf", "train", "aot")
MAX_LINES = 400


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(name: str) -> str | None:
    """The moe_jax module a dotted name refers to (a module or a package), else None."""
    while name.startswith("moe_jax"):
        path = ROOT / name.replace(".", "/")
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(path: pathlib.Path):
    """[(imported module, imported name or None, line)] of every moe_jax import in the file,
    including imports inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(_resolve(a.name), None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = _resolve(f"{node.module}.{a.name}")
                if sub == f"{node.module}.{a.name}":
                    out.append((sub, None, node.lineno))  # a submodule
                else:
                    out.append((_resolve(node.module), a.name, node.lineno))
    return [(m, n, line) for m, n, line in out if m is not None]


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the top-level moe_jax/__init__


def _graph():
    files = sorted(PKG.rglob("*.py"))
    return {_module_name(f): (f, _imports(f)) for f in files}


def test_packages_import_only_earlier_ones():
    bad = []
    for mod, (path, imps) in _graph().items():
        src = _package(mod)
        if src is None:
            continue
        assert src in ORDER, f"{path}: package {src!r} is not in the layout order {ORDER}"
        for target, _, line in imps:
            dst = _package(target)
            if dst is None or ORDER.index(dst) > ORDER.index(src):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({src}) imports {target}")
    assert not bad, "imports against the layout order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imps if t != m} for m, (_, imps) in _graph().items()}
    # Importing a package's module runs the package's __init__ first: not an edge of its own.
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if m.startswith(t + ".") or t == "moe_jax":
                continue  # a module importing its own package's names
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    bad = []
    for mod, (path, imps) in _graph().items():
        bad += [
            f"{path.relative_to(ROOT)}:{line} imports {target}.{name}"
            for target, name, line in imps
            if name is not None and name.startswith("_") and target != mod
        ]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {
            (a.asname or a.name): a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_jax")
            for a in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"
                )
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_kernels_never_import_the_library():
    bad = [
        f"{f.relative_to(ROOT)}:{node.lineno}"
        for f in sorted((ROOT / "kernels_pallas").rglob("*.py"))
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
        if (isinstance(node, ast.Import) and any(a.name.startswith("moe_jax") for a in node.names))
        or (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moe_jax"))
    ]
    assert not bad, f"kernels_pallas imports moe_jax at {bad}"


def test_files_stay_small():
    long = {
        str(f.relative_to(ROOT)): n
        for f in sorted(PKG.rglob("*.py"))
        if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The rules see a back edge, a cycle and a private import in a planted package."""
    root = tmp_path
    for rel, text in {
        "moe_jax/__init__.py": "",
        "moe_jax/core/__init__.py": "",
        "moe_jax/core/a.py": "from moe_jax.train import b\nfrom moe_jax.core.c import _x\n",
        "moe_jax/core/c.py": "from moe_jax.core import a\n_x = 1\n",
        "moe_jax/train/__init__.py": "",
        "moe_jax/train/b.py": "",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", root)
    monkeypatch.setitem(globals(), "PKG", root / "moe_jax")
    for check in (
        test_packages_import_only_earlier_ones,
        test_no_import_cycles,
        test_no_private_names_across_modules,
    ):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a planted violation")
