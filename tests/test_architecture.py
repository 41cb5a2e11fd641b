"""The package layering, checked statically: every import statement of every .py file (function-local ones included)
is parsed with `ast`, relative imports resolved, so a violation fails here whether or not the code path runs.

    ldm        imports none of samplers, sample, train, metrics (the model layer is the bottom)
    samplers   imports nothing from ldm (samplers receive ᾱ as data)
    train, metrics   never import each other (both import the shared pieces below them)
    every library package imports no oracle (diffusers, transformers, k_diffusion, open_clip, spandrel)

And the test suite reaches optional packages only through tests/oracles.py, so LDM_REQUIRE_ORACLES=1 can turn a missing
oracle into a failure.
"""
import ast
from pathlib import Path

import pytest

from oracles import REQUIRE_ORACLES, find_oracle, import_oracle

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("ldm", "samplers", "kernels", "train", "sample", "metrics", "shapes")
FORBIDDEN_IMPORTS = {
    "ldm": {"samplers", "sample", "train", "metrics"},
    "samplers": {"ldm"},
    "train": {"metrics"},
    "metrics": {"train"},
}
ORACLES = {"diffusers", "transformers", "k_diffusion", "open_clip", "spandrel"}


def imported_top_level_names(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every import in the file at `path` (a module of the package tree under `root`),
    wherever it stands; `from . import x` and `from ..pkg import x` are resolved against the file's own package."""
    package = list(path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append((node.lineno, node.module.split(".")[0]))
                continue
            base = package[:len(package) - (node.level - 1)]
            if not base:  # `from .. import x` above the top-level package: Python refuses it, nothing to map
                continue
            found.append((node.lineno, base[0]))
    return found


def violations(package: str, forbidden: set[str], root: Path = REPO_ROOT) -> list[str]:
    """"path:line imports name" for each import of a `forbidden` top-level package by a module of `package`."""
    return [f"{path.relative_to(root)}:{line} imports {name}"
            for path in sorted((root / package).rglob("*.py"))
            for line, name in imported_top_level_names(path, root) if name in forbidden]


@pytest.mark.parametrize("package", FORBIDDEN_IMPORTS)
def test_each_layer_imports_only_what_lies_below_it(package):
    assert (REPO_ROOT / package / "__init__.py").is_file(), f"package {package} moved: update this test's layering"
    found = violations(package, FORBIDDEN_IMPORTS[package])
    assert not found, f"{package} must not import {', '.join(sorted(FORBIDDEN_IMPORTS[package]))}:\n" + "\n".join(found)


@pytest.mark.parametrize("package", LIBRARY_PACKAGES)
def test_no_library_package_imports_an_oracle(package):
    found = violations(package, ORACLES)
    assert not found, f"library code must not import the test oracles ({', '.join(sorted(ORACLES))}):\n" + \
        "\n".join(found)


def test_the_import_scan_sees_local_relative_and_aliased_imports(tmp_path):
    module = tmp_path / "train" / "methods" / "lora.py"
    module.parent.mkdir(parents=True)
    module.write_text("import os.path as p\n"
                      "from . import base\n"
                      "def score():\n"
                      "    from ...metrics import clip\n"   # above the top: ignored, Python refuses it too
                      "    from ..sibling import x\n"
                      "    import metrics.shapes, diffusers\n"
                      "    from k_diffusion.sampling import sample_euler as euler\n")
    assert imported_top_level_names(module, tmp_path) == [
        (1, "os"), (2, "train"), (5, "train"), (6, "metrics"), (6, "diffusers"), (7, "k_diffusion")]
    assert violations("train", {"metrics"}, tmp_path) == ["train/methods/lora.py:6 imports metrics"]
    assert violations("train", ORACLES, tmp_path) == ["train/methods/lora.py:6 imports diffusers",
                                                      "train/methods/lora.py:7 imports k_diffusion"]


def test_the_tests_reach_optional_packages_only_through_the_oracle_helpers():
    bare = [f"{path.name}:{node.lineno}" for path in sorted((REPO_ROOT / "tests").glob("*.py"))
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr == "importorskip"]
    assert not bare, "use oracles.import_oracle / find_oracle, which LDM_REQUIRE_ORACLES=1 turns into a failure, " \
                     "instead of pytest.importorskip: " + ", ".join(bare)


@pytest.mark.parametrize("helper", [import_oracle, find_oracle])
def test_a_missing_oracle_skips_but_fails_when_oracles_are_required(monkeypatch, helper):
    monkeypatch.delenv(REQUIRE_ORACLES, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_oracle.*pip install"):
        helper("no_such_oracle")
    monkeypatch.setenv(REQUIRE_ORACLES, "1")
    with pytest.raises(pytest.fail.Exception, match=f"no_such_oracle.*{REQUIRE_ORACLES}=1"):
        helper("no_such_oracle")


def test_an_installed_oracle_is_returned():
    assert import_oracle("torch.nn").Module is __import__("torch").nn.Module
    assert find_oracle("torch").submodule_search_locations
