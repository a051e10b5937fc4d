"""The shape of the house: one import name, imports that run one way, no cycles.

Read from the source with `ast` (nothing is imported), so a wrong import fails
here even when no other test happens to execute that line. Imports inside
functions count too: a lazy import that dodges a cycle is still a cycle.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from vpr import settings as settings_tree

REPO = Path(__file__).resolve().parents[2]

# Who may import whom (docs/ARCHITECTURE.md). `settings` is vpr/settings.py.
ALLOWED: dict[str, set[str]] = {
    "settings": set(),
    "model": set(),
    "media": {"model"},
    "data": {"media", "model"},
    "describe": {"media", "model"},
    "index": {"describe", "data", "media", "model", "settings"},
    "track": {"settings"},
    "evaluation": {"track", "index", "describe", "data", "media", "model", "settings"},
    "train": {"evaluation", "track", "index", "describe", "data", "media", "model", "settings"},
    "server": {"track", "index", "describe", "data", "media", "model", "settings"},
    "cli": {"server", "train", "evaluation", "track", "index", "describe", "data", "media", "model", "settings"},
}
OLD_TOP_LEVEL = {"model", "index", "train", "server", "cli", "data", "media", "describe", "evaluation", "track"}


def package_of(module: str) -> str | None:
    """`vpr.index.store` -> `index`; `vpr.settings` -> `settings`; others -> None."""
    parts = module.split(".")
    if parts[0] != "vpr" or len(parts) < 2:
        return None
    return parts[1]


def source_modules() -> dict[str, Path]:
    """Every module of the installed name, by dotted name, from the real folders."""
    found = {"vpr": REPO / "vpr" / "__init__.py", "vpr.settings": REPO / "vpr" / "settings.py"}
    for pkg in ALLOWED:
        folder = REPO / pkg
        if pkg == "settings" or not folder.is_dir():
            continue
        for path in folder.rglob("*.py"):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(["vpr", *parts])] = path
    return found


def imports_of(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - (node.level - 1)]
                target = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                target = node.module or ""
            out.append((target, node.lineno))
            # `from vpr.x import y` may import the submodule vpr.x.y
            out.extend((f"{target}.{alias.name}", node.lineno) for alias in node.names)
    return out


MODULES = source_modules()


def edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _ in imports_of(module, path):
            if target in MODULES and target != module:
                graph[module].add(target)
    return graph


def test_one_top_level_name_and_linked_packages() -> None:
    for pkg in ALLOWED:
        if pkg == "settings":
            continue
        link = REPO / "vpr" / pkg
        assert (REPO / pkg / "__init__.py").is_file(), f"{pkg}/ is a package at the repository root"
        assert link.is_symlink() and link.resolve() == (REPO / pkg).resolve(), f"vpr/{pkg} links ../{pkg}"
    text = (REPO / "pyproject.toml").read_text()
    assert 'include = ["vpr", "vpr.*"]' in text, "only the vpr name is packaged"


def test_imports_run_one_way() -> None:
    bad = []
    for module, path in MODULES.items():
        src = package_of(module)
        if src is None:
            continue
        for target, line in imports_of(module, path):
            top = target.split(".")[0]
            if top in OLD_TOP_LEVEL:
                bad.append(f"{path.relative_to(REPO)}:{line} imports {target!r}: use the vpr. name")
                continue
            dst = package_of(target)
            if dst is None or dst == src:
                continue
            if dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(REPO)}:{line} ({src}) imports {target} ({dst})")
    assert not bad, "imports against docs/ARCHITECTURE.md:\n" + "\n".join(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the module graph, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        state[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                state[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(edges())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_nothing_but_the_cli_imports_the_server() -> None:
    users = sorted(
        m
        for m, deps in edges().items()
        if package_of(m) not in ("server", "cli") and any(package_of(d) == "server" for d in deps)
    )
    assert users == []


def test_environment_is_read_only_in_the_settings_tree() -> None:
    """`VPR_*` variables are declared in vpr/settings.py, never read ad hoc."""
    pattern = re.compile(r"""(environ(\.get)?\s*[\[(]|getenv\s*\()\s*["']VPR_""")
    bad = [
        f"{p.relative_to(REPO)}:{n}"
        for m, p in MODULES.items()
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert bad == []


def test_readme_documents_every_variable() -> None:
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"`(VPR_[A-Z0-9_]+)`", readme))
    declared = set(settings_tree.env_variables())
    assert declared - documented == set(), "add these to the README's configuration table"
    extra = documented - declared - {"VPR_SHARED"}  # VPR_SHARED: where tests and benches find ../shared
    assert extra == set(), "the README documents variables nothing reads"


@pytest.mark.skipif(sys.platform != "linux", reason="symlinked packages are checked on Linux")
def test_settings_tree_imports_nothing_of_ours() -> None:
    deps = {d for d in edges()["vpr.settings"]}
    assert deps == set()
