"""Client of the agent's control API over its Unix socket; the only way in for other layers.

Owns the typed :class:`AgentClient` (one HTTP/1.1 request per call over the Unix socket) and
the Unix socket addressing the agent's processes share (:func:`unix_address`,
:func:`unix_connect`). The values it sends and receives and their strict JSON codec live in
:mod:`castiron.agent.wire` and are re-exported here; finding, starting and stopping the agent
is :mod:`castiron.agent.lifecycle`.

It sits low in the layers: it imports only the wire, :mod:`castiron.model`,
:mod:`castiron.errors`, the HTTP/1.1 codec (:mod:`castiron.httpcodec`) and the standard
library. It must not know the routers, the
supervisor or the daemon's internals; route configurations travel as JSON objects (a
dataclass such as ``castiron.traffic.base.RouteConfig`` is turned into one by
:func:`to_json`).
"""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from castiron.agent.wire import (
    API_VERSION,
    AgentEvent,
    AgentStatus,
    DriftWatch,
    EventKind,
    InstanceRecord,
    InstanceStateName,
    SpawnRequest,
    from_json,
    to_json,
)
from castiron.errors import AgentError, AgentRefusedError, NotFoundError, UsageError
from castiron.httpcodec import BlockingResponse, HttpParseError, encode_request_head
from castiron.model import HealthCheck

T = TypeVar("T")


# --- Unix socket HTTP -----------------------------------------------------------------------------


def unix_address(path: Path) -> tuple[str, int | None]:
    """A path ``bind``/``connect`` accept even beyond the 107-byte ``sun_path`` limit.

    Long paths go through ``/proc/self/fd/N/NAME`` of a directory fd; the caller closes the
    returned fd (``None`` for short paths) once the call is done.
    """
    text = os.fsdecode(path)
    if len(os.fsencode(text)) < 100:
        return text, None
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{dir_fd}/{path.name}", dir_fd


def unix_connect(path: Path, timeout: float | None) -> socket.socket:
    """A stream socket connected to the Unix socket at ``path``.

    Raises:
        OSError: as ``connect`` does (``FileNotFoundError``, ``ConnectionRefusedError``, ...).
    """
    address, dir_fd = unix_address(path)  # may raise: no socket is open yet
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    finally:
        if dir_fd is not None:
            os.close(dir_fd)
    return sock


_MAX_HEAD = 64 * 1024


def _request_bytes(method: str, target: str, payload: bytes | None) -> bytes:
    headers = [("Host", "castiron-agent"), ("Connection", "close")]
    if payload is not None:
        headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
    elif method in ("POST", "PUT"):
        headers.append(("Content-Length", "0"))
    return encode_request_head(method, target, headers) + (payload or b"")


