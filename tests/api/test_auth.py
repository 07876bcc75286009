"""Dashboard sessions and CSRF tokens."""

from __future__ import annotations

from castiron.api.auth import SESSION_SECONDS, SessionKeys


def test_a_session_names_its_token_until_it_expires() -> None:
    keys = SessionKeys(b"k" * 32)
    cookie = keys.issue("ops", now=1000.0)
    assert keys.token_name(cookie, now=1001.0) == "ops"
    assert keys.token_name(cookie, now=1000.0 + SESSION_SECONDS + 1) is None
    assert "cit_" not in cookie


def test_forged_or_foreign_cookies_are_refused() -> None:
    keys = SessionKeys(b"k" * 32)
    cookie = keys.issue("ops", now=1000.0)
    body, mac = cookie.rsplit(".", 1)
    assert keys.token_name(body + "." + "0" * len(mac), now=1001.0) is None
    assert keys.token_name(SessionKeys(b"x" * 32).issue("ops", now=1000.0), now=1001.0) is None
    assert keys.token_name(None) is None
    assert keys.token_name("garbage") is None


def test_csrf_tokens_belong_to_one_session() -> None:
    keys = SessionKeys(b"k" * 32)
    one, two = keys.issue("ops"), keys.issue("ops")
    assert keys.csrf_ok(one, keys.csrf(one))
    assert not keys.csrf_ok(one, keys.csrf(two))
    assert not keys.csrf_ok(one, None)
    assert not keys.csrf_ok(None, keys.csrf(one))
