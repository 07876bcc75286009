"""``castiron serve``: the HTTP API and the web dashboard.

Validates the options here, then replaces this process with the server's own entry point
(``python -m castiron.api``, like the agent daemon it is a process of its own, and the only
place starlette and uvicorn are imported).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import sys
from urllib.parse import urlsplit

import click

from castiron.cli.context import CliContext, pass_cli
from castiron.errors import UsageError
from castiron.model import Address, is_name


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port).

    Raises:
        UsageError: when it is not one.
    """
    try:
        address = Address.parse(value)
    except ValueError:
        address = None
    if address is None or address.port == 0:
        raise UsageError(f"--listen: {value!r} is not HOST:PORT (e.g. 127.0.0.1:8700)")
    return address.host, address.port


def parse_webhook(value: str, fmt: str) -> dict[str, str | None]:
    """``[ENV=]URL`` as a webhook (``ENV`` limits it to one environment).

    Raises:
        UsageError: for a bad environment name or a URL that is not http(s).
    """
    env: str | None = None
    url = value
    head, sep, tail = value.partition("=")
    if sep and "://" not in head:
        env, url = head, tail
        if not is_name(env):
            raise UsageError(f"--webhook: {env!r} is not an environment name")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UsageError(f"--webhook: {url!r} is not an http(s) URL")
    return {"url": url, "environment": env, "format": fmt}


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option(
    "--listen",
    default="127.0.0.1:8700",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to serve the API and the dashboard on.",
)
@click.option(
    "--webhook",
    "webhooks",
    multiple=True,
    metavar="[ENV=]URL",
    help="Post deployment events as JSON to URL (only ENV's with ENV=). Repeatable.",
)
@click.option(
    "--slack-webhook",
    "slack_webhooks",
    multiple=True,
    metavar="[ENV=]URL",
    help='Post events as Slack-compatible {"text": ...} to URL. Repeatable.',
)
@click.option(
    "--webhook-secret-env",
    metavar="VAR",
    default=None,
    help="Sign webhook bodies with HMAC-SHA256 using the value of $VAR.",
)
@click.option(
    "--secure-cookies/--no-secure-cookies",
    default=None,
    help="Mark the dashboard's session cookie Secure (default: on unless listening on "
    "loopback; serve behind TLS then).",
)
@click.option(
    "--event-interval",
    type=click.FloatRange(min=0.05, max=60),
    default=0.5,
    show_default=True,
    metavar="S",
    help="Seconds between two reads of the audit chain for events and metrics.",
)
@click.option(
    "--webhook-backoff",
    type=click.FloatRange(min=0.01, max=60),
    default=0.5,
    show_default=True,
    metavar="S",
    help="First delay before retrying a webhook (doubled on each of up to 4 retries).",
)
@pass_cli
def serve_cmd(
    cli: CliContext,
    listen: str,
    webhooks: tuple[str, ...],
    slack_webhooks: tuple[str, ...],
    webhook_secret_env: str | None,
    secure_cookies: bool | None,
    event_interval: float,
    webhook_backoff: float,
) -> None:
    """Serve the HTTP API (/api/v1) and the web dashboard; needs API tokens
    (`castiron token create`)."""
    host, port = parse_listen(listen)
    hooks = [parse_webhook(w, "json") for w in webhooks]
    hooks += [parse_webhook(w, "slack") for w in slack_webhooks]
    if webhook_secret_env is not None:
        if not webhook_secret_env.isidentifier():
            raise UsageError(f"--webhook-secret-env: {webhook_secret_env!r} is not a variable name")
        if not cli.settings.environ.get(webhook_secret_env):
            raise UsageError(f"--webhook-secret-env: ${webhook_secret_env} is not set or empty")
        for hook in hooks:
            hook["secret_env"] = webhook_secret_env
    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn", "jinja2")):
        raise UsageError(
            "castiron serve needs the 'serve' extra: pip install 'castiron[serve]'"
        ) from None
    config = {
        "host": host,
        "port": port,
        "home": str(cli.settings.home),
        "spec": str(cli.settings.spec_path),
        "webhooks": hooks,
        "secure_cookies": (not _loopback(host)) if secure_cookies is None else secure_cookies,
        "event_interval": event_interval,
        "webhook_backoff": webhook_backoff,
    }
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "castiron.api", json.dumps(config)])


commands: list[click.Command] = [serve_cmd]
