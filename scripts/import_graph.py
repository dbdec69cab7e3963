"""How the package is laid out, in numbers: modules at the root, import
circles, arrows back up (the core importing cli/, tui/ or daemon/), and
modules over 500 lines. Every import counts, lazy and TYPE_CHECKING ones
included (a circle hidden in a function is still a circle).

    python scripts/import_graph.py [--edges] [SRC]   (SRC: another checkout's src/llama_orchestrator)
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PKG = "llama_orchestrator"
_given = [a for a in sys.argv[1:] if not a.startswith("--")]
SRC = Path(_given[0]) if _given else Path(__file__).resolve().parent.parent / "src" / PKG
SHELL = ("cli", "tui", "daemon")  # they use the core; the core never imports them


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = [PKG, *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                prefix = base[: len(base) - node.level + 1] if node.level else []
                module = ".".join(prefix + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" for a in node.names] + [module]
            else:
                continue
            for t in targets:
                if t in mods and t != name:
                    out[name].add(t)
    return out


def circles(graph: dict[str, set[str]], nodes: list[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                comp.append(w)
            comp.append(v)
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in nodes:
        if v not in index:
            visit(v)
    return found


def main() -> None:
    mods = modules()
    graph = edges(mods)
    root = sorted(
        n.split(".")[1] for n, p in mods.items() if n.count(".") == 1 and p.name != "__init__.py"
    )
    root = [r for r in root if r != "__main__"]
    shell = (*(f"{PKG}.{s}" for s in SHELL), f"{PKG}.__main__")  # __main__: the entry point
    up = sorted(
        (a, b)
        for a, targets in graph.items()
        for b in targets
        if not a.startswith(shell) and b.startswith(shell[:-1])
    )
    big = sorted(
        (len(p.read_text().splitlines()), n)
        for n, p in mods.items()
        if len(p.read_text().splitlines()) > 500
    )
    print(f"modules at the root: {len(root)} ({', '.join(root)})")
    print(f"import circles: {len(circles(graph, list(mods)))} {circles(graph, list(mods))}")
    print(f"arrows back up (core -> {'/'.join(SHELL)}): {len(up)} {up}")
    print(f"modules over 500 lines: {len(big)} {[f'{n} ({k})' for k, n in big]}")
    if "--edges" in sys.argv:
        for a in sorted(graph):
            print(a, "->", ", ".join(sorted(graph[a])))


if __name__ == "__main__":
    main()
