"""The README's Python examples run as written (all ```python blocks, in order,
in one namespace; the transformers block needs transformers installed)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 5
    if any("import transformers" in b for b in blocks):
        pytest.importorskip("transformers")
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
