"""The builtin router in worker processes: one atomic switch, exact counters, crash restarts.

Every test of ``test_router.py``, ``test_router_hardening.py`` and ``test_builtin.py`` runs
against the worker pool too (the ``workers`` plane of the harness); these pin what only a pool
of processes can get wrong.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from castiron.traffic.base import ROUTER_RELEASE
from castiron.traffic.stats import BUCKETS_MS
from castiron.traffic.workers import WorkerPoolRouter
from testkit import wait_for
from traffic.backends import HttpBackend
from traffic.conftest import Harness, LoopThread, bset

MakeBackend = Callable[[str], HttpBackend]


@pytest.fixture
def pool(loop_thread: LoopThread) -> Iterator[Harness]:
    h = Harness("workers", WorkerPoolRouter(2), loop_thread)
    yield h
    h.close()


def _pool(h: Harness) -> WorkerPoolRouter:
    assert isinstance(h.router, WorkerPoolRouter)
    return h.router


class _Load:
    """Client threads on keep-alive connections recording when each request went out, when
    its answer came back and which backend answered it."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, float, str]] = []
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("GET", "/echo", headers={"Host": "web"})
                response = conn.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                with self.lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                continue
            got = time.monotonic()
            with self.lock:
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                else:
                    self.answers.append((sent, got, json.loads(body)["backend"]))
        conn.close()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)


def test_fifty_switches_under_load_fail_nothing_and_never_answer_from_the_old_release(
    pool: Harness, backends: MakeBackend
) -> None:
    a, b = backends("a"), backends("b")
    pool.apply(pool.config(bset("r0", a), drain_timeout=10))
    # (switch started, switch returned, backend every worker must use from then on)
    switches: list[tuple[float, float, str]] = [(0.0, time.monotonic(), "a")]
    load = _Load(pool.port)
    try:
        wait_for(lambda: len(load.answers) >= 20, what="traffic before the switches")
        for i in range(1, 51):
            backend = (a, b)[i % 2]
            started = time.monotonic()
            pool.apply(pool.config(bset(f"r{i}", backend), drain_timeout=10))
            switches.append((started, time.monotonic(), backend.name))
            time.sleep(0.02)
        count = len(load.answers)
        wait_for(lambda: len(load.answers) >= count + 20, what="traffic after the switches")
    finally:
        load.finish()
    assert load.failures == []
    stale = []
    for sent, got, backend in load.answers:
        # the last switch that had returned when the request went out
        k = max(i for i, (_, returned, _) in enumerate(switches) if returned <= sent)
        next_started = switches[k + 1][0] if k + 1 < len(switches) else float("inf")
        if got < next_started and backend != switches[k][2]:
            stale.append((k, backend))
    assert stale == []
    assert len(load.answers) > 100


def test_counters_are_exactly_what_clients_saw(pool: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    pool.apply(pool.config(bset("A", a)))
    seen: dict[int, int] = {}
    # new connections each time: both workers take some of them
    for i in range(120):
        status = (200, 404, 503)[i % 3]
        conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
        conn.request("GET", f"/echo?status={status}", headers={"Host": "web"})
        response = conn.getresponse()
        response.read()
        conn.close()
        seen[response.status] = seen.get(response.status, 0) + 1
    for _ in range(5):  # refused by the router itself, before any release is picked
        with socket.create_connection(("127.0.0.1", pool.port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400 ")
    assert seen == {200: 40, 404: 40, 503: 40}
    counters = pool.counters()
    c = counters["A"]
    assert (c.requests, c.responses_2xx, c.responses_4xx, c.responses_5xx) == (120, 40, 40, 40)
    assert c.histogram[-1][1] == 120
    assert [bound for bound, _ in c.histogram[:-1]] == [float(b) for b in BUCKETS_MS]
    assert c.latency_sum_ms > 0
    router = counters[ROUTER_RELEASE]
    assert (router.requests, router.responses_4xx) == (5, 5)


def _kill_one_and_keep_connecting(pool: Harness, backends: MakeBackend) -> tuple[int, list[str]]:
    router = _pool(pool)
    pool.apply(pool.config(bset("A", backends("a"))))
    refused: list[str] = []
    served = 0
    stop = threading.Event()

    def connect() -> None:
        nonlocal served
        while not stop.is_set():
            try:
                conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=30)
                conn.request("GET", "/echo", headers={"Host": "web", "Connection": "close"})
                conn.getresponse().read()
                conn.close()
                served += 1
            except ConnectionRefusedError as exc:
                refused.append(str(exc))
            except (OSError, http.client.HTTPException):
                pass  # a connection the killed worker had accepted dies with it
            time.sleep(0.002)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    try:
        wait_for(lambda: served >= 10, what="traffic before the kill")
        before = router.pids()
        os.kill(before[0], signal.SIGKILL)
        wait_for(
            lambda: len(router.pids()) == router.size and before[0] not in router.pids(),
            what="a replacement worker",
        )
        now = served
        wait_for(lambda: served >= now + 20, what="traffic after the replacement")
    finally:
        stop.set()
        thread.join(30)
    return router.restarts, refused


@pytest.mark.parametrize("size", [1, 2])
def test_a_killed_worker_is_replaced_and_no_connection_is_refused(
    loop_thread: LoopThread, backends: MakeBackend, size: int
) -> None:
    h = Harness("workers", WorkerPoolRouter(size), loop_thread)
    try:
        restarts, refused = _kill_one_and_keep_connecting(h, backends)
    finally:
        h.close()
    assert (restarts, refused) == (1, [])


def test_a_replacement_worker_serves_the_current_route_and_counters_survive(
    pool: Harness, backends: MakeBackend
) -> None:
    a, b = backends("a"), backends("b")
    pool.apply(pool.config(bset("A", a)))
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
        conn.request("GET", "/echo", headers={"Host": "web"})
        conn.getresponse().read()
        conn.close()
    assert pool.counters()["A"].requests == 10  # read: a worker's counts are kept when it dies
    pool.apply(pool.config(bset("B", b)))
    router = _pool(pool)
    for pid in router.pids():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: router.restarts == 2 and len(router.pids()) == 2, what="replacements")
    for _ in range(10):
        conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=10)
        conn.request("GET", "/echo", headers={"Host": "web"})
        assert json.loads(conn.getresponse().read())["backend"] == "b"
        conn.close()
    counters = pool.counters()
    assert (counters["A"].requests, counters["B"].requests) == (10, 10)


