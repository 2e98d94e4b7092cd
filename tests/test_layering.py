"""The packages' layers (docs/architecture.md, "Layers"): fedtiny at the bottom, fedtiny_device and fedtiny_server
on it and never importing each other, fedtiny_sim on top; fedtiny.cli, the application layer, may import every
package but only inside functions.

The check reads every import statement of the installed packages with `ast`: module level and inside functions
(a function-level import is a dependency all the same, only a later one), plus `importlib.import_module` and
`__import__` calls with a literal name. It builds the package-level graph (which package imports which, and from
which module and line) and fails on every edge that goes the wrong way.
"""

import ast
import importlib.util
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from click.testing import CliRunner

PACKAGES = ("fedtiny", "fedtiny_device", "fedtiny_server", "fedtiny_sim")
MAY_IMPORT = {
    "fedtiny": set(),
    "fedtiny_device": {"fedtiny"},
    "fedtiny_server": {"fedtiny"},
    "fedtiny_sim": {"fedtiny", "fedtiny_device", "fedtiny_server"},
}
APPLICATION = {"fedtiny.cli"}  # may import any package, inside functions only


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. fedtiny.quantize
    path: Path
    line: int
    target: str  # the imported module, e.g. fedtiny_device.arith
    in_function: bool

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}"


def _literal_import(call: ast.Call) -> str | None:
    """The module of importlib.import_module("x") / import_module("x") / __import__("x"), if a literal."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name in ("import_module", "__import__") and call.args and isinstance(call.args[0], ast.Constant):
        value = call.args[0].value
        return value if isinstance(value, str) and not value.startswith(".") else None
    return None


def _imports(node: ast.AST, module: str, path: Path, in_function: bool):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(module, path, child.lineno, alias.name, in_function)
        elif isinstance(child, ast.ImportFrom) and child.level == 0:  # relative imports stay in the package
            yield Import(module, path, child.lineno, child.module, in_function)
        elif isinstance(child, ast.Call) and (target := _literal_import(child)):
            yield Import(module, path, child.lineno, target, in_function)
        inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, module, path, inner)


def package_imports(package: str, root: Path):
    """Every import statement in the .py files under root, the folder of `package`."""
    files = sorted(root.rglob("*.py"))
    assert files, f"no Python files in {root} ({package})"
    for path in files:
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        yield from _imports(ast.parse(path.read_bytes(), str(path)), ".".join(parts), path, False)


def import_graph(roots: dict[str, Path]) -> dict[tuple[str, str], list[Import]]:
    """(importing package, imported package) -> the imports that make the edge; packages outside roots ignored."""
    graph: dict[tuple[str, str], list[Import]] = {}
    for package, root in roots.items():
        for imp in package_imports(package, root):
            target = imp.target.split(".")[0]
            if target in roots and target != package:
                graph.setdefault((package, target), []).append(imp)
    return graph


def wrong_imports(graph, may_import: dict[str, set[str]], application: set[str]) -> list[str]:
    """One line per import that breaks the layers, naming file, line, importing and imported module."""
    wrong = []
    for (package, target), imports in sorted(graph.items()):
        if target in may_import[package]:
            continue
        for imp in imports:
            if imp.module in application:
                if not imp.in_function:
                    wrong.append(f"{imp.where()} at module level (the application layer imports the packages "
                                 "above it only inside functions)")
            else:
                allowed = ", ".join(sorted(may_import[package])) or "none of the others"
                wrong.append(f"{imp.where()} ({package} may import {allowed})")
    return wrong


def installed_roots() -> dict[str, Path]:
    roots = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, f"{name} is not an installed package"
        (location,) = spec.submodule_search_locations
        roots[name] = Path(location)
    return roots


def test_installed_packages_import_each_other_one_way_only():
    graph = import_graph(installed_roots())
    # the walk sees the edges that must exist (else an empty graph would pass)
    assert {("fedtiny_device", "fedtiny"), ("fedtiny_server", "fedtiny"), ("fedtiny_sim", "fedtiny_server"),
            ("fedtiny_sim", "fedtiny_device"), ("fedtiny", "fedtiny_sim")} <= set(graph)
    wrong = wrong_imports(graph, MAY_IMPORT, APPLICATION)
    assert not wrong, "imports against the layers (docs/architecture.md):\n" + "\n".join(wrong)


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_checker_names_module_and_line_of_a_cycle(tmp_path):
    """low <- high is allowed; high <- low (inside a function, as cycles like to hide) is not."""
    write_tree(tmp_path, {
        "low/__init__.py": "",
        "low/core.py": "import os\n\n\ndef helper():\n    from high.app import run\n    return run\n",
        "low/lazy.py": "import importlib\n\nPLUGIN = importlib.import_module('high.app')\n",
        "high/__init__.py": "from low import core\n",
        "high/app.py": "from . import helper\nimport low.core\n\n\ndef run():\n    return low.core\n",
    })
    roots = {"low": tmp_path / "low", "high": tmp_path / "high"}
    graph = import_graph(roots)
    assert sorted(graph) == [("high", "low"), ("low", "high")]  # a cycle; os and relative imports are not edges
    wrong = wrong_imports(graph, {"low": set(), "high": {"low"}}, set())
    assert wrong == [
        f"{tmp_path / 'low/core.py'}:5: low.core imports high.app (low may import none of the others)",
        f"{tmp_path / 'low/lazy.py'}:3: low.lazy imports high.app (low may import none of the others)",
    ]


def test_checker_lets_the_application_layer_import_upward_inside_functions_only(tmp_path):
    write_tree(tmp_path, {
        "low/__init__.py": "",
        "low/cli.py": "import high\n\n\ndef command():\n    from high.app import run\n    run()\n",
        "high/__init__.py": "",
        "high/app.py": "def run():\n    pass\n",
    })
    graph = import_graph({"low": tmp_path / "low", "high": tmp_path / "high"})
    wrong = wrong_imports(graph, {"low": set(), "high": {"low"}}, {"low.cli"})
    assert len(wrong) == 1 and wrong[0].startswith(f"{tmp_path / 'low/cli.py'}:1: low.cli imports high at module level")


def test_importing_the_cli_imports_no_upper_package():
    """The `fedtiny` command's upper-layer commands load on use: `import fedtiny.cli` pulls in none of them."""
    code = ("import sys, fedtiny.cli\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'fedtiny_device', 'fedtiny_server', 'fedtiny_sim'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_fedtiny_command_loads():
    from fedtiny.cli import main

    commands = main.list_commands(None)
    assert {"codegen", "coordinator", "broker-config", "simulate", "compile"} <= set(commands)
    for name in commands:
        result = CliRunner().invoke(main, [name, "--help"])
        assert result.exit_code == 0 and "Usage: " in result.output, (name, result.output)
