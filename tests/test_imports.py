"""The house's rules, read from the code: arrows one way (launchers → scaling → models; the
user-facing ``podscale`` package names the training API that lives in scaling), no circles.

Every import of every module counts, including imports inside functions and modules imported by
name (``importlib.import_module("x.y")``, and module-level registries such as
``BACKENDS = {...: "x.y"}`` whose strings a function imports later): a lazy import is still an
arrow. Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too; those implicit
parent edges are Python's, not the code's, and are not counted. Nor is ``[python, "-m", "x.y"]``:
that starts another process, it imports nothing into this one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launchers", "podscale", "scaling", "models")
#: top-level package -> the top-level packages it may import (besides itself)
ALLOWED = {"launchers": {"scaling", "models"}, "podscale": {"scaling", "models"}, "scaling": {"models"}, "models": set()}
#: folders of users of everything: may import anything, and nothing may import them
FREE = ("bench", "examples", "tests")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, tops: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for top in tops:
        for p in sorted((root / top).rglob("*.py")):
            out[module_name(p, root)] = p
    return out


def imports_of(path: Path, mod: str, known: set[str]) -> set[str]:
    """Every project module that ``path`` imports, wherever in the file the import stands."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def add(name: str) -> None:
        # the longest known prefix: "scaling.meter.format_flops" -> "scaling.meter"
        parts = name.split(".")
        for i in range(len(parts), 0, -1):
            cand = ".".join(parts[:i])
            if cand in known:
                found.add(cand)
                return

    spawned = {id(b) for node in ast.walk(tree) if isinstance(node, (ast.List, ast.Tuple))
               for a, b in zip(node.elts, node.elts[1:]) if isinstance(a, ast.Constant) and a.value == "-m"}
    by_name: list[ast.AST] = []  # where a string names a module that gets imported
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")) in ("import_module", "__import__"):
                by_name.append(node.args[0])
    for node in tree.body:  # module-level registries of module names: BACKENDS = {...: "x.y"}
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if node_value := getattr(node, "value", None):
            if any(isinstance(t, ast.Name) and t.id.isupper() for t in targets):
                by_name.append(node_value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            for a in node.names:
                sub = f"{src}.{a.name}"
                add(sub if sub in known else src)
    for root in by_name:
        for node in ast.walk(root):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in known and id(node) not in spawned:
                add(node.value)
    found.discard(mod)
    return found


def graph(root: Path, tops: tuple[str, ...]) -> dict[str, set[str]]:
    mods = project_modules(root, tops)
    return {m: imports_of(p, m, set(mods)) for m, p in mods.items()}


def arrow_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, dsts in sorted(g.items()):
        top = src.split(".")[0]
        if top in FREE:
            continue
        for d in sorted(dsts):
            dtop = d.split(".")[0]
            if dtop != top and dtop not in ALLOWED.get(top, set()):
                bad.append(f"{src} -> {d}")
    return bad


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
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
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_back_arrows_lazy_imports_and_circles(tmp_path: Path) -> None:
    """The rules below would pass vacuously if the walk missed imports: prove it finds each kind."""
    files = {
        "models/__init__.py": "",
        "models/a.py": "def f():\n    from scaling.errors import E\n",          # back-arrow, in a function
        "scaling/__init__.py": "",
        "scaling/errors.py": "",
        "scaling/x.py": "from . import y\n",                                     # relative import
        "scaling/y.py": "import importlib\nimportlib.import_module('scaling.x')\n",  # import by name
        "scaling/z.py": "REGISTRY = {'a': 'models.a'}\nNOTE = 'see scaling.x'\nmsg = 'scaling.y'\n",  # a registry; prose
        "launchers/__init__.py": "",
        "launchers/cli.py": "from scaling import errors\n",                        # allowed arrow
        "launchers/sweep.py": "import sys\nargv = [sys.executable, '-m', 'launchers.cli']\n",  # a process, not an import
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    g = graph(tmp_path, PACKAGES)
    assert g["launchers.cli"] == {"scaling.errors"}
    assert g["launchers.sweep"] == set()
    assert g["scaling.z"] == {"models.a"}
    assert arrow_violations(g) == ["models.a -> scaling.errors"]
    assert circles(g) == [["scaling.x", "scaling.y"]]


def test_arrows_point_one_way() -> None:
    bad = arrow_violations(graph(ROOT, PACKAGES + tuple(f for f in FREE if (ROOT / f).is_dir())))
    assert not bad, "imports against launchers -> scaling -> models:\n" + "\n".join(bad)


def test_no_import_circles() -> None:
    found = circles(graph(ROOT, PACKAGES))
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("top", PACKAGES)
def test_nothing_imports_the_free_folders(top: str) -> None:
    g = graph(ROOT, PACKAGES + tuple(f for f in FREE if (ROOT / f).is_dir()))
    bad = [f"{s} -> {d}" for s, ds in g.items() if s.split(".")[0] == top for d in ds if d.split(".")[0] in FREE]
    assert not bad, bad


def test_tests_import_their_conftest_by_its_package_path() -> None:
    """tests/ and tests/xla each have a conftest.py, and pytest registers whichever it loaded last as
    the bare module ``conftest``: a ``from conftest import`` run lazily (a test importing another test
    module) then gets tests/xla's. CI failed that way once; ``tests.conftest`` is one module only."""
    bare = []
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "conftest" in names:
                bare.append(f"{path.name}:{node.lineno}")
    assert not bare, f"import tests.conftest, not conftest: {bare}"