def test_removing_a_route_drains_every_worker(pool: Harness, backends: MakeBackend) -> None:
    a = backends("a")
    pool.apply(pool.config(bset("A", a), drain_timeout=10))
    results: list[int] = []

    def slow(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", pool.port, timeout=30)
        conn.request("GET", "/echo?sleep=0.5", headers={"Host": "web"})
        results.append(conn.getresponse().status)
        conn.close()

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: a.in_flight >= 6, what="requests in flight in the workers")
    pool.lt.run(pool.router.remove(pool.env))
    assert results == [200] * 6  # remove returned only once every worker had drained
    for t in threads:
        t.join(10)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pool.port), timeout=5).close()


def test_a_bad_worker_count_is_refused() -> None:
    from castiron.errors import RouterError

    with pytest.raises(RouterError, match=r"^router workers: 0 is not at least 1$"):
        WorkerPoolRouter(0)


def test_merged_counters_add_up_and_percentiles_come_from_the_summed_histogram() -> None:
    from castiron.traffic.stats import ReleaseStats, merge_counters

    one, two, both = ReleaseStats("A"), ReleaseStats("A"), ReleaseStats("A")
    for i in range(100):
        stats = one if i % 3 else two
        for s in (stats, both):
            s.requests += 1
            s.observe(200 if i % 4 else 503, float(i))
    other = ReleaseStats("B")
    other.requests = 1
    other.observe(404, 3.0)
    merged = merge_counters([one.snapshot(), other.snapshot()], [two.snapshot()])
    assert [c.release for c in merged] == ["A", "B"]
    assert merged[0] == both.snapshot()
    assert merged[1] == other.snapshot()


def test_a_connection_not_yet_read_when_the_agent_dies_is_served_not_cut(
    loop_thread: LoopThread, backends: MakeBackend
) -> None:
    """The agent dies (the pool's end of the channel goes away) just after a worker accepted a
    connection whose request it has not read yet: the worker, going away, still answers it."""
    h = Harness("workers", WorkerPoolRouter(1), loop_thread)
    try:
        a = backends("a")
        h.apply(h.config(bset("A", a)))
        router = _pool(h)
        (worker,) = [p for p in router._procs.values() if p.alive]
        sock = socket.create_connection(("127.0.0.1", h.port), timeout=10)
        time.sleep(0.3)  # accepted by the worker (nothing else accepts), nothing sent yet

        def lifeline_cut() -> None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(worker.channel.fileno())
            worker.channel.shutdown(socket.SHUT_RDWR)

        loop_thread.call(lifeline_cut)
        time.sleep(0.1)  # the worker saw its channel end and started going away
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: web\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b'"backend": "a"' in answer or b'"backend":"a"' in answer
        assert worker.proc.wait(timeout=10) == 0
    finally:
        h.close()
