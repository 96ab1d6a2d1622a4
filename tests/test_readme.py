"""Every Python block of the README runs as written (in a fresh process, in a scratch folder).

The Avalanche example trains for one epoch instead of four: the only substitution made, listed
in ``SHORTER``; everything else is the README's text.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)

#: (README text, replacement) applied to keep the test short.
SHORTER = [("train_epochs=4", "train_epochs=1")]


def _first_line(block: str) -> str:
    code = [line for line in block.splitlines() if line and not line.startswith(("import", "from"))]
    return code[0][:40] if code else block[:40]


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("block", BLOCKS, ids=_first_line)
def test_readme_block_runs_as_written(block: str, tmp_path: pathlib.Path) -> None:
    for text, shorter in SHORTER:
        block = block.replace(text, shorter)
    script = tmp_path / "block.py"
    script.write_text(block)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
