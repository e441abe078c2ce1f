"""`RedisStore` and `AsyncRedisStore`: limiter state shared by every worker.

Every operation is one EVALSHA of a script in ``lua/``; the time comes from Redis
``TIME`` inside the script, so workers with skewed clocks agree.

Key schema, for namespace ``ns`` and key ``k``::

    {ns}:b:k      HASH    buckets and quotas of k (expires a minute after all are full)
    {ns}:c:k      ZSET    concurrency slots of k  (expires with the last slot)
    {ns}:op:id    STRING  a lease or settle done lately, so that a call the client sent
                          again charges once (expires after a minute)

Every key carries the hash tag ``{ns}``, so a lease over several keys is one
script call on Redis Cluster too. The price: a namespace lives in one slot, on
one shard. Shard by namespace (one per organisation, say) when that shard is hot.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar

from taskthrottle._exceptions import InvalidInput, StoreError, require

require("redis", "redis")

import redis  # noqa: E402  (after the check that names the missing extra)
import redis.asyncio  # noqa: E402
from redis.backoff import ExponentialBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from taskthrottle._memory import OP_MEMORY_MS  # noqa: E402
from taskthrottle._plan import MAX_SHAPES, Shape  # noqa: E402
from taskthrottle._store import BUCKET, CONCURRENCY, Entry, Outcome  # noqa: E402


class Script:
    """A Lua script from ``lua/``, after the constant it shares with Python and the parts
    it builds on; loaded once per server."""

    _constants = f"local OP_MEMORY_MS = {OP_MEMORY_MS}\n"

    def __init__(self, name: str, *parts: str) -> None:
        lua = resources.files("taskthrottle").joinpath("lua")
        self.name = name
        self.source = self._constants + "\n".join(
            lua.joinpath(part).read_text() for part in (*parts, name)
        )
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


ACQUIRE = Script("acquire.lua", "prelude.lua", "entries.lua")
BUCKETS = Script("buckets.lua", "prelude.lua")  # the common request: see the script
SETTLE = Script("settle.lua", "prelude.lua", "entries.lua")
PEEK = Script("peek.lua", "prelude.lua", "entries.lua")


def check_namespace(namespace: object) -> str:
    """Return ``namespace`` if it can serve as a hash tag (no braces, not empty)."""
    if not isinstance(namespace, str) or not namespace or set("{}") & set(namespace):
        msg = f"a namespace must be non-empty text without braces, got {namespace!r}"
        raise InvalidInput(msg)
    return namespace


class _Codec:
    """Builds the KEYS and ARGV of each script call; shared by the sync and async stores."""

    def __init__(self, namespace: str, clock: Callable[[], float] | None) -> None:
        self.tag = "{" + check_namespace(namespace) + "}"
        self.op_prefix = f"{self.tag}:op:"
        self.clock = clock
        self.encoded: dict[int, tuple[Sequence[Entry], Encoding]] = {}

    def now(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1000))

    def encoding(self, entries: Sequence[Entry]) -> Encoding:
        if type(entries) is not Shape:
            return self.encode(entries)
        # Requests of a cached shape pass the very same list: encode it once.
        hit = self.encoded.get(id(entries))
        if hit is not None and hit[0] is entries:
            return hit[1]
        if len(self.encoded) >= MAX_SHAPES:
            self.encoded.clear()
        found = self.encode(entries)
        self.encoded[id(entries)] = (entries, found)
        return found

    def encode(self, entries: Sequence[Entry]) -> Encoding:
        """The hashes and zsets the entries use, and one ARGV per entry,
        ``i:kind:cap:refill:period:amount:name``, its state being in KEYS[i] (see
        lua/prelude.lua); and the acquire script that suits them."""
        keys: list[str] = []
        index: dict[str, int] = {}
        argv = []
        for e in entries:
            hash_key, zset_key = self.key_names(e.key)
            name = zset_key if e.kind == CONCURRENCY else hash_key
            i = index.get(name)
            if i is None:
                keys.append(name)
                i = index[name] = len(keys) + 1  # Lua counts from 1, after the op's key
            argv.append(f"{i}:{e.kind}:{e.cap}:{e.refill}:{e.period}:{e.amount}:{e.name}")
        buckets = len(keys) == 1 and all(e.kind == BUCKET for e in entries)
        return keys, argv, BUCKETS if buckets else ACQUIRE

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> tuple[Script, list[str], list[Any]]:
        keys, argv, script = self.encoding(entries)
        return (
            script,
            [self.op_prefix + lease_id, *keys],
            [self.now(), max_wait_ms, ttl_ms, lease_id, *argv],
        )

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> tuple[list[str], list[Any]]:
        keys, argv, _ = self.encoding([*deltas, *release])
        return [self.op_prefix + op_id, *keys], [self.now(), lease_id, len(deltas), *argv]

    def peek(self, entries: Sequence[Entry]) -> tuple[list[str], list[Any]]:
        keys, argv, _ = self.encoding(entries)
        return [self.op_prefix, *keys], [self.now(), *argv]

    def key_names(self, key: str) -> tuple[str, str]:
        return f"{self.tag}:b:{key}", f"{self.tag}:c:{key}"


#: What a request is sent as: KEYS but the op's, ARGV but the first few, and the acquire
#: script that suits it.
Encoding = tuple[list[str], list[str], Script]


def outcome(reply: Any) -> Outcome:
    """An acquire reply as an `Outcome`."""
    if type(reply) is int:  # granted with no delay, the common case: the store's clock
        return _new(Outcome, (True, 0, reply, ()))
    try:
        granted, delay, now, *rest = (int(x) for x in reply)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"unexpected reply from acquire.lua: {reply!r}") from exc
    pairs = tuple((rest[i] - 1, rest[i + 1]) for i in range(0, len(rest), 2))
    return Outcome(granted == 1, delay, now, pairs)


_new = tuple.__new__


def client_options(socket_timeout: float, connect_timeout: float, retries: int) -> dict[str, Any]:
    """Connection options: short timeouts and a few quick retries, safe because every
    script is idempotent by its id."""
    for name, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidInput(
                f"{name} must be a finite number of seconds above zero, got {value!r}"
            )
    if not isinstance(retries, int) or retries < 0:
        raise InvalidInput(f"retries must be a whole number of at least 0, got {retries!r}")
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(ExponentialBackoff(cap=0.2, base=0.01), retries),
        "health_check_interval": 30,
    }


C = TypeVar("C")


def connect(factory: Callable[..., C], url: str, options: dict[str, Any]) -> C:
    """A pooled client for ``url`` from ``factory``; a malformed URL is `InvalidInput`."""
    try:
        return factory(url, **options)
    except ValueError as exc:
        raise InvalidInput(f"bad Redis URL {url!r}: {exc}") from exc


class RedisStore:
    """Limiter state in Redis, shared by every process that uses the same namespace.

    ``clock`` overrides Redis ``TIME`` and exists for tests only.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "taskthrottle",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        self._codec = _Codec(namespace, clock)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "taskthrottle",
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> RedisStore:
        """A store on ``redis://``, ``rediss://`` or ``unix://`` ``url``, pooled;
        ``options`` go to `redis.Redis.from_url`."""
        options = client_options(socket_timeout, connect_timeout, retries) | options
        client = connect(redis.Redis.from_url, url, options)
        return cls(client, namespace=namespace, clock=clock)

    def _run(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        try:
            try:
                return self.client.evalsha(script.sha, len(keys), *keys, *argv)
            except redis.exceptions.NoScriptError:
                self.client.script_load(script.source)
                return self.client.evalsha(script.sha, len(keys), *keys, *argv)
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"{script.name} failed: {exc}") from exc

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        return outcome(self._run(*self._codec.acquire(lease_id, entries, max_wait_ms, ttl_ms)))

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        self._run(SETTLE, *self._codec.settle(op_id, lease_id, deltas, release))

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return [int(x) for x in self._run(PEEK, *self._codec.peek(entries))]

    def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        try:
            self.client.delete(*self._codec.key_names(key))
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"reset of {key!r} failed: {exc}") from exc


