"""`translate`: which lower-level errors become a clear 503, and which stay a 500."""

from __future__ import annotations

import pytest
import redis.crc
import redis.exceptions as rexc

from app.errors import RedisUnavailable, translate


def _raised(fn: object, *args: object) -> BaseException:
    assert callable(fn)
    try:
        fn(*args)
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def test_an_attribute_error_raised_inside_redis_py_is_a_503() -> None:
    # What a connection torn down under a write raises during a failover, made here
    # by another redis-py function tripping over a None the same way.
    exc = _raised(redis.crc.key_slot, None)
    assert isinstance(exc, AttributeError)
    mapped = translate(exc)
    assert isinstance(mapped, RedisUnavailable) and mapped.status == 503


def test_an_attribute_error_of_our_own_stays_unexpected() -> None:
    def ours() -> None:
        None.writelines  # type: ignore[attr-defined]  # noqa: B018

    assert translate(_raised(ours)) is None


@pytest.mark.parametrize("exc", [
    rexc.ClusterDownError("CLUSTERDOWN The cluster is down"),
    rexc.MasterDownError("MASTERDOWN Link with MASTER is down"),
    rexc.TryAgainError("TRYAGAIN Multiple keys request during rehashing of slot"),
    rexc.MovedError("3999 127.0.0.1:6381"),
    rexc.AskError("3999 127.0.0.1:6381"),
    rexc.ReadOnlyError("READONLY You can't write against a read only replica."),
    rexc.ResponseError("NOREPLICAS Not enough good replicas to write."),
    rexc.SlotNotCoveredError("Slot 5 not covered by the cluster"),
    rexc.RedisClusterException("Redis Cluster cannot be connected. Please provide at least "
                               "one reachable node: Error 111"),
])
def test_what_redis_raises_while_a_primary_switches_is_a_503(exc: Exception) -> None:
    mapped = translate(exc)
    assert isinstance(mapped, RedisUnavailable) and mapped.status == 503


@pytest.mark.parametrize("exc", [
    rexc.RedisClusterException("EVALSHA - all keys must map to the same key slot"),
    rexc.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
])
def test_a_mistake_of_ours_on_a_cluster_is_not_disguised_as_an_outage(exc: Exception) -> None:
    assert translate(exc) is None
