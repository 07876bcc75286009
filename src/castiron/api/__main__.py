"""``python -m castiron.api CONFIG``: the ``castiron serve`` process.

``castiron serve`` validates its options and runs this entry point with them as one JSON
argument (like the agent daemon, the server is its own process). Settings are read here, at
the edge, from the process environment; so is each webhook's HMAC secret, named by variable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from castiron.api.events import Webhook
from castiron.errors import CastironError, UsageError
from castiron.settings import load_settings


def options_from(config: dict[str, Any], environ: dict[str, str]) -> Any:
    """The :class:`~castiron.api.app.ServeOptions` of ``config`` (secrets from ``environ``).

    Raises:
        UsageError: when a webhook's secret variable is not set.
    """
    from castiron.api.app import ServeOptions

    hooks = []
    for hook in config.get("webhooks", []):
        secret = None
        if hook.get("secret_env"):
            value = environ.get(hook["secret_env"])
            if not value:
                raise UsageError(f"--webhook-secret-env: ${hook['secret_env']} is not set or empty")
            secret = value.encode()
        hooks.append(
            Webhook(hook["url"], hook.get("environment"), hook.get("format", "json"), secret)
        )
    return ServeOptions(
        webhooks=hooks,
        secure_cookies=bool(config.get("secure_cookies")),
        event_interval=float(config.get("event_interval", 0.5)),
        webhook_backoff=float(config.get("webhook_backoff", 0.5)),
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (bound here, so a taken address is one clear
    error before anything starts).

    Raises:
        OSError: when the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def main(argv: list[str]) -> int:
    """Serve until stopped (SIGTERM/SIGINT); returns the exit code."""
    if len(argv) != 1:
        sys.stderr.write("usage: python -m castiron.api CONFIG_JSON (run `castiron serve`)\n")
        return 2
    config = json.loads(argv[0])
    environ = dict(os.environ)
    try:
        settings = load_settings(environ, spec_path=Path(config["spec"]), home=Path(config["home"]))
        options = options_from(config, environ)
        import uvicorn

        from castiron.api.app import Server
        from castiron.api.site import build_app

        server = Server(settings, options)
        app = build_app(server)
        # Fail before serving when the state store cannot be opened.
        server.auth_store.list_tokens()
    except CastironError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return int(exc.exit_code)
    host, port = config["host"], int(config["port"])
    shown = f"[{host}]" if ":" in host else host
    try:
        listener = listen(host, port)
    except OSError as exc:
        sys.stderr.write(f"error: cannot listen on {shown}:{port}: {exc.strerror or exc}\n")
        return 1
    sys.stderr.write(f"castiron serve: http://{shown}:{port}/ (state {settings.home})\n")
    sys.stderr.flush()
    uvicorn.run(
        app,
        fd=listener.fileno(),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=3,
        lifespan="on",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
