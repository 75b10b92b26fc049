"""A Lua write that a replica has too before it counts: the script, then `WAIT`, on one connection.

Redis replicates asynchronously: a write the primary acknowledged and had not
yet sent to its replica dies with the primary. `WAIT <n> <ms>` blocks until
`n` replicas acknowledged every write *of the connection that sends it* (or
the timeout passes) and answers how many did. So the script and its WAIT must
share a connection:

- on one Redis, a non-transactional pipeline (redis-py holds one connection
  for the whole batch);
- on a Redis Cluster, not `RedisCluster.wait()`: redis-py routes WAIT to every
  node, each on another pooled connection that wrote nothing, and sums the
  answers, so it waits for nothing. Instead the pair goes to the node that owns
  the script's slot with `ClusterNode.execute_pipeline`, which also holds one
  connection for the whole batch.

A primary whose WAIT came back short (its replica is dead or was just
promoted away, so it has none) would make every append on its slots wait out
the whole timeout. `ShortOfReplicas` remembers such a node for HOLD_SECONDS:
meanwhile its appends skip WAIT (still reported as unreplicated, 0 replicas),
and the first append after that probes it with WAIT again.

The cluster path does no retry of its own after a connection error: whether
the script ran is then unknown, and only the caller knows how to check (the
session store compares message hashes). A redirect (MOVED, ASK, TRYAGAIN,
CLUSTERDOWN) means the script did not run: the client's slot map is refreshed
through an ordinary keyed read, which follows redirects and waits out a
failover with the client's own retries, and the pair is sent again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    NoScriptError,
    SlotNotCoveredError,
    TryAgainError,
)

from app.stores.batch import batch
from app.stores.scripts import Call

T = TypeVar("T")
# Refused before the script ran: safe to send again once the slot map is fresh.
# (MovedError is an AskError.)
REFUSED = (AskError, TryAgainError, ClusterDownError, SlotNotCoveredError)
# How long redirects are followed before the refusal is the caller's error.
REDIRECT_SECONDS = 10.0
REFUSED_PAUSE_SECONDS = 0.05
HOLD_SECONDS = 5.0


@dataclass
class ShortOfReplicas:
    """Nodes whose last WAIT saw too few replicas, until when WAIT is skipped on them."""

    hold_seconds: float = HOLD_SECONDS
    until: dict[str, float] = field(default_factory=dict)

    def skip(self, node: str) -> bool:
        return time.monotonic() < self.until.get(node, 0.0)

    def saw(self, node: str, acked: int, wanted: int) -> None:
        if acked < wanted:
            self.until[node] = time.monotonic() + self.hold_seconds
        else:
            self.until.pop(node, None)


def _script(call: Call[Any], by_source: bool) -> tuple[Any, ...]:
    s = call.script
    head = ("EVAL", s.source) if by_source else ("EVALSHA", s.sha)
    return (*head, s.numkeys, *call.keys, *call.args)


async def arun_waited(
    client: aredis.Redis, call: Call[T], replicas: int, timeout_ms: int,
    *, before: Sequence[tuple[Any, ...]] = (), short: ShortOfReplicas | None = None,
) -> tuple[T, int]:
    """Run `call`, then `WAIT replicas timeout_ms` on the same connection: (result,
    replicas that acknowledged the write). The commands `before` run first in the
    same round trip (one Redis only; on a cluster the caller sends them before).
    With `short`, a node that lately came back short is not waited on (0 replicas)."""
    short = short or ShortOfReplicas(hold_seconds=0.0)
    if isinstance(client, RedisCluster):
        return await _on_slot_node(client, call, replicas, timeout_ms, short)
    by_source = False
    first = list(before)
    while True:
        waiting = not short.skip("")
        wait = [("WAIT", replicas, timeout_ms)] if waiting else []
        results = await batch(client, [*first, _script(call, by_source), *wait])
        if not waiting:
            results.append(0)
        # Not unpacked into `before`: the retry below would send these replies as commands.
        *replies, raw, acked = results
        for result in replies:
            if isinstance(result, Exception):
                raise result
        if isinstance(raw, NoScriptError) and not by_source:
            # The server lost its script cache (a restart, a failover, SCRIPT FLUSH): EVAL
            # caches it again. The commands before already ran: only the script and WAIT.
            by_source, first = True, []
            continue
        return _settled(call, raw, acked, replicas, short, "" if waiting else None)


def _settled(
    call: Call[T], raw: Any, acked: Any, replicas: int, short: ShortOfReplicas,
    waited_on: str | None,
) -> tuple[T, int]:
    """The script's answer and the replicas WAIT counted; `waited_on` names the node
    whose WAIT ran (None: it was skipped), which `short` then remembers."""
    if isinstance(raw, Exception):
        raise raw
    if isinstance(acked, Exception):
        raise acked
    if waited_on is not None:
        short.saw(waited_on, int(acked), replicas)
    return call.parse(raw), int(acked)


async def _on_slot_node(
    client: RedisCluster, call: Call[T], replicas: int, timeout_ms: int,
    short: ShortOfReplicas,
) -> tuple[T, int]:
    by_source = False
    deadline = time.monotonic() + REDIRECT_SECONDS
    await client.initialize()  # a fresh client has no slot map yet (at once when it has)
    while True:
        node: ClusterNode | None = client.get_node_from_key(call.keys[0])
        if node is None:  # the slot map has no owner for it right now
            raise SlotNotCoveredError(f"no node serves the slot of {call.keys[0]}")
        script = PipelineCommand(0, *_script(call, by_source))
        waiting = not short.skip(node.name)
        wait = PipelineCommand(1, "WAIT", replicas, timeout_ms)
        # One connection for both (raises on a connection failure).
        await node.execute_pipeline([script, wait] if waiting else [script])
        raw, acked = script.result, (wait.result if waiting else 0)
        if isinstance(raw, NoScriptError) and not by_source:
            by_source = True
            continue
        if isinstance(raw, REFUSED) and time.monotonic() < deadline:
            await client.exists(call.keys[0])  # the cluster client refreshes its slot map
            await asyncio.sleep(REFUSED_PAUSE_SECONDS)
            continue
        return _settled(call, raw, acked, replicas, short, node.name if waiting else None)
