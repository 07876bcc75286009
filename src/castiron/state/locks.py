"""Environment locks: one lease per environment, so two mutators never act at once.

Owns the lease rules. A *lease* is held by a live process and kept alive by a heartbeat thread
that renews it every ttl/3; if the process dies, the lease expires at its ttl, and at once when
the holder ran on this host and its pid is gone. A *manual* lock (``castiron lock acquire``) has
no heartbeat and no process: it holds until released, broken or its ttl (default one hour) runs
out. Taking, releasing and breaking a lock are audited mutations; only the heartbeat's renewal
is not (see :meth:`castiron.state.base.StateStore.renew_lease`).

The clock is injected. This module knows nothing of deployments, the CLI or the environment
variables; the caller passes the actor (through the store), the host and the pid.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

from castiron.errors import CastironError, LockedError, NotFoundError
from castiron.state.base import (
    AuditDraft,
    Clock,
    Lease,
    LeaseKind,
    StateStore,
    StateTx,
    format_time,
    format_time_short,
)
from castiron.values import value

DEFAULT_TTL = 15.0
"""Seconds a lease outlives its last heartbeat."""

MANUAL_TTL = 3600.0
"""Seconds a manual lock holds unless released or broken."""

_FIRST_POLL = 0.05
_MAX_POLL = 1.0


def pid_alive(pid: int) -> bool:
    """True when process ``pid`` exists on this host and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


@value
class LockStatus:
    """A lease and whether it still holds."""

    lease: Lease
    live: bool
    reason: str
    """``held``, or why it no longer holds (expired, holder gone)."""

    def as_json(self) -> dict[str, Any]:
        """The status as a JSON-ready object (the token stays secret)."""
        x = self.lease
        return {
            "environment": x.environment,
            "holder": x.holder,
            "pid": x.pid,
            "host": x.host,
            "purpose": x.purpose,
            "kind": x.kind,
            "acquired": format_time_short(x.acquired),
            "expires": format_time_short(x.expires),
            "live": self.live,
            "reason": self.reason,
        }


def describe(lease: Lease) -> str:
    """``environment 'staging' is locked by alice@host (pid 123) for "deploy v2" since ...``."""
    who = (
        f"(pid {lease.pid})"
        if lease.kind == "lease"
        else f"(manual lock until {format_time_short(lease.expires)})"
    )
    return (
        f"environment {lease.environment!r} is locked by {lease.holder} {who} "
        f'for "{lease.purpose}" since {format_time_short(lease.acquired)}'
    )


class _Held(Exception):
    """Raised inside a transaction to roll it back when a live lease is in the way."""

    def __init__(self, lease: Lease) -> None:
        super().__init__(lease.environment)
        self.lease = lease


