"""The package's layers, and no import against their direction.

model (limits, requests as entries, algorithms, exceptions) <- stores (protocol, memory,
redis and its Lua, deferrals) <- limiter (limiter, leases, throttle, breakers) <-
integrations (celery, dramatiq and the gate they share) <- face (cli, metrics, testing).
A module may import its own layer and those below it, never above.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "taskthrottle"

LAYERS = {
    "model": {"_exceptions", "_limits", "_algorithms", "_entries", "_room", "headers"},
    "stores": {
        "_store",
        "_circuit",
        "_deferrals",
        "_memory",
        "_memory_keys",
        "_memory_room",
        "_redis",
    },
    "limiter": {"_reports", "_renewal", "_outage", "_lease", "_limiter", "_throttle", "_breaker"},
    "integrations": {"_settings", "_gate", "celery", "celery._gate", "celery._release", "dramatiq"},
    "face": {"", "__main__", "cli", "metrics", "testing", "tenacity"},
}
ORDER = list(LAYERS)
LAYER_OF = {module: ORDER.index(layer) for layer, modules in LAYERS.items() for module in modules}


def module_name(path: Path) -> str:
    """``taskthrottle/celery/_gate.py`` -> ``celery._gate``; the package itself is ``""``."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every taskthrottle module ``path`` imports, at run time or for typing alone."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "taskthrottle":  # a module (_algorithms), or a name of the package
                found |= {a.name if a.name in LAYER_OF else "" for a in node.names}
            elif node.module.startswith("taskthrottle."):
                found.add(node.module.removeprefix("taskthrottle."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("taskthrottle."):
                    found.add(alias.name.removeprefix("taskthrottle."))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in a layer before it may import anything."""
    assert {module_name(p) for p in MODULES} - set(LAYER_OF) == set()


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_import_goes_up(path: Path) -> None:
    """A module imports only its own layer and those below."""
    name = module_name(path)
    upward = {
        other: ORDER[LAYER_OF[other]]
        for other in imports_of(path)
        if other != name and LAYER_OF.get(other, 0) > LAYER_OF[name]
    }
    assert upward == {}, f"{name} ({ORDER[LAYER_OF[name]]}) imports from above: {upward}"
