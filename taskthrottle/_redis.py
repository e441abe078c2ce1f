"""`RedisStore` and `AsyncRedisStore`: limiter state shared by every worker.

Every operation is one EVALSHA of a script in ``lua/``; the time comes from Redis
``TIME`` inside the script, so workers with skewed clocks agree.

Key schema, for namespace ``ns`` and key ``k``::

    {ns}:b:k      HASH    buckets and quotas of k, and a pushback's hold of k (expires
                          a minute after all are full and the hold is over)
    {ns}:c:k      ZSET    concurrency slots of k  (expires with the last slot)
    {ns}:op:a:id  STRING  a lease acquired lately, and
    {ns}:op:s:id  STRING  a settle done lately, so that a call the client sent again
                          charges once (expire a minute after the op's turn)
    {ns}:cb:name  HASH    circuit breaker `name` (see lua/breaker.lua; expires a window
                          and a minute after its last change, an open one later)

Every key carries the hash tag ``{ns}``, so a lease over several keys is one
script call on Redis Cluster too. The price: a namespace lives in one slot, on
one shard. Shard by namespace (one per organisation, say) when that shard is hot.
"""

from __future__ import annotations

import hashlib
import math
import re
import ssl
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from taskthrottle._exceptions import InvalidInput, StoreError, require

require("redis", "redis")
require("tenacity", "redis")

import redis  # noqa: E402  (after the checks that name the missing extra)
import redis.asyncio  # noqa: E402
import tenacity  # noqa: E402
from redis.asyncio.retry import Retry as AsyncRetry  # noqa: E402
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

from taskthrottle._algorithms import SLOTS_READ  # noqa: E402
from taskthrottle._deferrals import Deferrals, RedisDeferrals  # noqa: E402
from taskthrottle._entries import BUCKET, CONCURRENCY, MAX_SHAPES, Entry, Shape  # noqa: E402
from taskthrottle._store import (  # noqa: E402
    OP_MEMORY_MS,
    Admission,
    BreakerReply,
    BreakerSpec,
    Outcome,
    check_renew_ttl,
)


class Script:
    """A Lua script from ``lua/``, after the constants it shares with Python and the parts
    it builds on; loaded once per server."""

    _constants = f"local OP_MEMORY_MS, SLOTS_READ = {OP_MEMORY_MS}, {SLOTS_READ}\n"

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
RENEW = Script("renew.lua", "prelude.lua")
PUSHBACK = Script("pushback.lua", "prelude.lua", "entries.lua")
BREAKER = Script("breaker.lua", "prelude.lua")
ROOM = Script("room.lua", "prelude.lua", "entries.lua")


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
        self.namespace = namespace
        # Acquires and settles remember their ops apart: no settle id ("<lease>:r", say)
        # can pass for a lease id, nor the reverse.
        self.acquired = f"{self.tag}:op:a:"
        self.settled = f"{self.tag}:op:s:"
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
            if e.kind == CONCURRENCY and hash_key not in index:
                # Declared for the pushback a slots-only request reads there (entries.lua).
                keys.append(hash_key)
                index[hash_key] = len(keys) + 1
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
            [self.acquired + lease_id, *keys],
            [self.now(), max_wait_ms, ttl_ms, lease_id, *argv],
        )

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> tuple[list[str], list[Any]]:
        keys, argv, _ = self.encoding([*deltas, *release])
        return [self.settled + op_id, *keys], [self.now(), lease_id, len(deltas), *argv]

    def peek(self, entries: Sequence[Entry]) -> tuple[list[str], list[Any]]:
        keys, argv, _ = self.encoding(entries)
        return [self.acquired, *keys], [self.now(), *argv]

    def renew(
        self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int
    ) -> tuple[list[str], list[Any]] | None:
        """The KEYS and ARGV of renew.lua (see there), or None when no lease holds a slot."""
        keys: list[str] = []
        index: dict[str, int] = {}
        argv: list[Any] = [self.now(), check_renew_ttl(ttl_ms)]
        for lease_id, entries in leases:
            slots = [e for e in entries if e.kind == CONCURRENCY]
            argv += [lease_id, len(slots)]
            for e in slots:
                zset_key = self.key_names(e.key)[1]
                i = index.get(zset_key)
                if i is None:
                    keys.append(zset_key)
                    i = index[zset_key] = len(keys)
                argv.append(f"{i}:{e.amount}:{e.name}")
        return (keys, argv) if keys else None

    def key_names(self, key: str) -> tuple[str, str]:
        return f"{self.tag}:b:{key}", f"{self.tag}:c:{key}"

    def pushback(
        self, key: str, hold_ms: int, remaining: Sequence[Entry]
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of pushback.lua: the key's hash is KEYS[2] whatever the
        entries (all buckets and quotas of ``key``)."""
        argv = self.encode(remaining)[1] if remaining else []
        return [self.acquired, self.key_names(key)[0]], [self.now(), hold_ms, *argv]

    def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of breaker.lua."""
        rules = ":".join(str(n) for n in spec)
        return [self.breaker_key(name)], [self.now(), op, probe_round, rules]

    def breaker_key(self, name: str) -> str:
        return f"{self.tag}:cb:{name}"

    def room_keys(self, room: str) -> list[str]:
        """The keys of waiting room ``room`` (see lua/room.lua)."""
        base = f"{self.tag}:room:{room}"
        return [f"{base}:{part}" for part in "qtfugoe"]

    def join(
        self,
        room: str,
        lease_id: str,
        ref: str,
        entries: Sequence[Entry],
        ttl_ms: int,
        expires_ms: int,
    ) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of room.lua's join."""
        keys, argv, _ = self.encoding(entries)
        return (
            [self.acquired + lease_id, *keys, *self.room_keys(room)],
            [self.now(), "join", lease_id, ref, ttl_ms, expires_ms, *argv],
        )

    def room(self, room: str, op: str, *args: Any) -> tuple[list[str], list[Any]]:
        """The KEYS and ARGV of room.lua's other operations."""
        return [self.acquired, *self.room_keys(room)], [self.now(), op, *args]


def breaker_reply(reply: Any) -> BreakerReply:
    """A breaker.lua reply as a `BreakerReply`."""
    try:
        return BreakerReply(*(int(x) for x in reply))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"unexpected reply from breaker.lua: {reply!r}") from exc


