"""The README's command examples run as written."""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_examples() -> list[str]:
    """Command lines of every ```bash block that follows a `<!-- readme-example -->` marker."""
    text = README.read_text()
    blocks = re.findall(r"<!-- readme-example -->\s*```bash\n(.*?)```", text, flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_examples_and_the_two_setup_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert readme_examples()


@pytest.mark.timeout(600)
def test_readme_examples_run(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for line in readme_examples():
        argv = shlex.split(line)
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"`{line}` failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
