"""The versions reslens declares are the versions it is tested on: the floors in pyproject.toml are the
ones .ci/run installs in its second environment, the README says them, and this environment meets them."""

import re
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _floors() -> dict[str, str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies = \[(.*?)\]", text, flags=re.S | re.M).group(1)
    return dict(re.findall(r'"([A-Za-z0-9_-]+)>=([0-9.]+)"', deps))


def test_the_floors_are_what_ci_runs():
    floors = _floors()
    ci = (ROOT / ".ci" / "run").read_text()
    floor_env = ci[ci.index("python3 -m venv .venv-floor"):]
    pinned = dict(re.findall(r'"?(torch|transformers)==([0-9.]+)"?', floor_env.split("\n\n")[0]))
    assert set(pinned) == {"torch", "transformers"}, pinned
    for name, pin in pinned.items():
        assert Version(pin) == Version(floors[name]), (name, pin, floors[name])  # the floor itself is run
    for test in ("tests/test_families.py", "tests/test_hooks.py", "tests/test_lens.py"):
        assert test in floor_env.split("\n\n")[0]


def test_the_readme_states_the_floors():
    floors = _floors()
    readme = (ROOT / "README.md").read_text()
    for name in ("torch", "transformers"):
        assert f"{name} ≥ {floors[name]}" in readme, name


def test_this_environment_meets_the_floors():
    for name, floor in _floors().items():
        assert Version(version(name).split("+")[0]) >= Version(floor), name