#: What a request is sent as: KEYS but the op's, ARGV but the first few, and the acquire
#: script that suits it.
Encoding = tuple[list[str], list[str], Script]


def outcome(reply: Any) -> Outcome:
    """An acquire reply as an `Outcome`."""
    if type(reply) is int:  # granted with no delay, the common case: the store's clock
        return _new(Outcome, (True, 0, reply, (), False))
    try:
        granted, delay, now, *rest = (int(x) for x in reply)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"unexpected reply from acquire.lua: {reply!r}") from exc
    pairs = tuple((rest[i] - 1, rest[i + 1]) for i in range(0, len(rest), 2))
    return Outcome(granted >= 1, delay, now, pairs, granted == 2)


_new = tuple.__new__


def _retried(found: Outcome) -> Outcome:
    """The outcome of an acquire that was sent again: an attempt whose reply was lost may
    have been granted, which this one then replays; the grant is this call's own."""
    return found._replace(replayed=False) if found.replayed else found


def client_options(
    socket_timeout: float, connect_timeout: float, *, asynchronous: bool = False
) -> dict[str, Any]:
    """Connection options: short timeouts, and no retries of redis-py's own: the store
    retries (see `Retries`), counting every attempt. ``asynchronous``: for an asyncio
    client, which wants redis-py's asyncio Retry (8.2 warns of the other)."""
    for name, value in (("socket_timeout", socket_timeout), ("connect_timeout", connect_timeout)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidInput(
                f"{name} must be a finite number of seconds above zero, got {value!r}"
            )
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": (AsyncRetry if asynchronous else Retry)(NoBackoff(), 0),
        "health_check_interval": 30,
    }


