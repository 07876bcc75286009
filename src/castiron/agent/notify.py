"""The service manager's notification protocol (``sd_notify``): readiness, watchdog, stopping.

Owns :class:`Notifier`: one datagram per state change to the Unix socket named by
``$NOTIFY_SOCKET`` (a path, or an abstract name written ``@name``), each a few
newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once the control socket answers and
the routes are back, ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC`` while the event loop runs,
``STOPPING=1`` when it begins to stop. Without ``$NOTIFY_SOCKET`` (not started by systemd with
``Type=notify``) it does nothing. A failed send is logged, never raised: the agent must not
stop serving because its supervisor went away.

It imports only the standard library and knows nothing of routes or instances.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("castiron.agent.notify")


@dataclass(frozen=True)
class Notifier:
    """Where notifications go, and how often the watchdog wants a ping."""

    address: str | None = None
    """``$NOTIFY_SOCKET``: a socket path, or ``@name`` for an abstract socket."""
    watchdog: float | None = None
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``); None: no watchdog."""

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """The notifier the service manager asked for through ``environ``.

        ``$WATCHDOG_PID``, when set, must be ``pid`` (else the watchdog is someone else's).
        """
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog: float | None = None
        try:
            usec = int(environ.get("WATCHDOG_USEC", "0"))
        except ValueError:
            usec = 0
        owner = environ.get("WATCHDOG_PID")
        if usec > 0 and (not owner or owner == str(pid)):
            watchdog = usec / 1_000_000 / 2
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens."""
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines (keys upper-cased) in one datagram; False when it failed or
        nobody listens."""
        if self.address is None:
            return False
        message = "".join(f"{key.upper()}={text}\n" for key, text in fields.items()).encode()
        target = self.address
        if target.startswith("@"):
            target = "\0" + target[1:]
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(message, target)
        except OSError as exc:
            log.warning("cannot notify the service manager at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str) -> bool:
        """``READY=1``, with this process as the main pid and a status line."""
        return self.send(ready=1, mainpid=os.getpid(), status=status)

    def stopping(self) -> bool:
        """``STOPPING=1``."""
        return self.send(stopping=1, status="stopping")

    async def keep_alive(self) -> None:
        """Ping the watchdog every :attr:`watchdog` seconds until cancelled (returns at once
        without a watchdog). Running on the event loop, a ping proves the loop is not stuck."""
        if self.watchdog is None or self.address is None:
            return
        while True:
            self.send(watchdog=1)
            await asyncio.sleep(self.watchdog)


__all__ = ["Notifier"]
