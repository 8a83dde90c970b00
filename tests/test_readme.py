"""The README's Python examples run as written (executed in order in one namespace)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python examples"
    namespace: dict = {}
    for block in blocks:
        if "# not-run" in block:
            continue
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    assert "report" in namespace
