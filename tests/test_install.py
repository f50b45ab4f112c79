"""The README's install commands are what CI runs and checks: .ci/run holds the test command verbatim, and
.ci/same_versions.py (run by .ci/run after the tests) resolves both install commands, read from the README, and
fails when they differ in torch, triton or numpy."""

import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _same_versions():
    spec = importlib.util.spec_from_file_location("same_versions", ROOT / ".ci" / "same_versions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_the_readmes_test_command_and_checks_the_versions():
    commands = _same_versions().readme_commands()
    run = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands["test"] in run and ".venv/bin/python .ci/same_versions.py" in run
    assert "PIP_CONSTRAINT" not in "\n".join(run)  # CI installs exactly what the README says


def test_both_installs_take_the_same_torch_first_then_the_package():
    versions = _same_versions()
    commands = versions.readme_commands()
    train, test = (versions.pip_requirements(commands[name]) for name in ("train", "test"))
    assert train[0] == test[0] and train[0].startswith("torch==")  # PyTorch's CPU build, before the package
    assert train[1:] == ["-e", "."] and test[1:] == ["-e", ".[test]"]
    assert commands["train"].endswith("&& .venv/bin/pcmoe train")


def test_the_package_carries_its_presets_and_corpus(tmp_path):
    """`--preset` and the default run work outside the repository: the wheel holds configs/*.toml and the corpus."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "pcmoe_engine", "csrc_triton"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir",
                    str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("pcmoe-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {f"pcmoe_engine/configs/{p.name}" for p in (ROOT / "pcmoe_engine" / "configs").glob("*.toml")}
    assert {"pcmoe_engine/configs/tiny.toml", "pcmoe_engine/configs/small.toml"} <= packaged <= names
    assert "pcmoe_engine/data/tinyshakespeare.txt.gz" in names
