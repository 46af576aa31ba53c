"""The project's source files a stage executes, and their digests.

One definition of "a stage's code" for two users: dvc.yaml lists exactly these files as the
stage's deps (``tests/test_dvc_graph.py`` checks it), and a training checkpoint records their
digests, so that a run does not resume silently across a change of the code that trained it
(``train.on_code_change``). Found from the source's import statements (``ast``), not from what a
process happened to import, so the answer does not depend on how far a run got.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PACKAGE = "udpdiff"
SOURCE_ROOT = Path(__file__).resolve().parents[1]  # holds udpdiff/: paths are relative to it
# every stage's process loads the params and paths (flows/common.py: load) before the stage's module
LOADED_BY_EVERY_STAGE = ("udpdiff.config", "udpdiff.paths")


def _module_file(name: str) -> Path | None:
    base = SOURCE_ROOT / Path(*name.split("."))
    if (base / "__init__.py").exists():
        return base / "__init__.py"
    return base.with_suffix(".py") if base.with_suffix(".py").exists() else None


def _imports(path: Path, module: str) -> set[str]:
    """Every module an import statement in ``path`` names, function-level imports included and
    ``if TYPE_CHECKING:`` blocks excluded (they never run)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return found


def imported_files(module: str) -> set[str]:
    """The project files importing ``module`` executes (paths relative to :data:`SOURCE_ROOT`): its
    own imports, transitively, and the ``__init__`` of every package on the way."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for candidate in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if candidate in seen or not candidate.startswith(PACKAGE):
                continue
            file = _module_file(candidate)
            if file is None:
                continue
            seen[candidate] = file
            todo.extend(i for i in _imports(file, candidate) if i.startswith(PACKAGE))
    return {f.relative_to(SOURCE_ROOT).as_posix() for f in seen.values()}


def stage_files(stage: str) -> set[str]:
    """The files ``python -m flows stage <stage>`` executes of this package: what its DVC deps list."""
    files = imported_files(f"{PACKAGE}.stages.{stage}")
    for module in LOADED_BY_EVERY_STAGE:
        files |= imported_files(module)
    return files


def stage_code_digests(stage: str) -> dict[str, str]:
    """``{file: sha256}`` of :func:`stage_files`."""
    return {f: hashlib.sha256((SOURCE_ROOT / f).read_bytes()).hexdigest() for f in sorted(stage_files(stage))}


def changed_files(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """Files added, removed or edited between two :func:`stage_code_digests`."""
    return sorted(f for f in recorded.keys() | current.keys() if recorded.get(f) != current.get(f))


__all__ = ["changed_files", "imported_files", "stage_code_digests", "stage_files"]
