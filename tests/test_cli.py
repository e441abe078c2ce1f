"""The taskthrottle command."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import taskthrottle
from taskthrottle.cli import main, parser


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+", line)]


def test_demo_on_memory(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo prints one row a second, and admits and refuses requests."""
    assert main(["demo", "--seconds", "2", "--threads", "3", "--rpm", "60", "--tpm", "6000"]) == 0
    table = rows(capsys.readouterr().out)
    assert [row[0] for row in table] == ["1", "2"]
    assert sum(int(row[1]) for row in table) > 0  # admitted
    assert sum(int(row[3]) for row in table) > 0  # refused


@pytest.mark.parametrize(("rpm", "tpm", "binding"), [("6000", "6000", "tpm"), ("60", "1e9", "rpm")])
def test_demo_names_the_allowed_rate_and_the_binding_limit(
    capsys: pytest.CaptureFixture[str], rpm: str, tpm: str, binding: str
) -> None:
    """The output states each limit's rate and burst, what the limits allow in the run, and
    which limit refused: the only one that can, when the other is out of reach."""
    assert main(["demo", "--seconds", "1", "--threads", "3", "--rpm", rpm, "--tpm", tpm]) == 0
    out = capsys.readouterr().out
    assert f"rpm: {float(rpm):,g} requests a minute ({float(rpm) / 60:,g}/s)" in out
    assert f"tpm: {float(tpm):,g} tokens a minute" in out
    assert "In 1 s the limits allow" in out
    assert f": {binding} bound." in out
    assert {row[-1] for row in rows(out)} == {binding}
    assert "Refused counts attempts, not requests" in out
    assert "seeded" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the installed distribution's version."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"taskthrottle {version('taskthrottle')}\n"
    assert taskthrottle.__version__ == version("taskthrottle")


def test_help_is_plain_text_and_every_option_says_what_it_does() -> None:
    """--help shows no reST markup, and each option of each command has help text."""
    top = parser()
    assert "``" not in top.format_help()
    (commands,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in commands.choices.items():
        assert "``" not in command.format_help(), name
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings}"


def test_demo_needs_no_extra() -> None:
    """`taskthrottle demo` runs on a plain install (no redis-py); --redis then names the
    pip line that brings it."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from taskthrottle.cli import main\n"
        "assert main(['demo', '--seconds', '1', '--threads', '1']) == 0\n"
        "sys.exit(main(['demo', '--seconds', '1', '--redis', 'redis://127.0.0.1:1/0']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "requests and" in done.stdout
    assert "pip install 'taskthrottle[redis]'" in done.stderr


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
    """examples/llm_budget.py runs to the end on memory and on Redis, and says what is left
    of each key's budget."""
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
        left = out.split("left in each key's budget:\n")[1].splitlines()
        assert [line.split()[0] for line in left] == ["tenant:a", "tenant:b", "org:acme"]
        assert re.fullmatch(r"\s+tenant:a\s+rpm [-\d.]+, tpm [-\d.]+", left[0])
