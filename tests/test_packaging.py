"""The wheel must ship every subpackage (a missing one breaks ``import graphlora`` outside the repo)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graphlora").rglob("__init__.py")}
    found |= {"graphlora.passes." + ".".join(p.parent.relative_to(ROOT / "passes").parts)
              for p in (ROOT / "passes").rglob("__init__.py") if p.parent != ROOT / "passes"}
    found.add("graphlora.passes")
    assert found == listed
    assert config["package-dir"]["graphlora.passes"] == "passes"
