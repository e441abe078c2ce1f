"""throttled(): what it records, and the request a call makes."""

from __future__ import annotations

import math

import pytest

from taskthrottle import InvalidInput, InvalidType, Limit, Limiter, MemoryStore, throttled
from taskthrottle._throttle import current_lease, lease_scope, plan, throttles_of
from taskthrottle.testing import ManualClock, memory_limiter


@throttled(
    rpm=500,
    tpm=90_000,
    key="tenant:{tenant_id}",
    consume={"tpm": lambda tenant_id, prompt: len(prompt) // 4},
)
@throttled(tpm=2_000_000, key="openai")
def summarize(tenant_id: int, prompt: str, model: str = "small") -> str:
    return prompt


def test_stacked_throttles_form_one_request() -> None:
    """Two stacked throttles: one mapping of keys to limits, one consume by name."""
    ask = plan(throttles_of(summarize), summarize, (42,), {"prompt": "x" * 400}, "summarize")
    assert {key: [lim.name for lim in lims] for key, lims in ask.target.items()} == {
        "openai": ["tpm"],
        "tenant:42": ["rpm", "tpm"],
    }
    assert ask.consume == {"tpm": 100}
    limiter = memory_limiter(ManualClock())  # a real clock refills between the two calls
    limiter.acquire(ask.target, consume=ask.consume)
    assert limiter.available("openai", ask.target["openai"]) == {"tpm": 1_999_900.0}
    assert limiter.available("tenant:42", ask.target["tenant:42"]) == {
        "rpm": 499.0,
        "tpm": 89_900.0,
    }


def test_keyword_limits_and_defaults() -> None:
    """Keyword limits get their names; a throttle without key uses the task's name."""

    @throttled(Limit.concurrency("slots", 3), rps=5, rpd=1000)
    def job(x: int) -> int:
        return x

    (spec,) = throttles_of(job)
    assert [(lim.name, lim.kind, lim.capacity) for lim in spec.limits] == [
        ("slots", "concurrency", 3),
        ("rps", "bucket", 5),
        ("rpd", "bucket", 1000),
    ]
    ask = plan(throttles_of(job), job, (1,), {}, "app.job")
    assert list(ask.target) == ["app.job"]


@pytest.mark.parametrize("burst", ["10s", 10, 10.0, "10000ms", " 10 s", "0.1667m"])
def test_a_burst_is_the_span_each_keyword_bucket_holds(burst: object) -> None:
    """burst="10s": rpm=180 holds 30 requests and tpm=6000 holds 1000 tokens; the rates
    stay what they were."""

    @throttled(rpm=180, tpm=6000, burst=burst)  # type: ignore[arg-type]
    def call(prompt: str) -> str:
        return prompt

    (spec,) = throttles_of(call)
    found = {lim.name: (round(lim.capacity), lim.rate, lim.period) for lim in spec.limits}
    assert found == {"rpm": (30, 180, 60), "tpm": (1000, 6000, 60)}


def test_without_a_burst_a_keyword_bucket_holds_its_whole_period() -> None:
    """The default is what users of other limiters expect: rpm=180 bursts to 180."""
    (spec,) = throttles_of(throttled(rpm=180)(lambda: None))
    assert spec.limits[0].capacity == 180


def test_a_burst_under_one_call_holds_a_whole_call_elsewhere() -> None:
    """The burst applies to keyword limits only; concurrency and Limit objects keep theirs."""
    (spec,) = throttles_of(
        throttled(Limit.per_second("x", 5), rpm=60, concurrency=2, burst="5s")(lambda: None)
    )
    assert {lim.name: lim.capacity for lim in spec.limits} == {"x": 5, "rpm": 5, "concurrency": 2}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rpm": 60, "burst": "10 parsecs"}, InvalidInput, "'10 parsecs'"),
        ({"rpm": 60, "burst": 0}, InvalidInput, "burst must be more than 0"),
        ({"rpm": 60, "burst": "2d"}, InvalidInput, "'2d'"),
        ({"rpm": 60, "burst": [10]}, InvalidType, r"\[10\]"),
        ({"rpm": 3, "burst": "1s"}, InvalidInput, "bucket of 0.05"),
        ({"rpm": 60, "burst": "1s", "strategy": "fixed_window"}, InvalidInput, "fixed_window"),
        ({"concurrency": 2, "burst": "1s"}, InvalidInput, "keyword limits"),
    ],
)
def test_a_bad_burst_is_refused_naming_it(
    kwargs: dict[str, object], error: type, match: str
) -> None:
    """A burst that cannot be read, or would make a bucket smaller than one call."""
    with pytest.raises(error, match=match):
        throttled(**kwargs)  # type: ignore[arg-type]


