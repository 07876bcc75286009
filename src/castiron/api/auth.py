"""Sessions and CSRF tokens of the dashboard (the API itself takes bearer tokens).

Owns the session cookie: the token's *name* and an expiry, signed with HMAC-SHA256 under a
key made when the server starts (restarting the server ends every session; the token secret
is never put in a cookie), and the per-session CSRF token every form posts back. A session is
only as good as its token: a revoked token ends its sessions at the next request.

It knows nothing of HTTP frameworks, the engine or the state store.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time

SESSION_COOKIE = "castiron_session"
SESSION_SECONDS = 8 * 3600
"""How long a dashboard session lasts."""


class SessionKeys:
    """Signs and checks session cookies and CSRF tokens."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)

    def _mac(self, purpose: str, text: str) -> str:
        return hmac.new(self._key, f"{purpose}:{text}".encode(), hashlib.sha256).hexdigest()

    def issue(self, token_name: str, now: float | None = None) -> str:
        """A cookie value for a session of ``token_name``."""
        body = json.dumps(
            {
                "t": token_name,
                "exp": int((now if now is not None else time.time()) + SESSION_SECONDS),
                "n": secrets.token_hex(8),
            },
            separators=(",", ":"),
        )
        text = base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")
        return f"{text}.{self._mac('session', text)}"

    def token_name(self, cookie: str | None, now: float | None = None) -> str | None:
        """The token name of a valid, unexpired session cookie, else None."""
        if not cookie or "." not in cookie or len(cookie) > 1000:
            return None
        text, mac = cookie.rsplit(".", 1)
        if not hmac.compare_digest(mac, self._mac("session", text)):
            return None
        try:
            data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("t"), str):
            return None
        expires = data.get("exp")
        if not isinstance(expires, int) or expires < (now if now is not None else time.time()):
            return None
        return str(data["t"])

    def csrf(self, cookie: str) -> str:
        """The CSRF token of the session ``cookie`` (forms carry it back)."""
        return self._mac("csrf", cookie)[:40]

    def csrf_ok(self, cookie: str | None, presented: str | None) -> bool:
        """Whether ``presented`` is the CSRF token of the session ``cookie``."""
        if not cookie or not presented:
            return False
        return hmac.compare_digest(self.csrf(cookie), presented)


__all__ = ["SESSION_COOKIE", "SESSION_SECONDS", "SessionKeys"]
