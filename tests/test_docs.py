"""The code blocks of the README and docs run as written (the ``>>>`` ones run as doctests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(code, id=f"{page.name}:{n}")
    for page in PAGES
    for n, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_code_block_runs(code: str, request: pytest.FixtureRequest) -> None:
    """Each python block executes without error (its asserts included); blocks that talk
    to Redis run against the test server, in a namespace of their own."""
    if "redis://" in code:
        url = request.getfixturevalue("redis_url")
        namespace = request.getfixturevalue("namespace")
        code = code.replace("redis://127.0.0.1:6379/0", url).replace('"myapp"', repr(namespace))
    exec(compile(code, "<docs>", "exec"), {})


def test_the_readme_has_an_example() -> None:
    """The README shows a runnable example."""
    assert any("README.md" in str(block.id) for block in BLOCKS)
