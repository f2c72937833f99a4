"""The package's layers import downwards only: every import of every module of dessam_d2 (read
with ast, relative imports resolved, imports inside functions included) is checked against the
layer table below.

    tools/, benchmarks/          (outside the package: may import anything)
    cli                          the tools' error policy and launcher: only tools import it
    plugin                       the napari plugin: a front end over recipes and below
    recipes                      importable runs (demo, reproduction, pretraining)
    engine | inference           training | prediction; neither imports the other
    modeling | data | evaluation one layer of three independent parts: none imports another
    config | errors | utils      the bottom: config may import errors and utils, utils errors,
                                 errors nothing

A module may import its own subpackage (sideways) and any layer below its own. The package's
``__init__`` is its public face: it may import anything but ``cli`` (lazily: importing the
package stays light). Also: no module over 400 lines, no tool of 150 lines or more.
"""

import ast
import os

from conftest import ROOT

PACKAGE = "dessam_d2"
MAX_LINES = 400
MAX_TOOL_LINES = 150

# part -> the parts it may import besides itself
BOTTOM = {"config": {"errors", "utils"}, "utils": {"errors"}, "errors": set()}
MIDDLE = {part: set(BOTTOM) for part in ("modeling", "data", "evaluation")}
UPPER = {part: set(BOTTOM) | set(MIDDLE) for part in ("engine", "inference")}
ALLOWED = {
    **BOTTOM,
    **MIDDLE,
    **UPPER,
    "recipes": set(BOTTOM) | set(MIDDLE) | set(UPPER),
    "cli": set(BOTTOM),
    "plugin": set(BOTTOM) | set(MIDDLE) | set(UPPER) | {"recipes"},
}
ALLOWED[""] = set(ALLOWED) - {"cli"}  # dessam_d2/__init__.py


def _modules():
    """(dotted module name, path) of every module of the package."""
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield dotted[: -len(".__init__")] if name == "__init__.py" else dotted, path


def _imports(module: str, path: str):
    """(line, imported dotted name) of every import in the file, relative ones resolved."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                if node.module:
                    yield node.lineno, f"{base}.{node.module}"
                else:  # from . import x, y: each is a module (or a name) of base
                    for alias in node.names:
                        yield node.lineno, f"{base}.{alias.name}"
            elif node.module == PACKAGE:  # from dessam_d2 import x
                for alias in node.names:
                    yield node.lineno, f"{PACKAGE}.{alias.name}"
            else:
                yield node.lineno, node.module


def _part(dotted: str) -> str:
    """The layer part of a dotted name inside the package ("" for the package itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else ""


def layering_violations():
    found = []
    for module, path in _modules():
        own = _part(module)
        for line, target in _imports(module, path):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            other = _part(target)
            if other == own or other not in ALLOWED:  # sideways, or a name of the package
                continue
            if other not in ALLOWED[own]:
                found.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target}")
    return found


def test_every_import_goes_down_the_layers():
    assert set(ALLOWED) >= {_part(m) for m, _ in _modules()}, "a part missing from the table"
    violations = layering_violations()
    assert not violations, "imports against the layers:\n" + "\n".join(violations)


def test_no_module_over_400_lines():
    long = []
    for module, path in _modules():
        with open(path) as f:
            n = sum(1 for _ in f)
        if n > MAX_LINES:
            long.append(f"{os.path.relpath(path, ROOT)}: {n} lines")
    assert not long, "\n".join(long)


def test_every_tool_under_150_lines():
    long = []
    for name in sorted(os.listdir(os.path.join(ROOT, "tools"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "tools", name)) as f:
                n = sum(1 for _ in f)
            if n >= MAX_TOOL_LINES:
                long.append(f"tools/{name}: {n} lines")
    assert not long, "\n".join(long)


def test_the_checker_sees_relative_function_level_and_package_imports(tmp_path):
    path = tmp_path / "sub.py"
    path.write_text(
        "from ..engine import Trainer\n"
        "def f():\n"
        "    from .. import cli\n"
        "    from . import losses\n"
        "import dessam_d2.inference.predictor\n"
        "from dessam_d2 import errors\n"
    )
    assert sorted(_imports("dessam_d2.modeling.sub", str(path))) == [
        (1, "dessam_d2.engine"),
        (3, "dessam_d2.cli"),
        (4, "dessam_d2.modeling.losses"),
        (5, "dessam_d2.inference.predictor"),
        (6, "dessam_d2.errors"),
    ]


def test_every_test_file_is_named_after_the_module_it_tests():
    """tests/test_<package>_<module>[_<aspect>].py names a module of dessam_d2 (or benchmarks/);
    test_e2e_* (whole runs of the tools), test_docs_* and this file are the exceptions."""
    modules = set()
    for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py") and name != "__init__.py":
                rel = os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, PACKAGE))
                modules.add(rel[:-3].replace(os.sep, "_"))
    for name in os.listdir(os.path.join(ROOT, "benchmarks")):
        if name.endswith(".py") and name != "__init__.py":
            modules.add("benchmarks_" + name[:-3])
    unnamed = []
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        subject = name[len("test_") : -len(".py")]
        if subject.startswith(("e2e_", "docs_")) or subject == "layering":
            continue
        if not any(subject == m or subject.startswith(m + "_") for m in modules):
            unnamed.append(name)
    assert unnamed == [], "tests not named after a module"
