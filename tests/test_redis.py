"""What only the Redis store must show, against the real redis-server."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from taskthrottle import (
    AsyncRedisStore,
    InvalidInput,
    Lease,
    Limit,
    Limiter,
    RedisStore,
    StoreError,
    Throttled,
)
from taskthrottle._entries import BUCKET, CONCURRENCY, Entry, entries
from taskthrottle._redis import ACQUIRE, BUCKETS, PEEK, SETTLE, Script, redact
from taskthrottle.testing import DEFAULT_START
from tests.faults.servers import RedisServer

rpm = Limit.per_minute("rpm", 60)
tpm = Limit.per_minute("tpm", 90_000, burst=120_000)
slow = Limit.per_hour("rph", 60)  # refills once a minute: real-clock tests see no refill


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def limiter(redis_url: str, namespace: str) -> Limiter:
    """A limiter on Redis' own clock (no injected clock)."""
    return Limiter(RedisStore.from_url(redis_url, namespace=namespace))


def pttl(client: redis.Redis, key: str | bytes) -> int:
    ttl: Any = client.pttl(key)
    return int(ttl)


def keys_of(client: redis.Redis, namespace: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{{{namespace}}}:*"))


class CountingRedis(redis.Redis):
    """A client that notes the name of every command it sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[str] = []

    @classmethod
    def at(cls, url: str) -> CountingRedis:
        return cls(connection_pool=redis.ConnectionPool.from_url(url))

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent.append(str(args[0]))
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class TestServerClock:
    def test_client_clock_is_never_read(
        self, limiter: Limiter, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A worker whose clock is a day off gets the same answers: time is Redis TIME."""
        for _ in range(60):
            limiter.acquire("k", [rpm])
        monkeypatch.setattr(time, "time", lambda: 86400.0 * 3)
        with pytest.raises(Throttled) as info:
            limiter.acquire("k", [rpm])
        assert 0 < info.value.retry_after <= 1.0

    def test_two_workers_share_one_bucket(self, redis_url: str, namespace: str) -> None:
        """Two stores (two workers) on one namespace draw from the same bucket."""
        first = Limiter(RedisStore.from_url(redis_url, namespace=namespace))
        second = Limiter(RedisStore.from_url(redis_url, namespace=namespace))
        for _ in range(30):
            first.acquire("k", [slow])
            second.acquire("k", [slow])
        with pytest.raises(Throttled):
            second.acquire("k", [slow])
        assert first.available("k", [slow])["rph"] < 1


class TestScripts:
    def test_only_cached_shapes_keep_their_encoding(self, limiter: Limiter) -> None:
        """A request built afresh each call (a mapping, as the task integrations make) is
        encoded each call: caching it would grow a worker's memory task after task."""
        store = limiter.store
        assert isinstance(store, RedisStore)
        for n in range(20):
            limiter.acquire({f"tenant:{n}": [rpm], "global": [tpm]})
            limiter.acquire(f"tenant:{n}", [rpm], consume={"rpm": 2})
        assert len(store._codec.encoded) == 0
        limiter.acquire("k", [rpm, tpm])
        limiter.acquire("k", [rpm, tpm])
        assert len(store._codec.encoded) == 1  # one shape, encoded once

    def test_reloaded_after_script_flush(self, servers: Callable[..., RedisServer]) -> None:
        """SCRIPT FLUSH (or a restart, or a failover) costs one reload, not an error. On a
        redis-server of the test's own: a flush is server-wide."""
        own = servers("flush")
        client = own.client()
        limiter = Limiter(RedisStore.from_url(own.url(), namespace="flush"))
        scripts = [BUCKETS.sha, ACQUIRE.sha, SETTLE.sha, PEEK.sha]
        limiter.acquire("k", [slow])
        client.script_flush()
        assert client.script_exists(*scripts) == [False] * 4
        limiter.acquire("k", [slow])  # token buckets of one key: buckets.lua
        lease = limiter.acquire("k", [slow, Limit.concurrency("c", 2)])  # acquire.lua
        lease.adjust(rph=1)
        assert limiter.available("k", [slow])["rph"] == 56  # three acquires, one adjust
        assert client.script_exists(*scripts) == [True] * 4

    @pytest.mark.parametrize(
        ("max_wait", "entry", "message"),
        [
            ("0", "2:0:60000:1:1:nan:rpm", "malformed entry"),
            ("0", "2:0:60000:1:1:inf:rpm", "malformed entry"),
            ("0", "1:0:60000:1:1:1000:rpm", "malformed entry"),  # names the op key
            ("0", "2:0:60000:1:1:9007199254740993:rpm", "malformed entry"),
            ("0", "2:0:60000:1:1:1000.5:rpm", "malformed entry"),
            ("0", "2:0:-60000:1:1:1000:rpm", "malformed entry"),
            ("0", "2:0:60000:1:1:1000", "malformed entry"),
            ("nan", "2:0:60000:1:1:1000:rpm", "not a finite number"),
            ("1e400", "2:0:60000:1:1:1000:rpm", "not a finite number"),
        ],
    )
    @pytest.mark.parametrize("script", [ACQUIRE, BUCKETS], ids=lambda s: s.name)
    def test_lua_refuses_bad_numbers_and_writes_nothing(
        self,
        client: redis.Redis,
        namespace: str,
        limiter: Limiter,
        max_wait: str,
        entry: str,
        message: str,
        script: Script,
    ) -> None:
        """Even a caller that bypasses the Python checks cannot slip NaN, infinities or
        numbers Lua would round past the script."""
        limiter.acquire("warm", [rpm, Limit.concurrency("c", 1)])  # loads both scripts
        tag = "{" + namespace + "}"
        keys = [f"{tag}:op:lease-x", f"{tag}:b:k"]
        argv = ["", max_wait, "1000", "lease-x", entry]
        with pytest.raises(redis.ResponseError, match=message):
            client.evalsha(script.sha, len(keys), *keys, *argv)
        assert client.exists(*keys) == 0  # neither charged nor recorded


class TestKeys:
    def test_every_key_expires(self, limiter: Limiter, client: redis.Redis, namespace: str) -> None:
        """Buckets, slots and op memory all carry a TTL, so idle state disappears."""
        lease = limiter.acquire(
            {"tenant:1": [rpm, Limit.concurrency("c", 2)], "org:1": [Limit.quota("q", 9)]}
        )
        lease.adjust(rpm=2)
        found = keys_of(client, namespace)
        kinds = sorted(key.decode().split(":")[1] for key in found)
        assert kinds == ["b", "b", "c", "op", "op"], found  # the lease and its adjust
        assert all(pttl(client, key) > 0 for key in found), found
        lease.release()
        assert client.exists(f"{{{namespace}}}:c:tenant:1") == 0  # the last slot went with it

    # One millitoken a day refills this bucket: repaying two million tokens takes 1.7e17
    # ms, a number Redis would pass to PEXPIRE in exponent form, which it refuses.
    glacial = Limit.per_day("glacial", 0.001, burst=4_000_000_000_000)

    @pytest.mark.parametrize(
        "others", [[], [Limit.quota("q", 9)]], ids=["buckets.lua", "acquire.lua"]
    )
    def test_an_expiry_past_1e17_ms_is_still_set(
        self, limiter: Limiter, client: redis.Redis, namespace: str, others: list[Limit]
    ) -> None:
        """An acquire, and an adjust (settle.lua), whose state takes longer than 1e17 ms to
        expire succeed, and leave the hash with a TTL (the longest one, 2**52 ms)."""
        hash_key = f"{{{namespace}}}:b:k"
        lease = limiter.acquire("k", [self.glacial, *others], consume={"glacial": 2_000_000})
        assert 2**52 - 60_000 < pttl(client, hash_key) <= 2**52
        client.delete(hash_key)
        lease = limiter.acquire("k", [self.glacial, *others])
        assert 0 < pttl(client, hash_key) < 1e17
        lease.adjust(glacial=2_000_000)
        assert 2**52 - 60_000 < pttl(client, hash_key) <= 2**52
        assert limiter.available("k", [self.glacial])["glacial"] == 4e12 - 2_000_001

    def test_a_booking_is_remembered_until_a_minute_past_its_turn(
        self, limiter: Limiter, client: redis.Redis, namespace: str
    ) -> None:
        """The op key of a reservation 200 s ahead lives until a minute past its turn, not a
        minute past the booking: its lease id is still known when its turn comes."""
        slow_hour = Limit.per_hour("h", 18)  # a token every 200 s
        limiter.acquire("k", [slow_hour], consume={"h": 18})
        booked = limiter.reserve("k", [slow_hour], max_wait=300, lease_id="booked")
        assert 199 < booked.delay <= 200
        limiter.acquire("k", [rpm], lease_id="now")
        assert 259_000 < pttl(client, f"{{{namespace}}}:op:a:booked") <= 260_000
        assert 59_000 < pttl(client, f"{{{namespace}}}:op:a:now") <= 60_000

    def test_debt_outlives_its_repayment(
        self, limiter: Limiter, client: redis.Redis, namespace: str
    ) -> None:
        """A bucket in debt keeps a TTL long enough to repay: expiry never forgives debt."""
        lease = limiter.acquire("k", [tpm], consume={"tpm": 120_000})
        lease.adjust(tpm=900_000)  # 900,000 tokens of debt: 600 s to repay at 1,500/s
        ttl = pttl(client, f"{{{namespace}}}:b:k")
        # (120,000 + 900,000) / 1,500 per second = 680 s to full, less the ms since the
        # charge, and the minute the expiry is pushed past it (so that it moves rarely)
        assert 679_000 + 60_000 <= ttl <= 680_000 + 60_000

    def test_one_hash_slot_per_namespace(self, client: redis.Redis, namespace: str) -> None:
        """All keys of a namespace share the hash tag, so multi-key scripts work on Cluster."""
        limiter = Limiter(RedisStore(client, namespace=namespace))
        limiter.acquire({"tenant:{7}": [rpm], "org:}{": [rpm, Limit.concurrency("c", 1)]})
        slots = {key_slot(key) for key in keys_of(client, namespace)}
        assert slots == {key_slot(f"{{{namespace}}}".encode())}

    @pytest.mark.parametrize("namespace", ["", "a{b", "a}b", None])
    def test_bad_namespace(self, namespace: object, redis_url: str) -> None:
        """A namespace must make a hash tag: no braces, not empty."""
        with pytest.raises(InvalidInput, match="namespace"):
            RedisStore.from_url(redis_url, namespace=namespace)  # type: ignore[arg-type]


def slot(key: str, name: str, cap: int, slots: int = 1) -> Entry:
    """A concurrency entry: ``slots`` of ``cap`` slots of limit ``name`` under ``key``."""
    return Entry(key, name, CONCURRENCY, cap * 1000, 0, 1, slots * 1000)


class TestBoundedRefusals:
    @staticmethod
    def fill(store: RedisStore, holders: list[tuple[Entry, int]]) -> None:
        """Grants each ``(entry, ttl_ms)`` of ``holders`` to a lease of its own, through
        acquire.lua, pipelined."""
        pipe = store.client.pipeline(transaction=False)
        for n, (entry, ttl) in enumerate(holders):
            script, keys, argv = store._codec.acquire(f"{entry.key}-{n}", [entry], 0, ttl)
            pipe.evalsha(script.sha, len(keys), *keys, *argv)
        assert all(type(reply) is int for reply in pipe.execute())  # all granted, no delay

    @staticmethod
    def refusal_time(store: RedisStore, request: Entry) -> float:
        """The quickest of 15 refused acquires' round trips (s): other clients' load only
        ever adds to it."""
        times = []
        for _ in range(15):
            start = time.perf_counter()
            assert not store.acquire("x", [request], 0, 60_000).granted
            times.append(time.perf_counter() - start)
        return min(times)

    def test_a_refusal_costs_about_the_same_with_20000_holders(
        self, redis_url: str, namespace: str
    ) -> None:
        """A refused acquire on a full concurrency limit of 20,000 holders takes less than
        five times one on a limit of one holder, whatever the wait needs to know: one slot,
        every slot, a cap lowered below what is held, holders expired since, another limit's
        holders ahead. (It took 25 to 40 ms, reading every lease, for all but the first.)"""
        n, hour = 20_000, 3_600_000
        at = DEFAULT_START  # an injected clock: the holders expire when the test says
        filler = RedisStore.from_url(redis_url, namespace=namespace, clock=lambda: at)
        filler.acquire("load", [slot("warm", "conc", 1)], 0, hour)  # loads acquire.lua
        self.fill(filler, [(slot("one", "conc", 1), hour)])
        self.fill(filler, [(slot("big", "conc", n), hour + i) for i in range(n)])
        stale = [(slot("stale", "conc", n + 1), 600_000 + i) for i in range(n)]
        self.fill(filler, [*stale, (slot("stale", "conc", n + 1), hour)])
        ahead = [(slot("mixed", "other", n), 600_000 + i) for i in range(n)]
        self.fill(filler, [*ahead, (slot("mixed", "conc", 1), hour)])

        later = RedisStore.from_url(redis_url, namespace=namespace, clock=lambda: at + 700)
        base = self.refusal_time(later, slot("one", "conc", 1))
        cases = {
            "one slot": slot("big", "conc", n),
            "every slot": slot("big", "conc", n, slots=n),
            "cap halved": slot("big", "conc", n // 2),
            "expired holders": slot("stale", "conc", 1),
            "another limit's holders": slot("mixed", "conc", 1),
        }
        for case, request in cases.items():
            took = self.refusal_time(later, request)
            assert took < 5 * base, f"{case}: {took * 1e6:.0f} us, 1 holder: {base * 1e6:.0f} us"
        # The refusals pruned the expired: the live holder and the count of slots are left.
        assert later.client.zcard(f"{{{namespace}}}:c:stale") == 2
        later.client.close()
        filler.client.close()


class TestRenew:
    def test_every_lease_in_one_evalsha(self, redis_url: str, namespace: str) -> None:
        """Renewing thirty leases over three keys sends one command: one EVALSHA."""
        client = CountingRedis.at(redis_url)
        store = RedisStore(client, namespace=namespace)
        conc = Limit.concurrency("conc", 20)
        leases = []
        for n in range(30):
            lease = entries(f"k{n % 3}", [conc, rpm], None)
            assert store.acquire(f"lease-{n}", lease, 0, 10_000).granted
            leases.append((f"lease-{n}", lease))
        store.settle("lease-7:r", "lease-7", [], leases[7][1][:1])  # its release
        store.renew(leases[:1], 10_000)  # loads the script
        client.sent.clear()
        renewed = store.renew(leases, 600_000)
        assert client.sent == ["EVALSHA"]
        assert renewed == [n != 7 for n in range(30)]
        for key in ("k0", "k1", "k2"):
            assert 590_000 < pttl(client, f"{{{namespace}}}:c:{key}") <= 600_000
        client.sent.clear()
        assert store.renew([], 600_000) == []
        assert store.renew([("buckets", entries("k0", [rpm], None))], 600_000) == [True]
        assert client.sent == []
        client.close()


class Closer:
    """A loopback server that accepts each connection and closes it at once, counting them:
    every attempt to reach it is one connection, refused by the server's silence."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def closer() -> Iterator[Closer]:
    server = Closer()
    yield server
    server.close()


class TestRetries:
    @pytest.mark.parametrize("retries", [0, 2, 4])
    def test_connection_errors_are_tried_again_then_a_store_error(
        self, closer: Closer, retries: int
    ) -> None:
        """Each call (an acquire, a reset) makes exactly retries + 1 attempts, one connection
        each, then raises StoreError saying what failed and after how many attempts; the
        password of the URL is in no message."""
        url = f"redis://:s3cret@127.0.0.1:{closer.port}/0"
        store = RedisStore.from_url(url, retries=retries, connect_timeout=0.2, socket_timeout=0.2)
        attempts = f"{retries + 1} attempt{'s' if retries else ''}"
        with pytest.raises(StoreError, match=rf"^buckets\.lua failed after {attempts}: ") as info:
            store.acquire("x", entries("k", [rpm], None), 0, 1000)
        assert closer.accepted == retries + 1
        assert "s3cret" not in str(info.value)
        with pytest.raises(StoreError, match=rf"^reset of 'k' failed after {attempts}: "):
            store.reset("k")
        assert closer.accepted == 2 * (retries + 1)

    def test_the_async_store_retries_alike(self, closer: Closer) -> None:
        """AsyncRedisStore makes retries + 1 attempts too."""

        async def main() -> None:
            url = f"redis://127.0.0.1:{closer.port}/0"
            store = AsyncRedisStore.from_url(url, retries=2, connect_timeout=0.2)
            try:
                with pytest.raises(StoreError, match=r"^peek\.lua failed after 3 attempts: "):
                    await store.peek(entries("k", [rpm], None))
                assert closer.accepted == 3
                with pytest.raises(StoreError, match=r"^reset of 'k' failed after 3 attempts: "):
                    await store.reset("k")
                assert closer.accepted == 6
            finally:
                await store.aclose()

        asyncio.run(main())

    def test_a_client_of_your_own_is_retried_by_the_store(self, closer: Closer) -> None:
        """`retries` belongs to the store: a client given without retries of its own is
        tried retries + 1 times too."""
        client = redis.Redis.from_url(
            f"redis://127.0.0.1:{closer.port}/0",
            retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        )
        with pytest.raises(StoreError, match="after 2 attempts"):
            RedisStore(client, retries=1).peek(entries("k", [rpm], None))
        assert closer.accepted == 2

    def test_other_errors_are_not_retried(self, redis_url: str, namespace: str) -> None:
        """An error of the script (here a number past 2**53) is a StoreError at once: one
        EVALSHA."""
        client = CountingRedis.at(redis_url)
        store = RedisStore(client, namespace=namespace, retries=2)
        store.peek(entries("k", [rpm], None))  # loads the scripts
        store.acquire("warm", entries("k", [rpm], None), 0, 1000)
        client.sent.clear()
        bad = Entry("k", "rpm", BUCKET, 60_000, 1, 1, 2**60)
        with pytest.raises(StoreError, match=r"^buckets\.lua failed: .*malformed entry"):
            store.acquire("x", [bad], 0, 1000)
        assert client.sent == ["EVALSHA"]
        client.close()


class TestConnections:
    @pytest.mark.parametrize(
        "url",
        ["redis://127.0.0.1:6379/0", "rediss://127.0.0.1:6380/0", "unix:///tmp/redis.sock?db=1"],
    )
    def test_url_schemes(self, url: str) -> None:
        """redis://, rediss:// and unix:// URLs make a store without connecting."""
        assert RedisStore.from_url(url).client is not None

    def test_bad_url(self) -> None:
        """A URL of another scheme is refused by name."""
        with pytest.raises(InvalidInput, match="http://x"):
            RedisStore.from_url("http://x")

    @pytest.mark.parametrize(
        ("url", "reason"),
        [
            ("http://user:Secret9@host/0", "schemes"),
            ("redis://user:Secret9@host:port/0", "host or port"),
            ("redis://:Sec/ret9@127.0.0.1:6379/0", "escape"),  # would take "Sec" for a port
            ("redis://:Sec#ret9@127.0.0.1:6379/0", "escape"),  # would connect to a host "Sec"
            ("redis://127.0.0.1:6379/0?password=Secret9&db=x", "db"),
        ],
    )
    @pytest.mark.parametrize("store_class", [RedisStore, AsyncRedisStore])
    def test_a_bad_url_is_shown_without_its_password(
        self, url: str, reason: str, store_class: type[RedisStore | AsyncRedisStore]
    ) -> None:
        """A malformed URL is refused with a message, and a traceback, showing neither its
        password nor a piece of it."""
        with pytest.raises(InvalidInput, match=r"^bad Redis URL ") as info:
            store_class.from_url(url)
        shown = "".join(traceback.format_exception(info.value))
        assert reason in str(info.value)
        assert "***" in str(info.value)
        for secret in ("Secret9", "Sec", "ret9"):
            assert secret not in shown

    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            ("redis://user:Secret9@host:6379/0", "redis://user:***@host:6379/0"),
            ("rediss://:Secret9@host/0", "rediss://:***@host/0"),
            ("redis://:Sec@ret9@host/0", "redis://:***@host/0"),
            ("redis://user@host/0", "redis://user@host/0"),
            ("redis://host/0?password=Secret9&db=1", "redis://host/0?password=***&db=1"),
            (
                "unix:///run/r.sock?db=1&SSL_Password=Secret9",
                "unix:///run/r.sock?db=1&SSL_Password=***",
            ),
            ("user:Secret9@host", "user:***@host"),
            ("redis://host:6379/0", "redis://host:6379/0"),
            ("", ""),
        ],
    )
    def test_redact(self, url: str, shown: str) -> None:
        """redact masks passwords, in the user part and in the query, and nothing else."""
        assert redact(url) == shown

    def test_reprs_show_the_address_without_the_password(self) -> None:
        """A store's repr names its address and namespace, never the password."""
        url = "redis://user:Secret9@127.0.0.1:6379/9?ssl_password=Secret9"
        store = RedisStore.from_url(url, namespace="ns")
        shown = "'redis://user:***@127.0.0.1:6379/9?ssl_password=***', namespace='ns'"
        assert repr(store) == f"RedisStore({shown})"
        assert repr(AsyncRedisStore.from_url(url, namespace="ns")) == f"AsyncRedisStore({shown})"
        given = RedisStore(store.client, namespace="ns")
        assert repr(given) == "RedisStore('127.0.0.1:6379/9', namespace='ns')"

    @pytest.mark.parametrize("store_class", [RedisStore, AsyncRedisStore])
    def test_tls_checks_the_host_name(
        self, store_class: type[RedisStore | AsyncRedisStore]
    ) -> None:
        """A rediss:// store checks the certificate's host name whatever redis-py's default
        (5.x checked none); a choice of the caller's stands, as an option or in the URL, and
        so does turning certificate checks off, with which Python allows no host name check."""

        def options(url: str, **given: Any) -> dict[str, Any]:
            kwargs: dict[str, Any] = store_class.from_url(
                url, **given
            ).client.connection_pool.connection_kwargs
            return kwargs

        assert options("rediss://127.0.0.1:6380/0")["ssl_check_hostname"] is True
        assert options("rediss://h/0", ssl_check_hostname=False)["ssl_check_hostname"] is False
        assert options("rediss://h/0?ssl_check_hostname=false")["ssl_check_hostname"] is False
        assert "ssl_check_hostname" not in options("rediss://h/0", ssl_cert_reqs="none")
        assert "ssl_check_hostname" not in options("rediss://h/0", ssl_cert_reqs=None)
        assert "ssl_check_hostname" not in options("rediss://h/0?ssl_cert_reqs=none")
        assert "ssl_check_hostname" not in options("redis://127.0.0.1:6379/0")

    @pytest.mark.parametrize("timeout", [0, -1, float("nan")])
    def test_bad_timeouts(self, timeout: float) -> None:
        """Timeouts must be finite and above zero."""
        with pytest.raises(InvalidInput, match="socket_timeout"):
            RedisStore.from_url("redis://127.0.0.1", socket_timeout=timeout)

    def test_unreachable_server_is_a_store_error(self) -> None:
        """Nothing listening: StoreError, quickly, naming the script, and neither it nor its
        traceback shows the URL's password."""
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        store = RedisStore.from_url(f"redis://user:Secret9@127.0.0.1:{port}/0", retries=0)
        with pytest.raises(
            StoreError, match=r"buckets\.lua failed after 1 attempt: .*refused"
        ) as info:
            store.acquire("k", entries("k", [rpm], None), 0, 1000)
        assert "Secret9" not in "".join(traceback.format_exception(info.value))

    @pytest.mark.parametrize("retries", [-1, 1.5, None])
    def test_bad_retries(self, retries: object) -> None:
        """retries must be a whole number, at least 0."""
        with pytest.raises(InvalidInput, match="retries"):
            RedisStore.from_url("redis://127.0.0.1", retries=retries)  # type: ignore[arg-type]


