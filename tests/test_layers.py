"""Dependencies point downward only, and there is no import cycle in belm/.

Every ``.py`` file under belm/ is parsed with :mod:`ast` (nothing is imported) and
*every* import statement counts: at module level, inside functions and methods, and
inside ``if TYPE_CHECKING:`` blocks. Type-only imports count on purpose: they are
dependencies of the design too, and with ``from __future__ import annotations`` a lower
layer never needs one to an upper layer (a small :class:`typing.Protocol` in the lower
layer does the job, e.g. :class:`belm.lte.RuleLike`).

Layers, bottom to top; a module may import only from its own layer or lower::

    0 errors      belm/errors.py, belm/_files.py (standard-library file helpers)
    1 schedule    belm/schedule.py, belm/analytic.py (the analytic Gaussian-mixture test
                  problem: numpy/scipy/torch only; kept above errors so errors stays alone
                  at the bottom)
    2 lte         belm/lte/
    3 solvers     belm/solvers/
    4 adapters    belm/adapters/, belm/models/ (the bundled digits model: its loaders build
                  diffusers UNets, so it sits where diffusers is allowed)
    5 apps        belm/apps/
    6 cli         belm/cli.py
    7 package     belm/__init__.py (re-exports; nothing inside belm may import it)

An import resolves to the module it names: ``from belm.apps import tasks`` is an edge to
``belm.apps.tasks`` when that is a module, ``from belm.lte import derive_belm`` an edge
to ``belm.lte`` (the package's ``__init__``). The implicit import of parent packages is
not an edge (every ``import belm.x`` runs ``belm/__init__`` first; that is how packages
work, not a dependency of the importing module).

Known failures of code being rewritten elsewhere are marked ``xfail(strict=True)`` with
the file named: remove the marker when the rewrite lands (strict: the test then fails
until the marker goes).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "belm"

LAYERS = ["errors", "schedule", "lte", "solvers", "adapters", "apps", "cli", "package"]
PLACEMENT = {                        # module-name prefix -> layer (longest prefix wins)
    "belm.errors": "errors",
    "belm._version": "errors",
    "belm._files": "errors",
    "belm.schedule": "schedule",
    "belm.analytic": "schedule",
    "belm.lte": "lte",
    "belm.solvers": "solvers",
    "belm.adapters": "adapters",
    "belm.models": "adapters",
    "belm.apps": "apps",
    "belm.cli": "cli",
    "belm": "package",
}
# Heavy optional dependencies that the core (everything below adapters) must not import.
OPTIONAL = ("diffusers", "transformers")
CORE_LAYERS = ("errors", "schedule", "lte", "solvers")


@dataclass(frozen=True)
class Import:
    source: str          # importing module, e.g. "belm.lte.named"
    target: str          # imported module, e.g. "belm.lte.derive" or "diffusers"
    where: str           # "belm/lte/named.py:33"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _resolve_from(source: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Modules named by ``from X import a, b`` (relative imports resolved)."""
    if node.level:
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        pkg = ".".join(base + ([node.module] if node.module else []))
    else:
        pkg = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{pkg}.{alias.name}"
        out.append(sub if sub in MODULES else pkg)
    return out


def collect_imports() -> list[Import]:
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(tree):           # every statement, at any depth
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.module == "__future__":
                    continue
                targets = _resolve_from(name, path.name == "__init__.py", node)
            else:
                continue
            for t in dict.fromkeys(targets):
                found.append(Import(name, t, f"{rel}:{node.lineno}"))
    return found


IMPORTS = collect_imports()


def layer_of(module: str) -> str | None:
    best = None
    for prefix, layer in PLACEMENT.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return best[1] if best else None


def _internal(imp: Import) -> bool:
    return imp.target == "belm" or imp.target.startswith("belm.")


# --------------------------------------------------------------------------- the scanner itself

