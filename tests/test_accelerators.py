"""The optional C accelerators listed in setup.py are built where their sources are.

Each accelerator is optional at install time (a machine without a C compiler gets the pure-Python
twin), so a broken build would otherwise pass unnoticed, only slower. In CI
(``RULES_TEST_REQUIRE_SERVICES=1``) every extension whose source file is in the tree must import;
elsewhere a missing one is a skip that says how to build it.
"""

from __future__ import annotations

import ast
import importlib
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _extensions() -> list[tuple[str, list[str]]]:
    """(module name, source files) of each ``Extension(...)`` call in setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Extension":
            name = ast.literal_eval(node.args[0])
            sources = ast.literal_eval(node.args[1])
            found.append((name, sources))
    return found


def test_setup_lists_extensions() -> None:
    assert _extensions(), "setup.py lists no Extension: this test would check nothing"


@pytest.mark.parametrize("name,sources", _extensions(), ids=[name for name, _ in _extensions()])
def test_extension_is_built(name: str, sources: list[str]) -> None:
    if not all((ROOT / source).exists() for source in sources):
        pytest.skip(f"{name}: source not in the tree")
    try:
        importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("RULES_TEST_REQUIRE_SERVICES"):
            pytest.fail(f"{name} is not built ({exc}); `pip install -e .` compiles it (needs gcc and Python headers)")
        pytest.skip(f"{name} not built: run `pip install -e .` to compile it")


def test_the_docker_image_checks_every_accelerator() -> None:
    """The image's build imports each accelerator, so an image without one fails to build instead of
    silently running the Python twins (the slim runtime stage has no C compiler)."""
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    missing = [name for name, _ in _extensions() if name not in dockerfile]
    assert not missing, f"docker/Dockerfile does not import {missing}"
