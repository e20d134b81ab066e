"""The package's own structure, read from its source: one home per primitive, imports that go down.

* No primitive's name appears as a string literal outside the module that defines it
  (docstrings and ``__all__`` aside): parser, printer, compiler, engines, renderer and
  analysis must ask the primitive's definition, never branch on its name.
* The import graph between the package's modules has no circle, counting imports inside
  functions, and no module imports the package ``__init__`` (``import attnmask``,
  ``from attnmask import x``, ``from . import x`` where x is not a submodule).
"""

from __future__ import annotations

import ast
from pathlib import Path

import attnmask as am
from attnmask.primitives import REGISTRY

PACKAGE = Path(am.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of string constants that are docstrings: any bare string statement (module, class,
    function and attribute docstrings)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _all_lists(tree: ast.AST) -> set[int]:
    """ids of string constants inside ``__all__ = [...]`` (exported Python names)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
                out |= {id(c) for c in ast.walk(node.value) if isinstance(c, ast.Constant)}
    return out


def name_literals(path: Path, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) of every string literal equal to one of ``names`` in a file, docstrings and __all__ aside."""
    tree = ast.parse(path.read_text())
    skip = _docstring_nodes(tree) | _all_lists(tree)
    return sorted((node.lineno, node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str)
                  and node.value in names and id(node) not in skip)


def test_no_primitive_name_as_a_string_outside_its_definition():
    home_file = {name: _modules()[type(kind).__module__] for name, kind in REGISTRY.items()}
    assert set(home_file) >= {"causal", "document", "window2d"}
    offences = []
    for module, path in _modules().items():
        for line, name in name_literals(path, set(REGISTRY)):
            if home_file[name] != path:
                offences.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r} (defined in {home_file[name].name})")
    assert not offences, "primitive names used as strings outside their definitions:\n" + "\n".join(offences)


def test_the_name_scan_sees_names_in_code_but_not_in_docstrings(tmp_path):
    # The scan itself must catch what it is meant to catch.
    f = tmp_path / "probe.py"
    f.write_text('"""causal in a docstring"""\n__all__ = ["causal"]\n'
                 'def f(m):\n    """sliding too."""\n    return m.name == "sliding" or m.name in ("rows",)\n')
    assert name_literals(f, {"causal", "sliding", "rows"}) == [(5, "rows"), (5, "sliding")]


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(package modules imported anywhere in the file, explicit imports of the package __init__)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    top = next(iter(sorted(modules, key=len)))          # "attnmask"
    found, of_init = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == top:
                    of_init.append(f"line {node.lineno}: import {alias.name}")
                elif alias.name in modules:
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            plain = [a.name for a in node.names if f"{target}.{a.name}" not in modules]
            found.update(subs)
            if plain:
                if target == top and name != top:
                    of_init.append(f"line {node.lineno}: from {target} import {', '.join(plain)}")
                found.add(target)
    found.discard(name)
    return found, of_init


def test_imports_have_no_circle_and_nothing_imports_the_package_init():
    modules = _modules()
    graph, init_users = {}, []
    for name, path in modules.items():
        graph[name], of_init = _imports(name, path, modules)
        init_users += [f"{name}: {x}" for x in of_init]
    assert "attnmask.compiler" in graph["attnmask.layout"]          # the scan reads the graph
    assert not init_users, "modules importing the package __init__:\n" + "\n".join(init_users)
    # A package's __init__ may import its own submodules; submodules never import their package.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_circle_scan_sees_imports_inside_functions(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    from pkg import thing\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    assert _imports("pkg.b", pkg / "b.py", modules) == ({"pkg.a", "pkg"}, ["line 3: from pkg import thing"])
    assert _imports("pkg.a", pkg / "a.py", modules)[0] == {"pkg.b"}


def test_import_attnmask_stays_light():
    import subprocess
    import sys
    code = "import sys, attnmask; print(sorted(m for m in ('matplotlib', 'transformers', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
