"""The dependency direction of DESIGN.md, checked on the source: every `import` (top-level or inside
a function) of every module.

    cli, api -> bench / serve / cluster / generate / client -> replay / policies -> zoo -> model -> core

A package may import its own layer and the layers below it, never one above; `core` imports
nothing but numpy and the standard library, so the same decisions run in the server and in replay.
`client` (tools that send traffic to a server) shares the serving layer, but nothing that runs in a
server (`serve`, `cluster`) imports it: the server must not depend on its own load generators.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "apparate"
RANK = {"core": 0, "model": 1, "zoo": 2, "replay": 3, "policies": 3,
        "bench": 4, "serve": 4, "cluster": 4, "generate": 4, "client": 4, "cli": 5, "api": 5}
# Pairs a layer's rank would allow but the design forbids: (importer, imported).
FORBIDDEN = {("serve", "client"), ("cluster", "client")}
ANYWHERE = {"paths", "devices", "__init__", "__main__"}  # small shared utilities (and the package itself)


def imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the package the file is in
                out.append((node.lineno, "apparate." + path.relative_to(SRC).parts[0]))
            elif node.module:
                out.append((node.lineno, node.module))
    return out


def package_of(path: Path) -> str:
    parts = path.relative_to(SRC).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def test_every_package_has_a_layer():
    pkgs = {package_of(p) for p in SRC.rglob("*.py")} - ANYWHERE
    assert pkgs <= set(RANK), f"packages without a layer in this test: {sorted(pkgs - set(RANK))}"


def test_imports_run_down_the_layers():
    bad = []
    for path in SRC.rglob("*.py"):
        here = package_of(path)
        if here in ANYWHERE:
            continue
        for line, name in imports(path):
            if not name.startswith("apparate"):
                continue
            parts = name.split(".")
            there = parts[1] if len(parts) > 1 else "__init__"
            if there in ANYWHERE:
                if here == "core":
                    bad.append(f"{path.relative_to(SRC)}:{line} core imports {name}")
                continue
            if RANK[there] > RANK[here]:
                bad.append(f"{path.relative_to(SRC)}:{line} {here} imports {name} (a higher layer)")
            elif (here, there) in FORBIDDEN:
                bad.append(f"{path.relative_to(SRC)}:{line} {here} imports {name} (forbidden: a server "
                           f"never imports the client tools)")
    assert not bad, "\n".join(bad)


def test_core_needs_only_numpy_and_the_standard_library():
    allowed = set(sys.stdlib_module_names) | {"numpy", "__future__", "apparate"}
    bad = [f"{p.relative_to(SRC)}:{line} imports {name}" for p in (SRC / "core").rglob("*.py")
           for line, name in imports(p) if name.split(".")[0] not in allowed
           or (name.startswith("apparate") and not name.startswith("apparate.core"))]
    assert not bad, "\n".join(bad)


def module_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in it, functions included)."""
    mods = {".".join(("apparate",) + p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): p
            for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for _, name in imports(path):
            # `from apparate.zoo import traces` names a module; `from apparate.zoo.x import f` its module
            while name and name not in mods:
                name = name.rpartition(".")[0]
            if name and name != mod and not mods[name].name == "__init__.py":
                deps.add(name)
        graph[mod] = deps
    return graph


def test_zoo_modules_import_no_circle():
    """The zoo's registry only dispatches; no two zoo modules reach each other (issue 20 part 8:
    `workloads` and `video_lite0` used to)."""
    graph = {m: {d for d in deps if d.startswith("apparate.zoo.")} for m, deps in module_graph().items()
             if m.startswith("apparate.zoo.")}
    circles = []
    for start in graph:  # depth-first from each module: a path back to it is a circle
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    circles.append(" -> ".join(path + (start,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + (nxt,)))
    assert not circles, "\n".join(sorted(circles))
