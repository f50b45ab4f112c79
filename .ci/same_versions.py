"""CI: the README's two install commands (train: `pip install ... -e .`, tests: `pip install ... -e ".[test]"`) resolve
the same torch, triton and numpy, and the test install is what this venv holds.

    .venv/bin/python .ci/same_versions.py

It reads both commands from README.md and asks pip what each would install in a fresh venv (a dry run that ignores
what is installed), so a dependency that pulls another torch, triton or numpy into one install fails CI.
"""

import json
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

PACKAGES = ("torch", "triton", "numpy")
ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> dict[str, str]:
    """{"train": the README's install-and-train line, "test": its install-and-test line}."""
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
             if line.startswith("python3 -m venv .venv &&")]
    found = {"train": [line for line in lines if "pcmoe train" in line],
             "test": [line for line in lines if "pytest" in line]}
    assert all(len(v) == 1 for v in found.values()), f"README.md: expected one train and one test command, {found}"
    return {name: v[0] for name, v in found.items()}


def pip_requirements(command: str) -> list[str]:
    """The arguments of every `pip install` in a command line, in order."""
    args = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if len(words) > 2 and words[0].endswith("pip") and words[1] == "install":
            args += words[2:]
    return args


def resolve(requirements: list[str]) -> dict[str, str]:
    """{package: version} that pip would install for ``requirements`` in a fresh venv."""
    report = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", "-", *requirements], cwd=ROOT, check=True, capture_output=True, text=True)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.stdout)["install"]}


def main() -> int:
    resolved = {name: resolve(pip_requirements(command)) for name, command in readme_commands().items()}
    resolved["this venv"] = {name: version(name) for name in PACKAGES}
    table = {name: {p: versions.get(p) for p in PACKAGES} for name, versions in resolved.items()}
    for name, versions in table.items():
        print(f"{name}: " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    if len({tuple(v.values()) for v in table.values()}) != 1:
        print("the README's installs resolve different versions: constrain them in pyproject.toml", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