def tls_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``ssl_check_hostname=True`` for a ``rediss://`` URL, unless the caller chose (an
    option, or in the URL's query) or turned certificate checks off.

    redis-py before 6.0 accepts a certificate made out to any host by default, which lets
    anyone with a valid certificate for some name sit in the middle. With checks off
    (``ssl_cert_reqs="none"``) Python refuses a host name check, and redis-py 5.x would
    fail every connection.
    """
    if not url.startswith("rediss://"):
        return {}
    try:
        query = {name: values[-1] for name, values in parse_qs(urlsplit(url).query).items()}
    except ValueError:  # a malformed URL: redis-py says what is wrong with it
        return {}
    chosen = {**query, **options}
    if "ssl_check_hostname" in chosen or not _verifies(chosen.get("ssl_cert_reqs", "required")):
        return {}
    return {"ssl_check_hostname": True}


def _verifies(cert_reqs: object) -> bool:
    """Whether redis-py checks certificates under ``ssl_cert_reqs=cert_reqs``."""
    if cert_reqs is None or cert_reqs == "none":
        return False
    return isinstance(cert_reqs, str) or cert_reqs != ssl.CERT_NONE


def check_retries(retries: object) -> int:
    """Return ``retries`` if it is a number of retries: a whole number, at least 0."""
    if type(retries) is not int or retries < 0:
        raise InvalidInput(f"retries must be a whole number of at least 0, got {retries!r}")
    return retries


T = TypeVar("T")

#: What a store retries: the connection failed or timed out. The command may have run
#: anyway (only its reply was lost); sending it again is safe because every script is
#: idempotent by its op id (an acquire by its lease id, a settle by its own id), and the
#: rest change nothing twice (peek reads, renew moves expiries to now + ttl again, reset
#: deletes). Any other Redis error is final.
RETRIABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


class Retries:
    """The retry policy of a store's calls, through tenacity: ``retries`` more attempts
    after a connection error or a timeout, each after an exponential wait with jitter
    (10-20 ms, then 20-30 ms, 40-50 ms, ..., at most 210 ms), then `StoreError`.

    The first attempt runs without tenacity, whose machinery costs more than the rest of
    an acquire; tenacity takes over once it failed.
    """

    def __init__(self, retries: int) -> None:
        self.retries = check_retries(retries)

    def policy(self) -> dict[str, Any]:
        return {
            "retry": tenacity.retry_if_exception_type(RETRIABLE),
            "stop": tenacity.stop_after_attempt(self.retries + 1),
            "wait": tenacity.wait_exponential(multiplier=0.01, max=0.2)
            + tenacity.wait_random(0, 0.01),
            "reraise": True,
        }

    def error(self, what: str, exc: redis.exceptions.RedisError) -> StoreError:
        """The `StoreError` for a final ``exc``: what failed, and after how many attempts.
        Neither the URL nor its password is in it (redis-py's messages name host and port)."""
        if isinstance(exc, RETRIABLE):
            attempts = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
            return StoreError(f"{what} failed after {attempts}: {exc}")
        return StoreError(f"{what} failed: {exc}")

    def call(self, what: str, first: BaseException, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` again, its first attempt having failed with ``first``."""
        try:
            for attempt in tenacity.Retrying(**self.policy()):
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first  # the attempt made already: tenacity counts and waits
                    return fn(*args)
        except redis.exceptions.RedisError as exc:
            raise self.error(what, exc) from exc
        raise AssertionError("unreachable: tenacity returns or raises")

    async def acall(
        self, what: str, first: BaseException, fn: Callable[..., Awaitable[T]], *args: Any
    ) -> T:
        """The asyncio twin of `call`."""
        try:
            async for attempt in tenacity.AsyncRetrying(**self.policy()):
                with attempt:
                    if attempt.retry_state.attempt_number == 1:
                        raise first
                    return await fn(*args)
        except redis.exceptions.RedisError as exc:
            raise self.error(what, exc) from exc
        raise AssertionError("unreachable: tenacity returns or raises")


C = TypeVar("C")


#: A query parameter that carries a secret (``password``, ``ssl_password``, ...), and its value.
_QUERY_SECRET = re.compile(r"([?&][^=&#]*password[^=&#]*=)[^&#]*", re.IGNORECASE)


def _userinfo(url: str) -> tuple[str, str, str | None, str]:
    """``url`` as ``(scheme://, user, password, @host...)``: the user part is everything up
    to the last ``@``, so that a password with an unescaped ``@``, ``/``, ``?`` or ``#`` is
    taken whole; password None when there is none."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return scheme + sep, "", None, rest
    user, colon, password = userinfo.partition(":")
    return scheme + sep, user, password if colon else None, at + host


def redact(url: str) -> str:
    """``url`` with its password (of ``:secret@`` or ``user:secret@``) and the value of any
    ``*password*`` query parameter shown as ``***``: what may go into messages, logs and
    reprs. Never fails, not even on a malformed URL."""
    scheme, user, password, host = _userinfo(url)
    shown = f"{scheme}{user}{'' if password is None else ':***'}{host}"
    return _QUERY_SECRET.sub(r"\1***", shown)


def connect(factory: Callable[..., C], url: str, options: dict[str, Any]) -> C:
    """A pooled client for ``url`` from ``factory``; a malformed URL is `InvalidInput`,
    whose message shows it without its password."""
    check_authority(url)
    try:
        return factory(url, **options)
    except ValueError as exc:
        # redis-py's reasons (the scheme, a query value) quote no part of the host part,
        # which `check_authority` parsed first; the password is masked all the same.
        password, reason = _userinfo(url)[2], str(exc)
        if password:
            reason = reason.replace(password, "***")
        raise InvalidInput(f"bad Redis URL {redact(url)!r}: {reason}") from None


def client_for(url: str, timeout: float = 2.0) -> redis.Redis:
    """A plain client for ``url`` (the Redis parked tasks live in): short timeouts, no
    retries of redis-py's own, host names checked, its password kept out of errors."""
    options = client_options(timeout, timeout)
    return connect(redis.Redis.from_url, url, options | tls_options(url, options))


def check_authority(url: str) -> None:
    """Refuse a ``redis://`` or ``rediss://`` URL whose host part does not parse, or whose
    password holds an unescaped ``/``, ``?`` or ``#``: that ends the host part inside the
    password, whose pieces would be taken for a host or port, and shown in errors
    ("Error connecting to <piece>:6379", "Port could not be cast ... '<piece>'")."""
    if not url.startswith(("redis://", "rediss://")):
        return  # unix:// has no host part; other schemes are redis-py's to refuse
    try:
        parts = urlsplit(url)
        if "@" in url and "@" not in parts.netloc:
            problem = "an @ after the host: escape / ? # @ in a password as %2F %3F %23 %40"
        else:
            parts.port  # noqa: B018  (parses the port: ValueError when it cannot)
            return
    except ValueError:
        problem = "its host or port does not parse"
    raise InvalidInput(f"bad Redis URL {redact(url)!r}: {problem}")


def address(client: object) -> str:
    """Where ``client`` connects, from its pool's options, for a repr: host, port and
    database, or the socket's path; never credentials."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return f"a {type(client).__name__}"
    db = kwargs.get("db", 0)
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={db}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


class RedisStore:
    """Limiter state in Redis, shared by every process that uses the same namespace.

    A call that meets a connection error or a timeout is tried ``retries`` more times
    (see `Retries`), then raises `StoreError`; a ``client`` of your own should not retry
    by itself too (`from_url` makes one that does not). ``clock`` overrides Redis
    ``TIME`` and exists for tests only.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        namespace: str = "taskthrottle",
        clock: Callable[[], float] | None = None,
        retries: int = 2,
    ) -> None:
        self.client = client
        self._codec = _Codec(namespace, clock)
        self._retries = Retries(retries)
        self._address = address(client)

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
        ``options`` go to `redis.Redis.from_url`. A ``rediss://`` store checks the server
        certificate's host name (see `tls_options`)."""
        defaults = client_options(socket_timeout, connect_timeout) | tls_options(url, options)
        client = connect(redis.Redis.from_url, url, defaults | options)
        store = cls(client, namespace=namespace, clock=clock, retries=retries)
        store._address = redact(url)
        return store

    def __repr__(self) -> str:
        return f"RedisStore({self._address!r}, namespace={self._codec.namespace!r})"

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()

    def _call(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, retried on a connection error or a timeout; `StoreError` when it
        fails for good."""
        try:
            return fn(*args)
        except RETRIABLE as exc:
            failed: BaseException = exc
        except redis.exceptions.RedisError as exc:
            raise self._retries.error(what, exc) from exc
        return self._retries.call(what, failed, fn, *args)

    def _evalsha(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        try:
            return self.client.evalsha(script.sha, len(keys), *keys, *argv)
        except redis.exceptions.NoScriptError:  # Redis restarted, failed over or flushed
            self.client.script_load(script.source)
            return self.client.evalsha(script.sha, len(keys), *keys, *argv)

    def _run(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        return self._call(script.name, self._evalsha, script, keys, argv)

    def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        script, keys, argv = self._codec.acquire(lease_id, entries, max_wait_ms, ttl_ms)
        try:
            return outcome(self._evalsha(script, keys, argv))
        except RETRIABLE as exc:
            reply = self._retries.call(script.name, exc, self._evalsha, script, keys, argv)
        except redis.exceptions.RedisError as exc:
            raise self._retries.error(script.name, exc) from exc
        return _retried(outcome(reply))

    def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        self._run(SETTLE, *self._codec.settle(op_id, lease_id, deltas, release))

    def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return [int(x) for x in self._run(PEEK, *self._codec.peek(entries))]

    def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `taskthrottle.Store.renew`: one EVALSHA for every lease."""
        request = self._codec.renew(leases, ttl_ms)
        if request is None:
            return [True] * len(leases)  # no slots to lose, nothing to ask
        return [x == 1 for x in self._run(RENEW, *request)]

    def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        self._call(f"reset of {key!r}", self.client.delete, *self._codec.key_names(key))

    def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `taskthrottle.Store.pushback`."""
        self._run(PUSHBACK, *self._codec.pushback(key, hold_ms, remaining))

    def breaker(self, name: str, op: int, probe_round: int, spec: BreakerSpec) -> BreakerReply:
        """See `taskthrottle.Store.breaker`."""
        # Sent once: a breaker step is not idempotent (a probe or an outcome sent again
        # would count twice), and a breaker without its store lets calls through.
        keys, argv = self._codec.breaker(name, op, probe_round, spec)
        try:
            return breaker_reply(self._evalsha(BREAKER, keys, argv))
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"breaker.lua failed: {exc}") from exc

    def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        self._call(f"reset of breaker {name!r}", self.client.delete, self._codec.breaker_key(name))

    def deferrals(self, app: str, client: Any = None, namespace: str = "taskthrottle") -> Deferrals:
        """Where the integrations park tasks of ``app``: in ``client``'s Redis (the broker's)
        if given, else in this store's; under this store's namespace (not ``namespace``) and
        on its clock."""
        chosen = self.client if client is None else client
        return RedisDeferrals(chosen, self._codec.tag, self._codec.clock, app)

    def join(
        self,
        room: str,
        lease_id: str,
        ref: str,
        entries: Sequence[Entry],
        ttl_ms: int,
        expires_ms: int,
    ) -> Outcome:
        """See `taskthrottle.Rooms.join`."""
        check_namespace(room)
        reply = self._run(ROOM, *self._codec.join(room, lease_id, ref, entries, ttl_ms, expires_ms))
        if reply == [3]:  # granted before: acquiring it again replays that grant
            return self.acquire(lease_id, entries, 0, ttl_ms)
        return outcome(reply)

    def admit(self, room: str, most: int, ttl_ms: int, grant_ms: int) -> Admission:
        """See `taskthrottle.Rooms.admit`."""
        check_namespace(room)
        args = (most, ttl_ms, grant_ms, self._codec.acquired)
        reply = self._run(ROOM, *self._codec.room(room, "admit", *args))
        granted = [(reply[i].decode(), reply[i + 1].decode()) for i in range(2, len(reply), 2)]
        return Admission(granted, int(reply[1]), bool(reply[0]))

    def admitted(self, room: str, lease_ids: Sequence[str]) -> None:
        """See `taskthrottle.Rooms.admitted`."""
        if lease_ids:
            self._run(ROOM, *self._codec.room(check_namespace(room), "admitted", *lease_ids))

    def waiting(self, room: str, lease_ids: Sequence[str]) -> list[bool]:
        """See `taskthrottle.Rooms.waiting`."""
        if not lease_ids:
            return []
        reply = self._run(ROOM, *self._codec.room(check_namespace(room), "waiting", *lease_ids))
        return [x == 1 for x in reply]


class AsyncRedisStore:
    """The asyncio twin of `RedisStore`, over `redis.asyncio`."""

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        namespace: str = "taskthrottle",
        clock: Callable[[], float] | None = None,
        retries: int = 2,
    ) -> None:
        self.client = client
        # redis-py's stubs type this method differently across versions; it is a coroutine.
        self._evalsha: Callable[..., Awaitable[Any]] = client.evalsha  # type: ignore[assignment,unused-ignore]
        self._codec = _Codec(namespace, clock)
        self._retries = Retries(retries)
        self._address = address(client)

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
        defaults = client_options(socket_timeout, connect_timeout, asynchronous=True)
        defaults |= tls_options(url, options)
        client = connect(redis.asyncio.Redis.from_url, url, defaults | options)
        store = cls(client, namespace=namespace, clock=clock, retries=retries)
        store._address = redact(url)
        return store

    def __repr__(self) -> str:
        return f"AsyncRedisStore({self._address!r}, namespace={self._codec.namespace!r})"

    async def _call(self, what: str, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """See `RedisStore._call`."""
        try:
            return await fn(*args)
        except RETRIABLE as exc:
            failed: BaseException = exc
        except redis.exceptions.RedisError as exc:
            raise self._retries.error(what, exc) from exc
        return await self._retries.acall(what, failed, fn, *args)

    async def _eval(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        try:
            return await self._evalsha(script.sha, len(keys), *keys, *argv)
        except redis.exceptions.NoScriptError:  # Redis restarted, failed over or flushed
            await self.client.script_load(script.source)
            return await self._evalsha(script.sha, len(keys), *keys, *argv)

    async def _run(self, script: Script, keys: list[str], argv: list[Any]) -> Any:
        return await self._call(script.name, self._eval, script, keys, argv)

    async def acquire(
        self, lease_id: str, entries: Sequence[Entry], max_wait_ms: int, ttl_ms: int
    ) -> Outcome:
        """See `taskthrottle.Store.acquire`."""
        script, keys, argv = self._codec.acquire(lease_id, entries, max_wait_ms, ttl_ms)
        try:
            return outcome(await self._eval(script, keys, argv))
        except RETRIABLE as exc:
            reply = await self._retries.acall(script.name, exc, self._eval, script, keys, argv)
        except redis.exceptions.RedisError as exc:
            raise self._retries.error(script.name, exc) from exc
        return _retried(outcome(reply))

    async def settle(
        self, op_id: str, lease_id: str, deltas: Sequence[Entry], release: Sequence[Entry]
    ) -> None:
        """See `taskthrottle.Store.settle`."""
        await self._run(SETTLE, *self._codec.settle(op_id, lease_id, deltas, release))

    async def peek(self, entries: Sequence[Entry]) -> list[int]:
        """See `taskthrottle.Store.peek`."""
        return [int(x) for x in await self._run(PEEK, *self._codec.peek(entries))]

    async def renew(self, leases: Sequence[tuple[str, Sequence[Entry]]], ttl_ms: int) -> list[bool]:
        """See `taskthrottle.Store.renew`: one EVALSHA for every lease."""
        request = self._codec.renew(leases, ttl_ms)
        if request is None:
            return [True] * len(leases)
        return [x == 1 for x in await self._run(RENEW, *request)]

    async def reset(self, key: str) -> None:
        """See `taskthrottle.Store.reset`."""
        await self._call(f"reset of {key!r}", self._delete, *self._codec.key_names(key))

    async def _delete(self, *keys: str) -> Any:
        return await self.client.delete(*keys)

    async def pushback(self, key: str, hold_ms: int, remaining: Sequence[Entry]) -> None:
        """See `taskthrottle.Store.pushback`."""
        await self._run(PUSHBACK, *self._codec.pushback(key, hold_ms, remaining))

    async def breaker(
        self, name: str, op: int, probe_round: int, spec: BreakerSpec
    ) -> BreakerReply:
        """See `taskthrottle.Store.breaker`."""
        keys, argv = self._codec.breaker(name, op, probe_round, spec)
        try:  # sent once: see RedisStore.breaker
            return breaker_reply(await self._eval(BREAKER, keys, argv))
        except redis.exceptions.RedisError as exc:
            raise StoreError(f"breaker.lua failed: {exc}") from exc

    async def reset_breaker(self, name: str) -> None:
        """See `taskthrottle.Store.reset_breaker`."""
        key = self._codec.breaker_key(name)
        await self._call(f"reset of breaker {name!r}", self._delete, key)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.client.aclose()