def test_callable_keys_and_defaults_of_arguments() -> None:
    """A key may be a callable of the arguments; format keys see defaults too."""

    @throttled(rps=1, key=lambda user, region="eu": f"{region}:{user}")
    @throttled(rps=2, key="model:{model}")
    def call(user: str, model: str = "small", region: str = "eu") -> None:
        return None

    ask = plan(throttles_of(call), call, ("ann",), {}, "call")
    assert sorted(ask.target) == ["eu:ann", "model:small"]


def test_a_key_naming_a_missing_argument_is_refused_when_applied() -> None:
    """A key template is checked against the task's signature when the decorator is
    applied, not in the worker: the error names the key, the argument and what it takes."""
    with pytest.raises(InvalidInput, match=r"'tenant:\{tenant\}' names tenant.*takes user"):

        @throttled(rps=1, key="tenant:{tenant}")
        def call(user: str) -> None:
            return None


def test_a_key_naming_an_argument_missing_from_a_call() -> None:
    """A task taking **kwargs is checked per call: the error names the key and the argument."""

    @throttled(rps=1, key="tenant:{tenant}")
    def call(**kwargs: str) -> None:
        return None

    with pytest.raises(InvalidInput, match="tenant"):
        plan(throttles_of(call), call, (), {"user": "ann"}, "call")


@pytest.mark.parametrize(
    ("key", "match"),
    [("tenant:{", "malformed"), ("t:{0}", "must name the task's arguments"), ("{}", "got {}")],
)
def test_a_malformed_key_template_is_refused(key: str, match: str) -> None:
    """A key template that cannot format is an InvalidInput naming it, not a bare ValueError
    in the worker."""
    with pytest.raises(InvalidInput, match=match):
        throttled(rps=1, key=key)


@pytest.mark.parametrize("amount", [0, -1, math.nan, 2.0**60, 0.0001])
def test_a_bad_constant_consume_is_refused_when_declared(amount: float) -> None:
    """A constant consume amount is checked by throttled() itself."""
    with pytest.raises(InvalidInput, match=r"consume\['tpm'\]"):
        throttled(tpm=100, consume={"tpm": amount})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, InvalidInput, "at least one limit"),
        ({"rps": 1, "consume": {"tpm": 1}}, InvalidInput, "tpm"),
        ({"rps": 1, "consume": {"rps": "x"}}, InvalidType, "'x'"),
        ({"rps": 0}, InvalidInput, "0"),
        ({"rps": 1, "key": 42}, InvalidType, "42"),
    ],
)
def test_bad_throttles(kwargs: dict[str, object], error: type, match: str) -> None:
    """Bad arguments fail at decoration time, naming the value."""
    with pytest.raises(error, match=match):
        throttled(**kwargs)  # type: ignore[arg-type]


def test_limits_must_be_limits() -> None:
    """Positional arguments are Limit objects."""
    with pytest.raises(InvalidType, match="'60/min'"):
        throttled("60/min")  # type: ignore[arg-type]


def test_stacked_consume_conflict() -> None:
    """Two stacked throttles may not both say how much tpm a call takes."""
    with pytest.raises(InvalidInput, match="'tpm'"):

        @throttled(tpm=10, consume={"tpm": 2})
        @throttled(tpm=10, key="x", consume={"tpm": 3})
        def call() -> None:
            return None


def test_current_lease_is_scoped() -> None:
    """current_lease() is the lease of the running body, and None outside it."""
    lease = Limiter(MemoryStore()).acquire("k", [Limit.per_second("rps", 1)])
    assert current_lease() is None
    with lease_scope(lease):
        assert current_lease() is lease
    assert current_lease() is None


def test_a_formatted_value_cannot_forge_another_key() -> None:
    """Values formatted into a key template are escaped: an org named "7:user:9" gets a key
    of its own, not the key of user 9 in org 7."""

    @throttled(rps=1, key="org:{org}")
    def by_org(org: str) -> None:
        return None

    @throttled(rps=1, key="org:{org}:user:{user}")
    def by_user(org: str, user: str) -> None:
        return None

    forged = plan(throttles_of(by_org), by_org, ("7:user:9",), {}, "t")
    real = plan(throttles_of(by_user), by_user, ("7", "9"), {}, "t")
    assert list(forged.target) == ["org:7%3Auser%3A9"]
    assert list(real.target) == ["org:7:user:9"]
    escaped = plan(throttles_of(by_org), by_org, ("7%3Auser%3A9",), {}, "t")
    assert list(escaped.target) == ["org:7%253Auser%253A9"]
