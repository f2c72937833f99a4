"""Every repository file the documentation names exists: paths in the README, docs/, the weights
and datasets READMEs, requirements.txt and the package's and tools' docstrings and comments
(``tools/predict.py``, ``configs/*.yaml``, ``SPEC.md``), and every ``dessam_d2.module.name``.

Not checked: placeholders (``tests/test_<package>_<module>.py``, ``f"tools/{tool}"``), data the
user brings (``datasets/cnseg``; only datasets/README.md is ours), outputs (``output/...`` is not a
repository folder) and the few examples of ALLOWED. A glob must match at least one file.
"""

import ast
import glob
import os
import re

import pytest
from conftest import ROOT

DOCUMENTS = (
    ["README.md", "requirements.txt", "weights/README.md", "datasets/README.md"]
    + sorted(glob.glob("docs/*.md"))
    + sorted(glob.glob("dessam_d2/**/*.py", recursive=True))
    + sorted(glob.glob("tools/*.py"))
    + sorted(glob.glob("benchmarks/*.py"))
)
FOLDERS = (
    "dessam_d2",
    "tools",
    "benchmarks",
    "tests",
    "configs",
    "docs",
    "weights",
    "datasets",
    "scripts",
)
# A path starts a word (not inside a URL or another path) and ends with a letter, digit, * or >.
PATH = re.compile(
    rf"(?<![\w./-])((?:{'|'.join(FOLDERS)})/[\w./*?<>{{}}-]*[\w*>}}]|[A-Z][A-Z_]*\.md)(?![\w/])"
)
MODULE_NAME = re.compile(r"(?<![\w.])dessam_d2(?:\.\w+)+")

# Named but not in the repository, on purpose.
ALLOWED = {
    "weights/sam_vit_b_01ec64.pth": "the official SAM checkpoint, downloaded by the user",
    "weights/tiny_sam_shapes_phase1.pth": "written by the pretraining command shown, not kept",
    "weights/tiny_sam_shapes_phase2.pth": "written by the pretraining command shown, not kept",
}


def named_paths(text: str):
    for match in PATH.finditer(text):
        path = match.group(1)
        if "<" in path or "{" in path:
            continue  # a placeholder
        if path.startswith("datasets/") and path != "datasets/README.md":
            continue  # the user's data
        yield path


def exists(path: str) -> bool:
    if "*" in path or "?" in path:
        return bool(glob.glob(path))
    if "/" not in path:  # a bare document name: at the top or in docs/
        return os.path.exists(path) or os.path.exists(os.path.join("docs", path))
    return os.path.exists(path)


def defined_names(module_file: str) -> set:
    """The names a module defines, imports or lists in ``__all__`` at its top level (what
    ``module.name`` can reach)."""
    names = set()
    for node in ast.parse(open(module_file).read()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(getattr(t, "id", "") == "__all__" for t in targets):
                names.update(ast.literal_eval(node.value))  # also the lazily imported ones
    return names


def module_name_exists(name: str) -> bool:
    """``dessam_d2.a.b.c``: the longest prefix that is a module, then (if any) a name in it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = os.path.join(*parts[:i])
        for module_file in (base + ".py", os.path.join(base, "__init__.py")):
            if os.path.isfile(module_file):
                return i == len(parts) or parts[i] in defined_names(module_file)
    return False


def test_the_patterns_find_paths_and_skip_placeholders_urls_and_user_data():
    text = (
        "see tools/predict.py, `configs/dessam_demo.yaml`. https://x.org/tools/x.py "
        "tests/test_<package>_<module>.py datasets/cnseg output/run/model_final.pth "
        "tests/test_e2e_*.py and SPEC.md; dessam_d2/inference/slides.py:12"
    )
    assert list(named_paths(text)) == [
        "tools/predict.py",
        "configs/dessam_demo.yaml",
        "tests/test_e2e_*.py",
        "SPEC.md",
        "dessam_d2/inference/slides.py",
    ]
    assert not exists("SPEC.md") and exists("METHOD.md") and exists("tests/test_e2e_*.py")
    assert module_name_exists("dessam_d2.inference.tiling.tile_starts")
    assert module_name_exists("dessam_d2.modeling.DESSAM")  # imported in __init__
    assert not module_name_exists("dessam_d2.predict.tile_starts")
    assert not module_name_exists("dessam_d2.inference.predictor.no_such_name")


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_path_a_document_names_exists(document):
    text = open(os.path.join(ROOT, document), encoding="utf-8").read()
    missing = sorted(
        {p for p in named_paths(text) if p not in ALLOWED and not exists(p)}
        | {m for m in MODULE_NAME.findall(text) if not module_name_exists(m)}
    )
    assert missing == [], f"{document} names what does not exist"


def test_allowed_examples_are_still_named_and_still_absent():
    text = "".join(open(d, encoding="utf-8").read() for d in DOCUMENTS)
    for path in ALLOWED:
        assert path in text and not os.path.exists(path), path


def _package_section() -> str:
    """The package tree, in docs/PACKAGE.md (the README links it)."""
    with open(os.path.join(ROOT, "docs", "PACKAGE.md"), encoding="utf-8") as f:
        text = f.read()
    start = text.index("## What is in the package")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_readme_package_tree_names_every_module_and_tool():
    """docs/PACKAGE.md's "What is in the package" matches the tree: it names every module of the
    package and every tool by its file name."""
    section = _package_section()
    words = set(re.findall(r"[\w.]+", section))
    missing = []
    for path in sorted(glob.glob(os.path.join(ROOT, "dessam_d2", "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, ROOT)
        if os.path.basename(rel) not in words | {"__init__.py"}:
            missing.append(rel)
    for path in sorted(glob.glob(os.path.join(ROOT, "tools", "*.py"))):
        if os.path.basename(path) not in words:
            missing.append(os.path.relpath(path, ROOT))
    assert missing == [], "docs/PACKAGE.md's 'What is in the package' does not name these"


def test_readme_package_tree_names_nothing_that_is_gone():
    """Every ``name.py`` the section names is a file of the repository."""
    files = {
        os.path.basename(p)
        for folder in ("dessam_d2", "tools", "benchmarks", "tests")
        for p in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    }
    named = set(re.findall(r"\b(\w+\.py)\b", _package_section()))
    assert sorted(named - files) == []
