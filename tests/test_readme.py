"""Every Python block of the README runs, top to bottom, in one fresh namespace (as a reader would paste
them), and the two set-up commands are the ones .ci/run uses."""

import os
import re
from pathlib import Path

import matplotlib
import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_exactly_two_setup_commands_and_ci_runs_the_test_one():
    commands = _blocks("bash")
    assert len(commands) == 2, commands
    main, tests = (c.strip() for c in commands)
    assert (
        "reslens lens" in main and "--model smollm2" in main and main.startswith("pip install torch==2.13.0")
    )
    assert tests.endswith("python -m pytest -q") and tests.startswith("pip install torch==2.13.0")
    ci = (README.parent / ".ci" / "run").read_text()
    assert tests in ci


def test_every_python_block_runs_in_order(tmp_path, monkeypatch):
    from reslens import hub

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    blocks = _blocks("python")
    assert len(blocks) >= 8
    for number, code in enumerate(blocks, 1):
        if 'load_model("smollm2")' in code and not hub.is_cached("smollm2"):
            if os.environ.get("RESLENS_REQUIRE_REAL_MODEL") == "1":
                pytest.fail("the README's SmolLM2 block needs the model: reslens download smollm2")
            continue  # the real-model block; the blocks after it reload what they use
        try:
            exec(compile(code, f"README.md python block {number}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the block number
            raise AssertionError(f"README python block {number} failed: {error!r}\n{code}") from error
    assert (tmp_path / "run.safetensors").is_file()
