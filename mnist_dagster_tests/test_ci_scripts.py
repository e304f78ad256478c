"""The CI glue: README command blocks come out exactly, or CI fails loudly; required tests must have passed."""

import importlib.util
import subprocess
import sys

import pytest

from mnist_dagster_tests.support import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_commands = load("readme_commands")
require_passed = load("require_passed")

README = """# x
<!-- ci:install -->

```bash
python3 -m venv .venv && . .venv/bin/activate
pip install -e ".[dev]"
```

<!-- ci:test -->
```bash
pytest
```
"""


def test_blocks_come_out_exactly():
    assert readme_commands.command_block(README, "install") == (
        'python3 -m venv .venv && . .venv/bin/activate\npip install -e ".[dev]"\n'
    )
    assert readme_commands.command_block(README, "test") == "pytest\n"


@pytest.mark.parametrize(
    ("readme", "complaint"),
    [
        (README.replace("ci:test", "ci:tests"), "found 0"),
        (README + "\n<!-- ci:test -->\n```bash\nls\n```\n", "found 2"),
        (README.replace("<!-- ci:test -->\n```bash", "<!-- ci:test -->\nRun:\n```bash"), "must be followed"),
        ("<!-- ci:test -->\n```bash\npytest\n", "never closed"),
        ("<!-- ci:test -->\n```bash\n# nothing here\n```\n", "no commands"),
    ],
)
def test_a_broken_readme_is_an_error(readme, complaint):
    with pytest.raises(readme_commands.ReadmeError, match=complaint):
        readme_commands.command_block(readme, "test")


def test_the_cli_exits_2_and_says_why(tmp_path):
    (tmp_path / "README.md").write_text(README.replace("ci:install", "ci:setup"))
    result = subprocess.run(
        [sys.executable, SCRIPTS / "readme_commands.py", "install", tmp_path / "README.md"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert "<!-- ci:install -->" in result.stderr


def test_the_repository_readme_has_both_blocks():
    readme = (REPO_ROOT / "README.md").read_text()
    assert "pip install" in readme_commands.command_block(readme, "install")
    assert "pytest" in readme_commands.command_block(readme, "test")


JUNIT = """<testsuites><testsuite>
<testcase classname="mnist_dagster_tests.test_ui_e2e" name="test_a"/>
<testcase classname="mnist_dagster_tests.test_ui_e2e" name="test_b"><skipped message="no Chromium"/></testcase>
<testcase classname="mnist_dagster_tests.test_other" name="test_c"><failure message="boom"/></testcase>
</testsuite></testsuites>"""


def test_require_passed_reads_each_outcome(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(JUNIT)
    assert require_passed.outcomes(junit, "mnist_dagster_tests/test_ui_e2e.py") == {
        "test_a": "passed",
        "test_b": "skipped: no Chromium",
    }
    assert require_passed.main(["x", str(junit), "mnist_dagster_tests/test_ui_e2e.py"]) == 1  # a skip fails
    assert require_passed.main(["x", str(junit), "mnist_dagster_tests/test_missing.py"]) == 1  # nothing ran
    junit.write_text(JUNIT.replace('<skipped message="no Chromium"/>', ""))
    assert require_passed.main(["x", str(junit), "mnist_dagster_tests/test_ui_e2e.py"]) == 0
