"""The taskthrottle command."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest

from taskthrottle.cli import main


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+", line)]


def test_demo_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo prints one row a second, and admits and refuses requests."""
    assert main(["demo", "--seconds", "2", "--threads", "3", "--rpm", "60", "--tpm", "6000"]) == 0
    table = rows(capsys.readouterr().out)
    assert [row[0] for row in table] == ["1", "2"]
    assert sum(int(row[1]) for row in table) > 0
    assert sum(int(row[2]) for row in table) > 0


def test_demo_on_redis(capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str) -> None:
    """--redis runs the same demo against a RedisStore."""
    argv = ["demo", "--seconds", "1", "--threads", "2", "--redis", redis_url]
    assert main([*argv, "--namespace", namespace]) == 0
    out = capsys.readouterr().out
    assert redis_url in out
    assert len(rows(out)) == 1


def test_demo_never_shows_the_password(
    capsys: pytest.CaptureFixture[str], redis_url: str, namespace: str
) -> None:
    """The demo's line naming the Redis it runs on masks the URL's password, as does an
    error about the URL."""
    parts = urlsplit(redis_url)
    if parts.password:  # the test server wants one: it must stay hidden too
        url, secret = redis_url, parts.password
    else:  # "default" has no password: Redis accepts any
        url, secret = redis_url.replace("://", "://default:Secret9@", 1), "Secret9"
    argv = ["demo", "--seconds", "1", "--threads", "1", "--redis", url, "--namespace", namespace]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert len(rows(out)) == 1
    assert ":***@" in out
    assert secret not in out + err
    assert main([*argv[:-3], url.replace("://", "://[", 1)]) == 2
    out, err = capsys.readouterr()
    assert "bad Redis URL" in err
    assert secret not in out + err


def test_bad_namespace_is_reported(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    """A library error becomes a message and exit code 2, not a traceback."""
    assert main(["demo", "--seconds", "1", "--redis", redis_url, "--namespace", "{x}"]) == 2
    assert "namespace" in capsys.readouterr().err


def test_unknown_command() -> None:
    """argparse refuses what it does not know."""
    with pytest.raises(SystemExit) as info:
        main(["nonsense"])
    assert info.value.code == 2


def test_example_runs(redis_url: str) -> None:
    """examples/llm_budget.py runs to the end on memory and on Redis."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / "llm_budget.py"
    for extra in ([], [redis_url]):
        out = subprocess.run(
            [sys.executable, str(script), *extra],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        assert out.count("tokens, waited") == 8
        assert "left:" in out
