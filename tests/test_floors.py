"""tools/floors.py: pyproject.toml's floors, pinned, for `make test-floors`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("floors", ROOT / "tools" / "floors.py")
assert _spec and _spec.loader
floors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(floors)


def test_every_direct_dependency_is_pinned_at_its_floor() -> None:
    pins = floors.floors(ROOT / "pyproject.toml", ["dev"], ["torch"])
    names = [p.split("==")[0] for p in pins]
    assert "torch" not in names and "optuna" in names and "pytest" in names
    assert "optuna==5.0" in pins  # Trial.set_constraint is new in Optuna 5
    assert names.count("psycopg2-binary") == 1  # in two extras, pinned once
    # typer-slim ships the `typer` package too: held at typer's floor so the module is the floor's
    assert pins[names.index("typer-slim")].split("==")[1] == pins[names.index("typer")].split("==")[1]


@pytest.mark.parametrize(("req", "pin"), [("optuna>=5.0,<6", "optuna==5.0"),
                                          ("huggingface_hub>=1.32,<3", "huggingface_hub==1.32"),
                                          ("transformer-engine[pytorch]>=2.4", "transformer-engine[pytorch]==2.4")])
def test_a_requirement_becomes_its_floor(req: str, pin: str) -> None:
    name, extras, floor = floors.parse(req)
    assert f"{name}{extras}=={floor}" == pin


@pytest.mark.parametrize("req", ["rich", "rich<14", "rich>=13,>=14", "rich>=13; python_version<'3.12'"])
def test_a_dependency_without_exactly_one_floor_is_an_error(req: str) -> None:
    with pytest.raises(ValueError):
        floors.parse(req)


def test_unknown_extras_and_skips_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no extra"):
        floors.floors(ROOT / "pyproject.toml", ["nosuch"], [])
    with pytest.raises(ValueError, match="names no dependency"):
        floors.floors(ROOT / "pyproject.toml", [], ["nosuch"])
    twice = tmp_path / "pyproject.toml"
    twice.write_text('[project]\ndependencies = ["a>=1"]\n[project.optional-dependencies]\nx = ["a>=2"]\n')
    with pytest.raises(ValueError, match="twice"):
        floors.floors(twice, ["x"], [])
