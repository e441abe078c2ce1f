"""Read what a rate-limited callee says in its response headers, for `Limiter.pushback`.

    hint = read_headers(response.headers)
    if response.status_code == 429:
        limiter.pushback("openai", hint.retry_after,
                         remaining={"rpm": hint.remaining["requests"]}, limits=[rpm])

Understood: ``Retry-After`` (seconds or an HTTP date), ``retry-after-ms``, and the
``x-ratelimit-remaining-<name>`` / ``x-ratelimit-reset-<name>`` pairs of LLM APIs, whose
resets are durations such as ``1s``, ``6m0s``, ``20ms`` or plain seconds.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Hint(NamedTuple):
    """What the headers said: seconds to hold off (None: they did not say), and per
    resource ("requests", "tokens", ...) what is left and seconds until it resets."""

    retry_after: float | None
    remaining: dict[str, float]
    reset: dict[str, float]


def duration(text: str) -> float | None:
    """Seconds in ``text``: ``"1.5"``, ``"20ms"``, ``"6m0s"``, ``"1h2m3s"``; None if none."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            return None
        value = sum(float(n) * _UNIT[u] for n, u in parts)
    return value if math.isfinite(value) and value >= 0 else None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    ms = headers.get("retry-after-ms")
    if ms is not None:
        seconds = duration(ms)
        if seconds is not None:
            return seconds / 1000
    text = headers.get("retry-after")
    if text is None:
        return None
    seconds = duration(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def read_headers(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Hint:
    """The `Hint` in a response's headers (any mapping, case-insensitive, or pairs).

    ``retry_after`` is the Retry-After, else the latest reset among the resources that
    have nothing left, else None."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    lowered = {str(k).lower(): str(v) for k, v in items}
    remaining: dict[str, float] = {}
    reset: dict[str, float] = {}
    for name, value in lowered.items():
        for prefix, found in (("x-ratelimit-remaining-", remaining), ("x-ratelimit-reset-", reset)):
            if name.startswith(prefix) and len(name) > len(prefix):
                number = duration(value)
                if number is not None:
                    found[name[len(prefix) :]] = number
    retry_after = _retry_after(lowered)
    if retry_after is None:
        spent = [reset[n] for n, left in remaining.items() if left <= 0 and n in reset]
        retry_after = max(spent) if spent else None
    return Hint(retry_after, remaining, reset)
