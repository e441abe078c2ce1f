"""Shared by the benchmark scripts: the machine description and docs/benchmarks.md sections."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import redis

INTRO = """# Benchmarks

Each section below is written by its script (`python -m bench.<script>`, `pip install
'taskthrottle[bench]'` for the peers), which runs every case against the same server in one
run. Figures are from the project's 2-core virtual machine, whose neighbours make medians
drift by a third from one run to the next; rerun the scripts to get yours.
"""


class Row(NamedTuple):
    """One line of a results table."""

    case: str
    median: str
    p99: str
    ratio: str


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine(client: redis.Redis) -> list[str]:
    """Markdown lines naming the date, machine and versions a run used."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    server: Any = client.info("server")
    return [
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- machine: {cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
        f"- Python {sys.version.split()[0]}, redis-py {_version('redis')}, "
        f"hiredis {_version('hiredis')}, taskthrottle {_version('taskthrottle')}",
        f"- redis-server {server['redis_version']} on loopback TCP",
    ]


def write_section(path: str, title: str, body: list[str]) -> None:
    """Replace (or append) the section ``title`` of the markdown file at ``path``;
    ``-`` prints it instead."""
    text = "\n".join(
        [
            f"<!-- begin: {title} -->",
            f"## {title.capitalize()}",
            "",
            *body,
            f"<!-- end: {title} -->",
        ]
    )
    if path == "-":
        print(text)
        return
    target = Path(path)
    current = target.read_text() if target.exists() else INTRO
    pattern = re.compile(
        rf"<!-- begin: {re.escape(title)} -->.*?<!-- end: {re.escape(title)} -->", re.S
    )
    if pattern.search(current):
        updated = pattern.sub(lambda _: text, current)
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    target.write_text(updated.rstrip("\n") + "\n")
    print(text)