class AgentClient:
    """Typed calls to one agent's control API (one HTTP/1.1 connection per call).

    Every method raises :class:`AgentError` when the agent cannot be reached or refuses the
    request (with the agent's reason), and :class:`NotFoundError` for an unknown instance or
    environment.
    """

    def __init__(self, socket_path: Path, *, timeout: float = 30.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    # -- plumbing

    def _open(
        self, method: str, path: str, body: object | None = None, timeout: float | None = None
    ) -> BlockingResponse[socket.socket]:
        # A plain HTTP/1.1 exchange over the socket: http.client would pull in ssl and email
        # (~25 ms of imports) for what is one request and one Connection: close response.
        payload = None if body is None else json.dumps(body).encode()
        target = f"/{API_VERSION}{path}"
        try:
            sock = unix_connect(self.socket_path, timeout or self.timeout)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentError(f"agent not running at {self.socket_path}") from exc
        except OSError as exc:
            raise AgentError(f"agent at {self.socket_path} did not answer: {exc}") from exc
        try:
            sock.sendall(_request_bytes(method, target, payload))
            response = BlockingResponse(sock, max_head=_MAX_HEAD)
        except (OSError, ValueError, HttpParseError) as exc:
            sock.close()
            raise AgentError(f"agent at {self.socket_path} did not answer: {exc}") from exc
        if response.status >= 400:
            try:
                raw = response.read()
            except (OSError, HttpParseError):
                raw = b""
            finally:
                sock.close()
            try:
                reason = str(json.loads(raw)["error"])
            except (ValueError, KeyError, TypeError):
                reason = raw.decode(errors="replace").strip() or response.reason
            if response.status == 404:
                raise NotFoundError(f"agent: {reason}")
            raise AgentRefusedError(f"agent refused {method} {target}: {reason}")
        return response

    def _call(
        self, method: str, path: str, body: object | None = None, timeout: float | None = None
    ) -> Any:
        response = self._open(method, path, body, timeout)
        try:
            raw = response.read()
        except (OSError, HttpParseError) as exc:
            raise AgentError(f"agent at {self.socket_path} broke off: {exc}") from exc
        finally:
            response.sock.close()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise AgentError(f"agent at {self.socket_path} sent invalid JSON") from exc

    def _decode(self, cls: type[T], data: object) -> T:
        try:
            return from_json(cls, data, "response")
        except UsageError as exc:
            raise AgentError(
                f"agent at {self.socket_path} sent an unexpected answer: {exc}"
            ) from exc

    # -- agent

    def health(self) -> bool:
        """True when the agent answers ``GET /v1/health``."""
        try:
            return bool(self._call("GET", "/health", timeout=5.0).get("ok"))
        except AgentError:
            return False

    def status(self) -> AgentStatus:
        """The agent's status. Raises AgentError."""
        return self._decode(AgentStatus, self._call("GET", "/status"))

    def shutdown(self) -> None:
        """Ask the agent to stop gracefully (it answers first, then stops). Raises AgentError."""
        self._call("POST", "/shutdown", {})

    def events(self, since: int = 0) -> list[AgentEvent]:
        """Events with ``seq > since``, oldest first. Raises AgentError."""
        data = self._call("GET", f"/events?since={int(since)}")
        return [self._decode(AgentEvent, e) for e in data.get("events", [])]

    def set_metrics(self, listen: str | None) -> str | None:
        """Start (or move, or with ``None`` stop) the Prometheus listener; returns its address.

        Raises:
            AgentError: when the address is refused (not loopback, in use, ...).
        """
        data = self._call("PUT", "/metrics", {"listen": listen})
        value = data.get("listen")
        return str(value) if value is not None else None

    # -- routes

    def put_route(self, environment: str, config: object) -> None:
        """Apply a route configuration (a ``RouteConfig`` or its JSON object) atomically.

        Raises:
            AgentError: when the agent or its router refuses it.
        """
        body = config if isinstance(config, Mapping) else to_json(config)
        self._call("PUT", f"/routes/{_quote(environment)}", body)

    def flip_route(
        self,
        environment: str,
        config: object,
        *,
        expect: str | None,
        check: HealthCheck,
        env: Mapping[str, str],
    ) -> dict[str, Any]:
        """Switch to warm backends in one request (``POST /v1/routes/{env}/flip``): the agent
        checks that the route serves release ``expect`` (None: nothing), probes each backend of
        ``config``'s stable set once with ``check`` (``env`` is a command check's environment)
        and only then applies ``config``. Returns ``{"flipped": bool, "reason": str,
        "previous": route JSON or None}``; when ``flipped`` is false nothing changed.

        Raises:
            AgentError: when the agent cannot be reached or refuses the request.
        """
        body = {
            "route": config if isinstance(config, Mapping) else to_json(config),
            "expect": expect,
            "check": to_json(check),
            "env": dict(env),
        }
        data = self._call("POST", f"/routes/{_quote(environment)}/flip", body)
        if not isinstance(data, dict) or not isinstance(data.get("flipped"), bool):
            raise AgentError(f"agent at {self.socket_path} sent an unexpected flip answer")
        return data

    def route(self, environment: str) -> dict[str, Any]:
        """The environment's route configuration as JSON. Raises NotFoundError, AgentError."""
        return dict(self._call("GET", f"/routes/{_quote(environment)}"))

    def routes(self) -> dict[str, dict[str, Any]]:
        """Every route configuration by environment. Raises AgentError."""
        return dict(self._call("GET", "/routes").get("routes", {}))

    def delete_route(self, environment: str) -> None:
        """Drain and close the environment's listener. Raises NotFoundError, AgentError."""
        self._call("DELETE", f"/routes/{_quote(environment)}")

    def route_counters(self, environment: str) -> list[dict[str, Any]]:
        """Per-release counters (``ReleaseCounters`` as JSON). Raises NotFoundError, AgentError."""
        return list(self._call("GET", f"/routes/{_quote(environment)}/counters")["counters"])

    # -- drift watches

    def put_watch(self, watch: DriftWatch) -> None:
        """Register (or replace) the drift check of ``watch.environment``. Raises AgentError."""
        self._call("PUT", f"/watches/{_quote(watch.environment)}", to_json(watch))

    def delete_watch(self, environment: str) -> None:
        """Stop the drift check of ``environment``. Raises NotFoundError, AgentError."""
        self._call("DELETE", f"/watches/{_quote(environment)}")

    def watches(self) -> list[DriftWatch]:
        """Every registered drift check. Raises AgentError."""
        data = self._call("GET", "/watches").get("watches", [])
        return [self._decode(DriftWatch, w) for w in data]

    # -- instances

    def spawn(self, request: SpawnRequest) -> InstanceRecord:
        """Start an instance process. Raises AgentError (with the reason it could not start)."""
        return self._decode(InstanceRecord, self._call("POST", "/instances", to_json(request)))

    def instances(self, environment: str | None = None) -> list[InstanceRecord]:
        """Every supervised instance (of one environment when given). Raises AgentError."""
        query = f"?environment={_quote(environment)}" if environment else ""
        data = self._call("GET", f"/instances{query}")
        return [self._decode(InstanceRecord, r) for r in data.get("instances", [])]

    def instance(self, instance_id: str) -> InstanceRecord:
        """One instance's record. Raises NotFoundError, AgentError."""
        return self._decode(InstanceRecord, self._call("GET", f"/instances/{_quote(instance_id)}"))

    def stop_instance(self, instance_id: str, grace: float = 10.0) -> InstanceRecord:
        """SIGTERM the instance, SIGKILL it after ``grace`` s, forget it; returns its last record.

        Raises:
            NotFoundError: when the agent does not know the instance.
            AgentError: when the agent cannot be reached.
        """
        data = self._call(
            "DELETE",
            f"/instances/{_quote(instance_id)}?grace={float(grace)}",
            timeout=self.timeout + grace,
        )
        return self._decode(InstanceRecord, data)

    def instance_logs(self, instance_id: str, lines: int = 100) -> str:
        """The last ``lines`` lines of the instance's output. Raises NotFoundError, AgentError."""
        data = self._call("GET", f"/instances/{_quote(instance_id)}/logs?lines={int(lines)}")
        return str(data["text"])

    def follow_instance_logs(self, instance_id: str, lines: int = 10) -> Iterator[bytes]:
        """The last ``lines`` lines, then new output as it comes, until the instance exits.

        Raises:
            NotFoundError, AgentError: as :meth:`instance_logs`.
        """
        response = self._open(
            "GET", f"/instances/{_quote(instance_id)}/logs?lines={int(lines)}&follow=1"
        )
        response.sock.settimeout(None)
        try:
            while chunk := response.read1(65536):
                yield chunk
        except (OSError, HttpParseError) as exc:
            raise AgentError(f"agent at {self.socket_path} broke off: {exc}") from exc
        finally:
            response.sock.close()


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="")


__all__ = [
    "API_VERSION",
    "AgentClient",
    "AgentEvent",
    "AgentStatus",
    "DriftWatch",
    "EventKind",
    "InstanceRecord",
    "InstanceStateName",
    "SpawnRequest",
    "from_json",
    "to_json",
    "unix_address",
    "unix_connect",
]
