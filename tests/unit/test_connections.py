"""service.state.Connections and ServiceState.alone / alone_for: one client, or one between clients."""

from __future__ import annotations

import time

from service.config import Settings
from service.metrics import Metrics
from service.state import Connections, ServiceState


def test_connections_remember_when_more_than_one_was_open() -> None:
    conns = Connections()
    a, b = object(), object()
    conns.add(a)
    assert conns.crowded_at == -float("inf")  # one connection is not a crowd
    t0 = time.monotonic()
    conns.add(b)
    assert conns.crowded_at >= t0
    time.sleep(0.01)
    t1 = time.monotonic()
    conns.discard(b)  # the last moment two were open
    assert conns.crowded_at >= t1 and conns == {a}
    at = conns.crowded_at
    conns.discard(a)
    conns.discard(a)  # uvicorn may discard twice
    assert conns.crowded_at == at and not conns


def test_alone_for_needs_one_connection_and_no_second_one_lately() -> None:
    state = ServiceState(Settings(), Metrics(4))
    assert not state.alone() and not state.alone_for(0)  # connections unknown: never alone
    state.http_connections = conns = Connections()
    first = object()
    conns.add(first)
    assert state.alone() and state.alone_for(3600)  # never crowded
    conns.add(object())
    assert not state.alone() and not state.alone_for(0)
    conns.discard(next(c for c in conns if c is not first))
    assert state.alone() and state.alone_for(0) and not state.alone_for(60)
    conns.crowded_at -= 61
    assert state.alone_for(60)