def test_scanner_sees_every_kind_of_import():
    """The parse finds module-level, function-level and TYPE_CHECKING imports."""
    src = ("from typing import TYPE_CHECKING\nimport belm.errors\nif TYPE_CHECKING:\n"
           "    from belm.solvers import base\ndef f():\n    from . import derive\n    import diffusers\n")
    tree = ast.parse(src)
    kinds = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert len(kinds) == 5
    assert _resolve_from("belm.lte.named", False, kinds[-2]) == ["belm.lte.derive"]
    assert _resolve_from("belm.lte", True, ast.parse("from .derive import x").body[0]) == ["belm.lte.derive"]
    assert _resolve_from("belm.apps.demo", False, ast.parse("from belm.apps import tasks").body[0]) == \
        ["belm.apps.tasks"]
    assert _resolve_from("belm.solvers.belm", False, ast.parse("from belm.lte import derive_belm").body[0]) == \
        ["belm.lte"]


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced
    assert layer_of("belm.lte.scaled") == "lte" and layer_of("belm") == "package"
    assert layer_of("belm.models.data") == "adapters"


# --------------------------------------------------------------------------- layers

def _upward(layer: str) -> list[str]:
    rank = LAYERS.index
    return [f"{imp.where}: {imp.source} ({layer_of(imp.source)}) imports {imp.target} ({layer_of(imp.target)})"
            for imp in IMPORTS
            if _internal(imp) and layer_of(imp.source) == layer
            and rank(layer_of(imp.target)) > rank(layer)]


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_downward(layer):
    bad = _upward(layer)
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_lte_imports_nothing_outside_lte():
    """The symbolic engine is self-contained: sympy/numpy and its own modules only."""
    bad = [f"{imp.where}: {imp.target}" for imp in IMPORTS
           if imp.source.startswith("belm.lte") and _internal(imp) and not imp.target.startswith("belm.lte")]
    assert not bad, bad


@pytest.mark.parametrize("layer", CORE_LAYERS)
def test_core_does_not_import_diffusers(layer):
    bad = [f"{imp.where}: {imp.source} imports {imp.target}" for imp in IMPORTS
           if layer_of(imp.source) == layer and imp.target.split(".")[0] in OPTIONAL]
    assert not bad, bad


# --------------------------------------------------------------------------- cycles

def _graph() -> dict[str, dict[str, str]]:
    """``{module: {imported module: file:line of the first such import}}`` inside belm."""
    g: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for imp in IMPORTS:
        if _internal(imp) and imp.target in MODULES and imp.target != imp.source:
            g[imp.source].setdefault(imp.target, imp.where)
    return g


def find_cycles(g: dict[str, dict[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    g = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {"a": "d.py:1"}}
    assert find_cycles(g) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b": ""}, "b": {}}) == []


GROUPS = ["belm.errors", "belm._version", "belm.schedule", "belm.analytic", "belm.lte", "belm.solvers", "belm.adapters",
          "belm.models", "belm.apps", "belm.cli", "belm"]
KNOWN_CYCLES: dict[str, str] = {}   # group -> reason, for a cycle being removed elsewhere (none now)


def _group(module: str) -> str:
    return max((g for g in GROUPS if module == g or module.startswith(g + ".")), key=len)


@pytest.mark.parametrize("group", [
    pytest.param(g, marks=pytest.mark.xfail(strict=True, reason=KNOWN_CYCLES[g])) if g in KNOWN_CYCLES else g
    for g in GROUPS])
def test_no_import_cycle(group):
    """No cycle through any module of ``group`` (function-level and TYPE_CHECKING imports included)."""
    g = _graph()
    cycles = [c for c in find_cycles(g) if any(_group(m) == group for m in c)]
    lines = []
    for comp in cycles:
        members = set(comp)
        lines.append(" <-> ".join(comp) + ":")
        lines += [f"    {where}: {src} imports {dst}" for src in comp for dst, where in g[src].items()
                  if dst in members]
    assert not cycles, "import cycles:\n" + "\n".join(lines)
