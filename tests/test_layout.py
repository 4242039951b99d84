"""The layering of the packages: each imports only the layers below it, and nothing imports tools/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package -> the project packages its modules may import at module level (imports inside a function are
# the documented lazy ones: a tokenizer loads transformers, indexed data loads megatron-core)
ALLOWED = {
    "epas": set(),
    "epas_hf": set(),
    "megatron_patches": {"epas"},
    "megatron_training": {"epas", "megatron_patches"},
    "hf_training": {"epas", "epas_hf"},
    "analysis": {"epas", "epas_hf"},
    "benchmarks": {"epas", "epas_hf", "megatron_patches", "megatron_training"},
}
PROJECT = set(ALLOWED) | {"tools", "tests"}


def _module_level_imports(path: Path) -> set[str]:
    """Top-level package names imported by the module's own body (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _all_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_imports_only_the_layers_below_it(package):
    wrong = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        above = (_module_level_imports(path) & PROJECT) - ALLOWED[package] - {package}
        if above:
            wrong[str(path.relative_to(ROOT))] = sorted(above)
    assert wrong == {}


def test_nothing_imports_tools_or_edits_sys_path():
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", ".venv-oldest", "tools"} & set(p.parts)]
    sources += list((ROOT / "tools").glob("*.py"))
    assert len(sources) > 50
    importers = [str(p.relative_to(ROOT)) for p in sources if "tools" in _all_imports(p)]
    editors = [str(p.relative_to(ROOT)) for p in sources if "sys.path" in p.read_text() and p != Path(__file__)]
    assert importers == [] and editors == []


def test_tools_are_thin_shells():
    for path in (ROOT / "tools").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 12, f"{path.name}: library code belongs in the packages"


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {name.split(".")[0] for name in result.stdout.split()}


def test_the_core_loads_neither_megatron_nor_transformers():
    loaded = _loaded_after("import epas.cli, epas.config, epas.data.demo_corpus, epas.data.indexed, "
                           "epas.data.reproduction_corpus, "
                           "epas.data.preprocess, epas.data.tokenizer, epas.flops, epas.hf_config, epas.scheduler")
    assert "epas" in loaded
    assert not {"megatron", "transformers"} & loaded


def test_the_hugging_face_stacks_load_no_megatron():
    loaded = _loaded_after("import hf_training.finetune, analysis.evaluate, benchmarks.generate")
    assert "transformers" in loaded
    assert "megatron" not in loaded
