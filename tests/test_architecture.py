"""The layering rules of DESIGN.md §2 and fastblip/models/factory.py, read from the source (``ast``), so a change
that breaks them fails here rather than in a reviewer's head:

- ``fastblip.models`` has no import cycle, counting imports inside functions too (the factory alone names
  every task model; task models import ``base``, ``med``, ``vit``, ``contrastive``, never each other);
- models call ``fastblip.ops``, never ``fastblip.kernels``; ``ops`` never imports ``models``;
- library code never imports the CLI modules (errors live in ``fastblip.errors``);
- the package as a whole has no cycle among module-level imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = {"fastblip.cli", "fastblip.train.cli", "fastblip.eval.cli", "fastblip.capfilt.cli",
               "fastblip.checkpoints.cli", "fastblip.data.cli", "fastblip.demo", "fastblip.__main__"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "fastblip").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = p
    for p in (ROOT / "kernels").glob("*.py"):
        out["fastblip.kernels" + ("" if p.stem == "__init__" else f".{p.stem}")] = p
    return out


def _imports(path: Path, name: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("fastblip")}


def _graph(top_level_only: bool, prefix: str = "fastblip") -> dict[str, set[str]]:
    mods = _modules()
    g = {}
    for name, path in mods.items():
        if name.startswith(prefix):
            g[name] = {m for m in _imports(path, name, top_level_only) if m in mods and m != name
                       and m.startswith(prefix)}
    return g


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        state[n] = 2
        stack.pop()
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_models_have_no_import_cycle_even_through_lazy_imports():
    g = _graph(top_level_only=False, prefix="fastblip.models")
    g = {k: {m for m in v if m != "fastblip.models"} for k, v in g.items() if k != "fastblip.models"}
    assert len(g) >= 10
    assert _cycle(g) is None, " -> ".join(_cycle(g))
    task_models = {"fastblip.models.blip_pretrain", "fastblip.models.blip_retrieval", "fastblip.models.blip_caption",
                   "fastblip.models.blip_vqa", "fastblip.models.blip_nlvr"}
    for m in task_models:
        assert not (g[m] & (task_models | {"fastblip.models.factory"})), (m, g[m] & task_models)


def test_models_call_ops_never_kernels_and_ops_never_models():
    for name, deps in _graph(top_level_only=False).items():
        if name.startswith("fastblip.models"):
            assert not any(d.startswith("fastblip.kernels") for d in deps), name
        if name.startswith("fastblip.ops"):
            assert not any(d.startswith("fastblip.models") for d in deps), name


def test_library_code_never_imports_the_cli():
    for name, deps in _graph(top_level_only=False).items():
        if name not in CLI_MODULES:
            assert not (deps & CLI_MODULES), (name, deps & CLI_MODULES)


def test_package_has_no_cycle_among_module_level_imports():
    g = _graph(top_level_only=True)
    # a package's __init__ re-exporting its submodules is not a cycle of the code
    g = {k: {m for m in v if not k.startswith(m + ".")} for k, v in g.items()}
    c = _cycle(g)
    assert c is None, " -> ".join(c)
