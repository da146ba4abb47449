"""Specification of the import graph and the public namespace.

``core/`` is pure Python: it decides, and never imports a broker or a store client, so a
user of ``MemoryStore`` needs none of them installed.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import limitpal_tasks

FORBIDDEN = ("redis", "celery", "kombu", "dramatiq")
PACKAGE_DIR = Path(limitpal_tasks.__file__).resolve().parent
CORE_DIR = PACKAGE_DIR / "core"
SRC_DIR = PACKAGE_DIR.parent

LOADED_AFTER_IMPORTING_CORE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import limitpal_tasks.core as core
    walked = []
    for info in pkgutil.walk_packages(core.__path__, prefix="limitpal_tasks.core."):
        importlib.import_module(info.name)
        walked.append(info.name)
    print(json.dumps({"walked": walked, "loaded": sorted(sys.modules)}))
    """
)


def _run(script: str) -> dict[str, list[str]]:
    """Run ``script`` in a fresh interpreter and return the JSON it prints."""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=SRC_DIR,
    )
    assert completed.returncode == 0, completed.stderr
    result: dict[str, list[str]] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def _is_forbidden(module: str) -> bool:
    """Whether ``module`` belongs to a broker or store client that core must not load."""
    return module.partition(".")[0] in FORBIDDEN


@pytest.fixture(scope="module")
def core_import() -> dict[str, list[str]]:
    """What a fresh interpreter walked and loaded when importing every core module."""
    return _run(LOADED_AFTER_IMPORTING_CORE)


def test_walking_core_finds_its_modules(core_import: dict[str, list[str]]) -> None:
    """The import check walks every core module (so it cannot pass by importing nothing)."""
    expected = {
        f"limitpal_tasks.core.{path.stem}" for path in CORE_DIR.glob("*.py") if path.stem != "__init__"
    }
    assert expected <= set(core_import["walked"])


def test_importing_every_core_module_loads_no_broker_or_redis_client(
    core_import: dict[str, list[str]],
) -> None:
    """After importing every module of ``limitpal_tasks.core``, no redis/celery/kombu/dramatiq is loaded."""
    assert [name for name in core_import["loaded"] if _is_forbidden(name)] == []


def test_importing_the_package_loads_no_broker_or_redis_client() -> None:
    """``import limitpal_tasks`` alone loads none of redis/celery/kombu/dramatiq."""
    loaded = _run('import json, sys, limitpal_tasks; print(json.dumps({"loaded": sorted(sys.modules)}))')
    assert [name for name in loaded["loaded"] if _is_forbidden(name)] == []


def _forbidden_imports(path: Path) -> list[str]:
    """Every import of a forbidden top-level module in ``path``, including ``import_module("...")`` calls."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names = [node.args[0].value]
        line = getattr(node, "lineno", 0)
        found += [f"{path.name}:{line}: {name}" for name in names if _is_forbidden(name)]
    return found


def test_core_sources_exist() -> None:
    """The static check has core sources to read."""
    assert len(list(CORE_DIR.rglob("*.py"))) >= 5


@pytest.mark.parametrize("path", sorted(CORE_DIR.rglob("*.py")), ids=lambda path: path.name)
def test_core_source_imports_no_broker_or_redis_client(path: Path) -> None:
    """No file under ``core/`` imports redis, celery, kombu or dramatiq, even lazily."""
    assert _forbidden_imports(path) == []


def test_static_check_detects_a_forbidden_import(tmp_path: Path) -> None:
    """The static check flags ``import redis``, ``from celery import ...`` and ``import_module("kombu")``."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os\nimport redis.asyncio\nfrom celery import Task\n"
        "def f():\n    import importlib\n    return importlib.import_module('kombu')\n",
        encoding="utf-8",
    )
    assert [entry.split(": ")[1] for entry in _forbidden_imports(sample)] == [
        "redis.asyncio",
        "celery",
        "kombu",
    ]


# -- the public namespace ------------------------------------------------------------------


def test_all_is_sorted() -> None:
    """``limitpal_tasks.__all__`` is in alphabetical order."""
    assert list(limitpal_tasks.__all__) == sorted(limitpal_tasks.__all__)


def test_all_has_no_duplicates() -> None:
    """Each public name appears once in ``__all__``."""
    assert len(set(limitpal_tasks.__all__)) == len(limitpal_tasks.__all__)


@pytest.mark.parametrize("name", limitpal_tasks.__all__)
def test_every_public_name_resolves(name: str) -> None:
    """Every name in ``__all__`` is an attribute of the package."""
    assert getattr(limitpal_tasks, name, None) is not None


def test_version_is_a_string() -> None:
    """``__version__`` is a non-empty string."""
    assert isinstance(limitpal_tasks.__version__, str)
    assert limitpal_tasks.__version__