class ReplyDropper:
    """A loopback proxy that swallows Redis' reply to the first EVALSHA it forwards,
    so the client times out and retries a command the server already ran. It counts the
    EVALSHAs it forwards: each one the server runs."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.dropped = threading.Event()
        self.closed = False
        self.evalshas = 0
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            drop = threading.Event()
            threading.Thread(target=self.pipe, args=(conn, server, drop, True), daemon=True).start()
            threading.Thread(
                target=self.pipe, args=(server, conn, drop, False), daemon=True
            ).start()

    def pipe(self, src: socket.socket, dst: socket.socket, drop: threading.Event, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up:
                    self.evalshas += data.upper().count(b"EVALSHA")
                if up and b"EVALSHA" in data.upper() and not self.dropped.is_set():
                    self.dropped.set()
                    drop.set()
                if not (drop.is_set() and not up):
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def test_a_retried_acquire_charges_once(
    redis_url: str, namespace: str, client: redis.Redis
) -> None:
    """The store sends a timed-out EVALSHA again; the server runs it twice and charges
    once, and the grant is the call's own, not a replay of an earlier one. (Counted at the
    proxy: the server's own command counts include other clients'.)"""
    warm = Limiter(RedisStore.from_url(redis_url, namespace=namespace))
    warm.acquire("warm", [rpm])  # the script is loaded: the proxy sees EVALSHA first
    host, port = client.connection_pool.connection_kwargs.get("host"), 6379
    port = client.connection_pool.connection_kwargs.get("port", port)
    proxy = ReplyDropper((str(host), int(port)))
    try:
        url = f"redis://127.0.0.1:{proxy.port}/{client.connection_pool.connection_kwargs['db']}"
        store = RedisStore.from_url(url, namespace=namespace, socket_timeout=0.3, retries=2)
        granted = store.acquire("x", entries("k", [slow], {"rph": 10}), 0, 1000)
        runs = proxy.evalshas
    finally:
        proxy.close()
    assert proxy.dropped.is_set()
    assert runs == 2, "the server should have run the acquire twice"
    assert 50.0 <= warm.available("k", [slow])["rph"] < 50.5  # twice would leave 40
    assert (granted.granted, granted.replayed) == (True, False)


@pytest.mark.parametrize("op", ["adjust", "release"])
def test_a_retried_settle_applies_once(
    redis_url: str, namespace: str, client: redis.Redis, op: str
) -> None:
    """An adjust or a release whose reply is lost is sent again; the server runs it twice
    and applies it once: the adjust charges once, the release frees the slot once."""
    conc = Limit.concurrency("conc", 2)
    warm = Limiter(RedisStore.from_url(redis_url, namespace=namespace))
    warm.acquire("k", [slow, conc], consume={"rph": 10}, lease_id="L")
    kwargs = client.connection_pool.connection_kwargs
    proxy = ReplyDropper((str(kwargs.get("host", "127.0.0.1")), int(kwargs.get("port", 6379))))
    try:
        url = f"redis://127.0.0.1:{proxy.port}/{kwargs['db']}"
        store = RedisStore.from_url(url, namespace=namespace, socket_timeout=0.3, retries=2)
        lease = Lease(store, "L", entries("k", [slow, conc], {"rph": 10}))
        lease.adjust(rph=5) if op == "adjust" else lease.release()
        runs = proxy.evalshas
    finally:
        proxy.close()
    assert (proxy.dropped.is_set(), runs) == (True, 2)
    if op == "adjust":
        assert 45.0 <= warm.available("k", [slow])["rph"] < 45.5  # twice would leave 40
    else:
        held = [warm.acquire("k", [conc]) for _ in range(2)]  # both slots are free again
        with pytest.raises(Throttled):  # and no third: the count went down once
            warm.acquire("k", [conc])
        assert len(held) == 2
