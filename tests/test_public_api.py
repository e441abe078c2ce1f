"""The public surface: complete, sorted, and free of optional imports."""

from __future__ import annotations

import collections.abc
import inspect
import subprocess
import sys
import types
import typing

import taskthrottle
import taskthrottle.metrics
import taskthrottle.testing
from taskthrottle import _exceptions

#: Public, but not in __all__: they need the redis extra, and a star import must not.
REDIS_STORES = ("AsyncRedisStore", "RedisStore")
#: What a store hands the task-queue integrations (where they park tasks, what a waiting
#: room admitted), never a user.
HANDED_TO_INTEGRATIONS = {"Deferrals", "Admission"}


def test_all_is_sorted_and_complete() -> None:
    """__all__ lists every public name once, in order, and each one resolves; so do the
    Redis stores, which it leaves out."""
    assert taskthrottle.__all__ == sorted(set(taskthrottle.__all__))
    for name in [*taskthrottle.__all__, *REDIS_STORES]:
        assert getattr(taskthrottle, name) is not None
    assert not set(REDIS_STORES) & set(taskthrottle.__all__)


def test_every_public_name_is_exported() -> None:
    """What the package namespace offers is __all__ (and the Redis stores); every
    exception is exported; and every taskthrottle class a public method takes or returns
    is exported too, so that no exported name hands out one the user cannot import."""
    offered = {
        name
        for name, value in vars(taskthrottle).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    } - {"TYPE_CHECKING", "Any", "annotations"}
    assert offered == set(taskthrottle.__all__)
    errors = {n for n, v in vars(_exceptions).items() if isinstance(v, type)}
    errors = {n for n in errors if issubclass(getattr(_exceptions, n), Exception)}
    assert errors <= set(taskthrottle.__all__)
    exported = {getattr(taskthrottle, n) for n in [*taskthrottle.__all__, *REDIS_STORES]}
    handed_out = set()
    for owner in exported:
        for name, member in vars(owner).items() if isinstance(owner, type) else ():
            if name.startswith("_") or not callable(member):
                continue
            home = sys.modules[getattr(member, "__module__", None) or owner.__module__]
            names = {**vars(collections.abc), **vars(typing), **vars(types)}
            names |= {k: v for m in _package_modules() for k, v in vars(m).items()}
            names |= vars(home)
            hints = typing.get_type_hints(member, names)
            for hint in hints.values():
                for found in _classes_in(hint):
                    if found.__module__.startswith("taskthrottle"):
                        handed_out.add(found)
    public_modules = (taskthrottle.metrics, taskthrottle.testing)
    exported |= {v for m in public_modules for v in vars(m).values() if isinstance(v, type)}
    assert {c.__name__ for c in handed_out - exported} == HANDED_TO_INTEGRATIONS


def _package_modules() -> list[types.ModuleType]:
    """Every loaded taskthrottle module: names a module imports for typing only live in
    another."""
    import taskthrottle._reports  # noqa: F401  (what _limiter names under TYPE_CHECKING)

    return [m for n, m in sys.modules.items() if n.startswith("taskthrottle") and m]


def _classes_in(hint: object) -> list[type]:
    """The classes a type hint names, through unions and generics."""
    if isinstance(hint, type):
        return [hint]
    return [c for arg in typing.get_args(hint) for c in _classes_in(arg)]


def test_public_names_say_their_public_home() -> None:
    """Every exported name defined in a private module reports ``taskthrottle`` as its
    module (tracebacks, reprs, pickles)."""
    for name in taskthrottle.__all__:
        module = getattr(getattr(taskthrottle, name), "__module__", "taskthrottle")
        assert not module.startswith("taskthrottle._"), name


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