class HeldLock:
    """A lease this process holds; a context manager that releases it on exit.

    While it is held, a heartbeat thread renews it every ttl/3. If the lease is broken or lost
    meanwhile, :attr:`lost` turns true and :meth:`check` raises.
    """

    def __init__(self, manager: LockManager, lease: Lease, ttl: float, heartbeat: bool) -> None:
        self._manager = manager
        self._lease = lease
        self._ttl = ttl
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._released = False
        self._thread: threading.Thread | None = None
        if heartbeat:
            self._thread = threading.Thread(
                target=self._beat, name=f"lock-heartbeat-{lease.environment}", daemon=True
            )
            self._thread.start()

    @property
    def lease(self) -> Lease:
        """The lease as acquired (its expiry moves with each heartbeat)."""
        return self._lease

    @property
    def lost(self) -> bool:
        """True when the lease was broken or taken over while held."""
        return self._lost.is_set()

    def check(self) -> None:
        """Make sure the lease is still ours.

        Raises:
            LockedError: when it was broken or lost.
        """
        if self.lost:
            raise LockedError(
                f"the lock on environment {self._lease.environment!r} was lost (broken by "
                "someone else, or the heartbeat could not renew it); stopping",
                self._lease.environment,
            )

    def _beat(self) -> None:
        interval = self._ttl / 3.0
        store, clock = self._manager.store, self._manager.clock
        while not self._stop.wait(interval):
            try:
                ok = store.renew_lease(
                    self._lease.environment,
                    self._lease.token,
                    clock.now() + timedelta(seconds=self._ttl),
                )
            except CastironError:
                continue  # busy database: try again next beat, the ttl leaves room
            if not ok:
                self._lost.set()
                return

    def release(self) -> bool:
        """Stop the heartbeat and give the lease back (audited). False if it was already gone.

        Raises:
            StateError: when the database cannot be written.
        """
        if self._released:
            return False
        self._released = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self._manager.give_back(self._lease)

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class LockManager:
    """Takes, gives back, breaks and reports environment locks in one store."""

    def __init__(
        self,
        store: StateStore,
        *,
        host: str | None = None,
        pid: int | None = None,
        clock: Clock | None = None,
        is_alive: Callable[[int], bool] = pid_alive,
    ) -> None:
        self.store = store
        self.clock = clock if clock is not None else store.clock
        self.host = host if host is not None else socket.gethostname()
        self.pid = pid if pid is not None else os.getpid()
        self._is_alive = is_alive

    # -- rules -----------------------------------------------------------------------------

    def liveness(self, lease: Lease, now: datetime | None = None) -> tuple[bool, str]:
        """Whether ``lease`` still holds at ``now``, and why not when it does not."""
        moment = now if now is not None else self.clock.now()
        if moment >= lease.expires:
            return False, f"expired at {format_time_short(lease.expires)}"
        if (
            lease.kind == "lease"
            and lease.pid is not None
            and lease.host == self.host
            and not self._is_alive(lease.pid)
        ):
            return False, f"holder process {lease.pid} on {lease.host} is gone"
        return True, "held"

    def status(self, environment: str | None = None) -> list[LockStatus]:
        """Every recorded lock (or the one of ``environment``), live or not."""
        leases = (
            self.store.list_leases()
            if environment is None
            else [x for x in [self.store.get_lease(environment)] if x is not None]
        )
        now = self.clock.now()
        return [LockStatus(x, *self.liveness(x, now)) for x in leases]

    # -- taking ------------------------------------------------------------------------------

    def acquire(
        self,
        environment: str,
        purpose: str,
        *,
        ttl: float = DEFAULT_TTL,
        wait: float = 0.0,
        heartbeat: bool = True,
        on_wait: Callable[[Lease], None] | None = None,
    ) -> HeldLock:
        """Take ``environment``'s lease for this process, renewed by a heartbeat.

        Waits up to ``wait`` seconds (polling with backoff) when another live holder has it;
        ``on_wait`` is called once with the holder's lease when the wait starts.

        Raises:
            LockedError: naming the holder, when it is still held after ``wait``.
            StateError: when the database cannot be written.
        """
        lease = self._take(environment, purpose, ttl, wait, "lease", self.pid, on_wait)
        return HeldLock(self, lease, ttl, heartbeat)

    def acquire_manual(
        self,
        environment: str,
        message: str,
        *,
        ttl: float = MANUAL_TTL,
        wait: float = 0.0,
        on_wait: Callable[[Lease], None] | None = None,
    ) -> Lease:
        """Take a maintenance lock with no heartbeat; it holds until released or ``ttl``.

        ``on_wait`` is called once with the holder's lease when the call starts waiting.

        Raises:
            LockedError: naming the holder, when it is still held after ``wait``.
            StateError: when the database cannot be written.
        """
        return self._take(environment, message, ttl, wait, "manual", None, on_wait)

    def _take(
        self,
        environment: str,
        purpose: str,
        ttl: float,
        wait: float,
        kind: LeaseKind,
        pid: int | None,
        on_wait: Callable[[Lease], None] | None,
    ) -> Lease:
        if ttl <= 0:
            raise ValueError("a lock's ttl must be positive")
        deadline = self.clock.now() + timedelta(seconds=max(0.0, wait))
        delay = _FIRST_POLL
        while True:
            blocker = self._try_take(environment, purpose, ttl, kind, pid)
            if isinstance(blocker, _Taken):
                return blocker.lease
            remaining = (deadline - self.clock.now()).total_seconds()
            if remaining <= 0:
                hint = (
                    f"; still held after waiting {wait:g}s"
                    if wait > 0
                    else "; retry with --lock-wait SECONDS"
                )
                raise LockedError(describe(blocker) + hint, environment)
            if on_wait is not None and delay == _FIRST_POLL:
                on_wait(blocker)
            self.clock.sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL)

    def _try_take(
        self, environment: str, purpose: str, ttl: float, kind: LeaseKind, pid: int | None
    ) -> _Taken | Lease:
        # A cheap read first, so waiters poll without taking the write lock.
        current = self.store.get_lease(environment)
        if current is not None and self.liveness(current)[0]:
            return current
        now = self.clock.now()
        lease = Lease(
            environment=environment,
            token=secrets.token_hex(16),
            holder=self.store.actor,
            pid=pid,
            host=self.host,
            purpose=purpose,
            kind=kind,
            acquired=now,
            expires=now + timedelta(seconds=ttl),
        )

        def apply(tx: StateTx) -> None:
            existing = tx.get_lease(environment)
            if existing is not None:
                live, why = self.liveness(existing, now)
                if live:
                    raise _Held(existing)
                tx.note(replaced={**_lease_json(existing), "why": why})
            tx.put_lease(lease)

        draft = AuditDraft(
            "lock.acquire",
            environment=environment,
            subject=purpose,
            to=lease.holder,
            details={**_lease_json(lease), "ttl": ttl},
        )
        try:
            self.store.mutate(draft, apply)
        except _Held as held:
            return held.lease
        return _Taken(lease)

    # -- giving back --------------------------------------------------------------------------

    def give_back(self, lease: Lease) -> bool:
        """Release ``lease`` if it is still the one recorded (audited). False when gone.

        Raises:
            StateError: when the database cannot be written.
        """
        current = self.store.get_lease(lease.environment)
        if current is None or current.token != lease.token:
            return False

        def apply(tx: StateTx) -> bool:
            now_held = tx.get_lease(lease.environment)
            if now_held is None or now_held.token != lease.token:
                raise _Held(lease)
            tx.delete_lease(lease.environment)
            return True

        draft = AuditDraft(
            "lock.release",
            environment=lease.environment,
            subject=lease.purpose,
            from_=lease.holder,
            details=_lease_json(lease),
        )
        try:
            return self.store.mutate(draft, apply)
        except _Held:
            return False

    def release_manual(self, environment: str) -> Lease:
        """Release this actor's manual lock on ``environment`` (audited).

        Raises:
            NotFoundError: when the environment is not locked.
            LockedError: when someone else (or a running process) holds it: use
                :meth:`break_lock`.
        """
        current = self.store.get_lease(environment)
        if current is None:
            raise NotFoundError(f"environment {environment!r} is not locked")
        if current.kind != "manual" or current.holder != self.store.actor:
            raise LockedError(
                describe(current) + f"; only its holder releases it (to remove it anyway: "
                f"castiron lock break {environment})",
                environment,
            )
        if not self.give_back(current):
            raise NotFoundError(f"environment {environment!r} is not locked")
        return current

    def break_lock(self, environment: str, reason: str = "") -> Lease:
        """Remove whatever lock ``environment`` has, whoever holds it (audited).

        Raises:
            NotFoundError: when the environment is not locked.
            StateError: when the database cannot be written.
        """

        before = self.store.get_lease(environment)
        if before is None:
            raise NotFoundError(f"environment {environment!r} is not locked")

        def apply(tx: StateTx) -> Lease:
            current = tx.get_lease(environment)
            if current is None:
                raise NotFoundError(f"environment {environment!r} is not locked")
            live, why = self.liveness(current)
            tx.note(broken={**_lease_json(current), "live": live, "why": why})
            tx.delete_lease(environment)
            return current

        draft = AuditDraft(
            "lock.break",
            environment=environment,
            subject=before.purpose,
            from_=before.holder,
            details={"reason": reason} if reason else {},
        )
        return self.store.mutate(draft, apply)


@value
class _Taken:
    lease: Lease


def _lease_json(lease: Lease) -> dict[str, Any]:
    return {
        "holder": lease.holder,
        "pid": lease.pid,
        "host": lease.host,
        "purpose": lease.purpose,
        "kind": lease.kind,
        "acquired": format_time(lease.acquired),
        "expires": format_time(lease.expires),
    }


__all__ = [
    "DEFAULT_TTL",
    "MANUAL_TTL",
    "HeldLock",
    "LockManager",
    "LockStatus",
    "describe",
    "pid_alive",
]
