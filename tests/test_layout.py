"""The engine's layout: no import cycles between its modules, imports between wings point one way (down the
list in WINGS), no engine file over MAX_LINES lines. Read with `ast`: nothing is imported."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ROOT / "engine"
MAX_LINES = 350
# Highest first: a wing may import the wings after it, never one before it. "worker" is engine/worker.py (the
# app's entry point); "engine" is the other top-level modules (atomic, blas, protocol, follow, the package).
WINGS = ["cli", "worker", "review", "train", "evaluate", "export", "generate", "model", "native", "data", "config",
         "engine"]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (names for annotations, never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def imports(path: Path) -> set[str]:
    """Every engine module `path` imports at run time, at the top or inside a function."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "engine")
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "engine":
            submodules = {f"{node.module}.{a.name}" for a in node.names
                          if (ENGINE.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()}
            found.update(submodules)  # `from engine.train import run_folder` imports engine.train.run_folder
            if len(submodules) < len(node.names):  # and names defined in the module (a package's __init__) itself
                found.add(node.module)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ENGINE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in files and m != name} for name, path in files.items()}


def wing(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2 or (len(parts) == 2 and (ENGINE / parts[1]).is_dir()):
        return parts[1]
    return {"engine.cli": "cli", "engine.worker": "worker", "engine.config": "config"}.get(module, "engine")


def test_no_import_cycles():
    g = graph()
    done, path, cycles = set(), [], []

    def visit(m):
        if m in path:
            cycles.append(path[path.index(m):] + [m])
            return
        if m in done:
            return
        path.append(m)
        for n in sorted(g[m]):
            visit(n)
        path.pop()
        done.add(m)

    for m in sorted(g):
        visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_wings_import_downwards():
    up = sorted(f"{m} ({wing(m)}) imports {n} ({wing(n)})" for m, deps in graph().items() for n in deps
                if wing(m) != wing(n) and WINGS.index(wing(n)) < WINGS.index(wing(m)))
    assert not up, "\n".join(up)


def test_engine_files_are_short():
    long = sorted(f"{p.relative_to(ROOT)}: {n} lines" for p in ENGINE.rglob("*.py")
                  if (n := len(p.read_text().splitlines())) > MAX_LINES)
    assert not long, "\n".join(long)