class AsyncRedisStore:
    """The asyncio twin of `RedisStore`, over `redis.asyncio`."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        namespace: str = "taskthrottle",
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.client = client
        # redis-py's stubs type this method differently across versions; it is a coroutine.
        self._evalsha: Callable[..., Awaitable[Any]] = client.evalsha  # type: ignore[assignment,unused-ignore]
        self._codec = _Codec(namespace, clock)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "taskthrottle",
        socket_timeout: float = 1.0,
        connect_timeout: float = 1.0,
        retries: int = 2,
        clock: Callable[[], float] | None = None,
        **options: Any,
    ) -> AsyncRedisStore:
        """See `RedisStore.from_url`."""
        options = client_options(socket_timeout, connect_timeout, retries) | options
        client = connect(redis.asyncio.Redis.from_url, url, options)
        return cls(client, namespace=namespace, clock=clock)

    async def _run(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        try:
            try:
                return await self._evalsha(script.sha, len(keys), *keys, *argv)
            except redis.exceptions.NoScriptError:
                await self.client.script_load(script.source)
                return await self._evalsha(script.sha, len(keys), *keys, *argv)
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"{script.name} failed: {exc}") from exc

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        return outcome(
            await self._run(*self._codec.acquire(lease_id, entries, max_wait_ms, ttl_ms))
        )

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        await self._run(SETTLE, *self._codec.settle(op_id, lease_id, deltas, release))

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return [int(x) for x in await self._run(PEEK, *self._codec.peek(entries))]

    async def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        try:
            await self.client.delete(*self._codec.key_names(key))
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"reset of {key!r} failed: {exc}") from exc

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
