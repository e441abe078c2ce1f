"""The public surface: complete, sorted, and free of optional imports."""

from __future__ import annotations

import subprocess
import sys

import taskthrottle

#: Public, but not in __all__: they need the redis extra, and a star import must not.
REDIS_STORES = ("AsyncRedisStore", "RedisStore")


def test_all_is_sorted_and_complete() -> None:
    """__all__ lists every public name once, in order, and each one resolves; so do the
    Redis stores, which it leaves out."""
    assert taskthrottle.__all__ == sorted(set(taskthrottle.__all__))
    for name in [*taskthrottle.__all__, *REDIS_STORES]:
        assert getattr(taskthrottle, name) is not None
    assert not set(REDIS_STORES) & set(taskthrottle.__all__)


def test_star_import_needs_no_extra() -> None:
    """`from taskthrottle import *` works without redis-py, and imports no optional
    dependency; the Redis stores stay importable by name."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "from taskthrottle import *\n"
        "assert Limiter and MemoryStore and throttled\n"
        "print(sorted(m for m in ('celery', 'dramatiq', 'prometheus_client', 'hiredis')"
        " if sys.modules.get(m)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    from taskthrottle import AsyncRedisStore, RedisStore

    assert RedisStore.__name__ == "RedisStore"
    assert AsyncRedisStore.__name__ == "AsyncRedisStore"


def test_importing_the_core_loads_no_optional_dependency() -> None:
    """`import taskthrottle` brings in the standard library only."""
    code = (
        "import sys, taskthrottle, taskthrottle.testing;"
        "print(sorted(m for m in ('redis', 'celery', 'dramatiq', 'prometheus_client', 'hiredis')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_extra_names_the_pip_line() -> None:
    """Without redis-py, RedisStore fails with the install line that fixes it."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import taskthrottle\n"
        "try:\n    taskthrottle.RedisStore\n"
        "except taskthrottle.MissingDependency as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'taskthrottle[redis]'" in out.stdout


def test_unknown_attribute() -> None:
    """A typo is an AttributeError, not a silent None."""
    try:
        taskthrottle.RedisStor  # noqa: B018
    except AttributeError as exc:
        assert "RedisStor" in str(exc)
    else:
        raise AssertionError("expected AttributeError")
