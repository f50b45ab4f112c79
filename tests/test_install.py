"""The README's install commands are what CI runs and checks: .ci/run holds the test command verbatim, and
.ci/same_versions.py (run by .ci/run after the tests) resolves both install commands, read from the README, and
fails when they differ in torch, triton or numpy."""

import importlib.util
from pathlib import Path

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
