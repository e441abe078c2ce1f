"""The fault suite's own servers do what the scenarios rely on (a few seconds in all)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from tests.faults.servers import Proxy, RedisServer


def test_restart_comes_back_empty_on_the_same_port(store_redis: RedisServer) -> None:
    port = store_redis.port
    with store_redis.client() as client:
        client.set("k", "v")
        store_redis.kill()
        with pytest.raises(redis.ConnectionError):
            client.ping()
        store_redis.restart()
        assert store_redis.port == port
        assert client.get("k") is None


def test_aof_keeps_the_data_across_a_kill(broker_redis: RedisServer) -> None:
    with broker_redis.client() as client:
        client.rpush("q", "m")
        broker_redis.restart()
        assert client.lrange("q", 0, -1) == [b"m"]


def test_pause_hangs_clients_until_resume(store_redis: RedisServer) -> None:
    with store_redis.client(timeout=0.3) as client:
        store_redis.pause()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        store_redis.resume()
        assert store_redis.client().ping()


def test_proxy_modes(store_redis: RedisServer, proxy: Callable[[RedisServer], Proxy]) -> None:
    gate = proxy(store_redis)
    client = redis.Redis.from_url(gate.url(), socket_timeout=0.3)
    assert client.set("k", "v")
    gate.delay_replies(0.6)
    with pytest.raises(redis.TimeoutError):
        client.get("k")
    gate.passthrough()
    assert client.get("k") == b"v"  # redis-py reconnects after the timeout
    gate.blackhole()
    began = time.monotonic()
    with pytest.raises(redis.RedisError):
        redis.Redis.from_url(gate.url(), socket_timeout=0.3).ping()
    assert time.monotonic() - began < 2
    gate.passthrough()
    assert client.ping()
    gate.cut()
    assert client.ping()  # a cut connection is replaced on the next command
    client.close()
