"""No import cycles inside castiron: every module can be understood (and imported) after the
modules it imports, never together with them.

Counts every import, including those made inside functions and under ``TYPE_CHECKING``: an
import done late to save start-up time is still a dependency. A cycle is reported as the
modules of one strongly connected component, with the imports that close it.
"""

from __future__ import annotations

from collections.abc import Iterator

import grimp


def _imported_by(graph: grimp.ImportGraph, module: str) -> Iterator[str]:
    return iter(sorted(graph.find_modules_directly_imported_by(module)))


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in modules:
        if root in index:
            continue
        work = [(root, _imported_by(graph, root))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if not child.startswith("castiron"):
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, _imported_by(graph, child)))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: grimp.ImportGraph, component: list[str]) -> str:
    lines = [" <-> ".join(component)]
    for importer in component:
        for imported in component:
            if importer != imported and graph.direct_import_exists(
                importer=importer, imported=imported
            ):
                details = graph.get_import_details(importer=importer, imported=imported)
                at = ", ".join(str(d["line_number"]) for d in details)
                lines.append(f"  {importer} -> {imported} (line {at})")
    return "\n".join(lines)


def test_castiron_has_no_import_cycles() -> None:
    graph = grimp.build_graph("castiron", cache_dir=None)
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(graph, c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for name in ("castiron.a", "castiron.b", "castiron.c"):
        graph.add_module(name)
    graph.add_import(importer="castiron.a", imported="castiron.b")
    graph.add_import(importer="castiron.b", imported="castiron.a")
    graph.add_import(importer="castiron.b", imported="castiron.c")
    assert _cycles(graph) == [["castiron.a", "castiron.b"]]
    assert "castiron.a -> castiron.b" in _describe(graph, ["castiron.a", "castiron.b"])


