"""What `pip install ovml` puts on a machine: one import package, `ovml`, and dependencies inside their bounds."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def requirements(extras: tuple[str, ...] = ("cpu", "dev", "ray")) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return [Requirement(name) for name in names]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    (built,) = out.glob("ovml-*.whl")
    return zipfile.ZipFile(built)


def test_the_wheel_installs_one_top_level_package_named_ovml(wheel):
    top_level = {name.split("/")[0] for name in wheel.namelist() if not name.startswith("ovml-")}
    assert top_level == {"ovml"}


def test_the_wheel_carries_the_code_the_prompts_and_the_clip_configs(wheel):
    names = set(wheel.namelist())
    assert {"ovml/__init__.py", "ovml/cli.py", "ovml/pipeline/config.py", "ovml/stages/run.py",
            "ovml/prompts/label_templates.txt", "ovml/prompts/caption_prompts.json",
            "ovml/prompts/testbed_grammar.json", "ovml/pipeline/clip_configs/ovml-tiny.json",
            "ovml/pipeline/clip_configs/ovml-testbed.json"} <= names
    assert not any(name.startswith(("ovml/tests/", "ovml/benchmarks/")) for name in names)


def test_the_console_script_points_into_the_package(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))
    assert "ovml = ovml.cli:console" in wheel.read(entry_points).decode()


def test_outside_the_repository_ovml_imports_and_generic_names_do_not(tmp_path):
    code = ("import importlib.util, ovml.pipeline.config, ovml.cli; "
            "print([n for n in ('pipeline', 'stages', 'cli', 'prompts') if importlib.util.find_spec(n)])")
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


@pytest.mark.parametrize("requirement", requirements(), ids=str)
def test_installed_versions_are_inside_the_declared_bounds(requirement):
    installed = metadata.version(requirement.name)
    assert requirement.specifier.contains(installed, prereleases=True), f"{requirement.name} {installed}"
