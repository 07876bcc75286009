"""The OCI Distribution API of one registry: blobs, uploads, mounts, manifests, referrers.

Owns the endpoints (``/v2/<repo>/blobs|manifests|referrers|tags``), the authentication
handshake (a ``401`` with a ``WWW-Authenticate`` challenge: Basic credentials, or a Bearer
token fetched from the named realm for the needed scope, cached per scope), monolithic and
chunked uploads (a chunked upload whose connection drops asks the registry how much it holds
and goes on from there), cross-repository mounts and ranged blob downloads (a dropped download
resumes where it stopped).

It moves bytes and checks HTTP answers; digests are verified by the caller as bytes arrive
(:mod:`castiron.images.registry.transfer`). Knows nothing of the store's layout or any runtime.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from castiron.errors import DigestMismatchError, NotFoundError, RegistryAuthError, RegistryError
from castiron.images import oci
from castiron.images.registry.auth import Credentials, find_credentials, parse_challenge
from castiron.images.registry.reference import Reference
from castiron.images.registry.transport import Response, Transport, TransportOptions
from castiron.model import Digest

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""The largest manifest or index castiron accepts from a registry (distribution's limit)."""
MANIFEST_ACCEPT = ", ".join([oci.MANIFEST, oci.INDEX, oci.DOCKER_MANIFEST, oci.DOCKER_LIST])
_MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Manifest:
    """A manifest (or index) as received: its exact bytes, media type and digest."""

    data: bytes
    media_type: str
    digest: Digest

    def json(self, where: str) -> dict[str, Any]:
        """The parsed document.

        Raises:
            ImageError: when it is not a JSON object.
        """
        return oci.parse_json_object(self.data, where)


class RegistryClient:
    """Talks to one registry host on behalf of one operation (push or pull)."""

    def __init__(
        self,
        host: str,
        *,
        environ: Mapping[str, str],
        options: TransportOptions | None = None,
    ) -> None:
        self.host = host
        self.transport = Transport(host, options or TransportOptions())
        self._environ = environ
        self._credentials: Credentials | None = None
        self._credentials_loaded = False
        self._basic = False
        self._tokens: dict[str, str] = {}
        self._challenge: dict[str, str] | None = None
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, int]] = []
        """Every request sent: (method, path, status), for reports and tests."""

    def close(self) -> None:
        """Close the connections."""
        self.transport.close()

    # -- authentication -------------------------------------------------------------------

    def _creds(self) -> Credentials | None:
        if not self._credentials_loaded:
            self._credentials = find_credentials(self.host, self._environ)
            self._credentials_loaded = True
        return self._credentials

    def _auth_header(self, scope: str) -> dict[str, str]:
        if self._basic:
            creds = self._creds()
            return {"Authorization": creds.basic()} if creds else {}
        token = self._tokens.get(scope)
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _fetch_token(self, scope: str) -> None:
        assert self._challenge is not None
        realm = self._challenge.get("realm")
        if not realm or not realm.startswith(("https://", "http://")):
            raise RegistryError(f"registry {self.host}: Bearer challenge has no usable realm")
        query = {"scope": scope}
        if self._challenge.get("service"):
            query["service"] = self._challenge["service"]
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers: dict[str, str] = {}
        creds = self._creds()
        if creds is not None:
            headers["Authorization"] = creds.basic()
        realm_host = urllib.parse.urlsplit(realm).netloc
        transport = (
            self.transport
            if realm_host == self.host
            else Transport(realm_host, self.transport.options)
        )
        try:
            resp = transport.request("GET", url, headers)
        finally:
            if transport is not self.transport:
                transport.close()
        if resp.status in (401, 403):
            raise self._refused(resp.status)
        if resp.status != 200:
            raise RegistryError(f"registry {self.host}: token service answered HTTP {resp.status}")
        try:
            doc = json.loads(resp.body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"registry {self.host}: token service gave no token")
        self._tokens[scope] = token

    def _refused(self, status: int) -> RegistryAuthError:
        creds = self._creds()
        if creds is None:
            return RegistryAuthError(
                f"registry {self.host} needs credentials and none were found (docker login, "
                "~/.docker/config.json or CASTIRON_REGISTRY_USERNAME/PASSWORD)"
            )
        verb = "refused" if status == 401 else "denied access with"
        return RegistryAuthError(
            f"registry {self.host} {verb} the credentials of {creds.username!r} "
            f"(from {creds.source})"
        )

    def send(
        self,
        method: str,
        url: str,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        stream: bool = False,
    ) -> Response:
        """Send an authenticated request (answering one challenge), following redirects.

        Raises:
            RegistryAuthError: when the registry refuses the credentials (or wants some).
            RegistryError: when the registry cannot be reached or keeps failing.
        """
        sent = dict(headers or {})
        for _ in range(_MAX_REDIRECTS):
            same_host = url.startswith("/") or urllib.parse.urlsplit(url).netloc == self.host
            auth = self._auth_header(scope) if same_host else {}
            resp = self.transport.request(method, url, {**sent, **auth}, body, stream=stream)
            if resp.status == 401 and same_host:
                challenge = parse_challenge(resp.header("WWW-Authenticate") or "")
                if challenge is None:
                    raise self._refused(401)
                with self._lock:
                    if challenge.scheme == "basic":
                        if self._basic or self._creds() is None:
                            raise self._refused(401)
                        self._basic = True
                    else:
                        if auth and not self._basic:
                            raise self._refused(401)
                        self._challenge = challenge.params
                        self._fetch_token(scope)
                resp = self.transport.request(
                    method, url, {**sent, **self._auth_header(scope)}, body, stream=stream
                )
                if resp.status == 401:
                    raise self._refused(401)
            self.requests.append((method, urllib.parse.urlsplit(url).path, resp.status))
            if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                location = resp.header("Location")
                if not location:
                    raise RegistryError(f"registry {self.host}: redirect without a Location")
                url = self._absolute(location)
                continue
            if resp.status == 403:
                raise self._refused(403)
            return resp
        raise RegistryError(f"registry {self.host}: too many redirects for {url}")

    def _absolute(self, location: str) -> str:
        return urllib.parse.urljoin(self.transport.base_url + "/", location)

    # -- blobs ------------------------------------------------------------------------------

    @staticmethod
    def scope(repo: str, push: bool) -> str:
        """The token scope for ``repo``."""
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def blob_exists(self, repo: str, digest: str, push: bool = False) -> bool:
        """HEAD ``/v2/<repo>/blobs/<digest>``.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send("HEAD", f"/v2/{repo}/blobs/{digest}", self.scope(repo, push))
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise self._unexpected(resp, f"checking blob {digest}")

    def mount_blob(self, repo: str, digest: str, source: str) -> str | None:
        """Ask the registry to mount ``digest`` from repository ``source``; None when done,
        else the upload location the registry opened instead.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        query = urllib.parse.urlencode({"mount": digest, "from": source})
        scope = f"{self.scope(repo, True)} repository:{source}:pull"
        resp = self.send("POST", f"/v2/{repo}/blobs/uploads/?{query}", scope, body=b"")
        if resp.status == 201:
            return None
        if resp.status == 202:
            return self._location(resp)
        raise self._unexpected(resp, f"mounting blob {digest}")

    def start_upload(self, repo: str) -> str:
        """Open an upload session; returns its location.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send("POST", f"/v2/{repo}/blobs/uploads/", self.scope(repo, True), body=b"")
        if resp.status != 202:
            raise self._unexpected(resp, "starting an upload")
        return self._location(resp)

    def _location(self, resp: Response) -> str:
        loc = resp.header("Location")
        if not loc:
            raise RegistryError(f"registry {self.host}: upload answer has no Location")
        return self._absolute(loc)

    @staticmethod
    def _with_query(location: str, **params: str) -> str:
        parts = urllib.parse.urlsplit(location)
        query = urllib.parse.parse_qsl(parts.query) + list(params.items())
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    def finish_upload(self, repo: str, location: str, digest: str, body: bytes = b"") -> None:
        """PUT the last bytes (or all of them: a monolithic upload) and close the session.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        headers = {"Content-Type": "application/octet-stream"}
        url = self._with_query(location, digest=digest)
        resp = self.send("PUT", url, self.scope(repo, True), headers=headers, body=body)
        if resp.status != 201:
            raise self._unexpected(resp, f"finishing the upload of {digest}")

    def upload_chunk(self, repo: str, location: str, offset: int, chunk: bytes) -> str:
        """PATCH ``chunk`` at ``offset``; returns the next location.

        Raises:
            RegistryError: for a refused chunk.
            OSError, http.client.HTTPException: when the connection drops (resumable).
        """
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
        }
        if urllib.parse.urlsplit(location).netloc == self.host:  # credentials stay home
            headers.update(self._auth_header(self.scope(repo, True)))
        resp = self.transport.once("PATCH", location, headers, chunk, False)
        self.requests.append(("PATCH", urllib.parse.urlsplit(location).path, resp.status))
        if resp.status != 202:
            raise self._unexpected(resp, "uploading a chunk")
        return self._location(resp)

    def upload_status(self, repo: str, location: str) -> tuple[str, int] | None:
        """How many bytes the upload session holds: (next location, next offset); None when
        the registry no longer knows the session at ``location`` (404: e.g. distribution,
        whose locations carry the session's state, once a chunk's answer was lost).

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send("GET", location, self.scope(repo, True))
        if resp.status == 404:
            return None
        if resp.status != 204:
            raise self._unexpected(resp, "asking for the upload's progress")
        held = resp.header("Range") or ""
        _, dash, end = held.partition("-")
        # "0-0" is what registries (distribution among them) answer for an empty session as
        # well as for one byte held; chunks are never one byte long, so it means nothing held
        # (reading it as 1 resumed one byte late: a digest mismatch at the end).
        offset = int(end) + 1 if dash and end.isdigit() and end != "0" else 0
        return self._location(resp), offset

    def get_blob(self, repo: str, digest: str, offset: int = 0) -> Response:
        """GET a blob (from ``offset`` with a Range request); the body streams.

        Raises:
            NotFoundError: when the registry does not have it.
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        resp = self.send(
            "GET",
            f"/v2/{repo}/blobs/{digest}",
            self.scope(repo, False),
            headers=headers,
            stream=True,
        )
        if resp.status == 404:
            raise NotFoundError(f"registry {self.host}: {repo} has no blob {digest}")
        if resp.status not in (200, 206):
            raise self._unexpected(resp, f"downloading blob {digest}")
        return resp

    def read_blob(self, repo: str, digest: str, limit: int) -> bytes:
        """A small blob's bytes (not verified here).

        Raises:
            NotFoundError, RegistryError: see :meth:`get_blob`.
        """
        resp = self.get_blob(repo, digest)
        return _read_limited(resp, limit, f"blob {digest}", self.host)

    # -- manifests --------------------------------------------------------------------------

    def get_manifest(self, repo: str, selector: str, push: bool = False) -> Manifest | None:
        """GET a manifest or index by tag or digest; None when the registry has none.

        Raises:
            RegistryError: when it is larger than :data:`MAX_MANIFEST_BYTES`.
            RegistryAuthError: see :meth:`send`.
        """
        resp = self.send(
            "GET",
            f"/v2/{repo}/manifests/{selector}",
            self.scope(repo, push),
            headers={"Accept": MANIFEST_ACCEPT},
            stream=True,
        )
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._unexpected(resp, f"reading manifest {selector}")
        length = resp.header("Content-Length")
        if length and length.isdigit() and int(length) > MAX_MANIFEST_BYTES:
            resp.close()
            raise RegistryError(
                f"registry {self.host}: manifest {repo}:{selector} is {length} bytes, more "
                f"than the {MAX_MANIFEST_BYTES} castiron accepts"
            )
        data = _read_limited(resp, MAX_MANIFEST_BYTES, f"manifest {repo}:{selector}", self.host)
        media = (resp.header("Content-Type") or "").split(";")[0].strip()
        try:
            declared = json.loads(data).get("mediaType")
        except (ValueError, AttributeError):
            declared = None
        if isinstance(declared, str) and declared:
            media = declared
        digest = sha256_digest(data)
        header_digest = resp.header("Docker-Content-Digest")
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise DigestMismatchError(
                f"registry {self.host}: manifest {repo}:{selector} hashes to {digest} but the "
                f"registry says {header_digest}; refused"
            )
        return Manifest(data, media, digest)

    def manifest_digest(self, repo: str, selector: str) -> str | None:
        """HEAD a manifest by tag or digest: the digest the registry reports (None when it
        has none, or reports none).

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send(
            "HEAD",
            f"/v2/{repo}/manifests/{selector}",
            self.scope(repo, True),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise self._unexpected(resp, f"checking manifest {selector}")
        return resp.header("Docker-Content-Digest")

    def manifest_exists(self, repo: str, digest: str) -> bool:
        """HEAD a manifest by digest.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send(
            "HEAD",
            f"/v2/{repo}/manifests/{digest}",
            self.scope(repo, True),
            headers={"Accept": MANIFEST_ACCEPT},
        )
        if resp.status in (200, 404):
            return resp.status == 200
        raise self._unexpected(resp, f"checking manifest {digest}")

    def put_manifest(self, repo: str, selector: str, data: bytes, media_type: str) -> Response:
        """PUT a manifest under a digest or tag; checks the digest the registry reports.

        Raises:
            RegistryError: when refused, or the registry reports another digest.
            RegistryAuthError: see :meth:`send`.
        """
        resp = self.send(
            "PUT",
            f"/v2/{repo}/manifests/{selector}",
            self.scope(repo, True),
            headers={"Content-Type": media_type},
            body=data,
        )
        if resp.status != 201:
            raise self._unexpected(resp, f"storing manifest {repo}:{selector}")
        reported = resp.header("Docker-Content-Digest")
        if reported and reported != sha256_digest(data):
            raise RegistryError(
                f"registry {self.host}: stored manifest {repo}:{selector} as {reported}, "
                f"not {sha256_digest(data)}"
            )
        return resp

    def referrers(self, repo: str, digest: str) -> list[oci.Descriptor] | None:
        """The OCI 1.1 referrers of ``digest``; None when the registry lacks the API.

        Raises:
            RegistryError, RegistryAuthError: see :meth:`send`.
        """
        resp = self.send("GET", f"/v2/{repo}/referrers/{digest}", self.scope(repo, False))
        if resp.status == 404 or resp.status == 405 or resp.status == 400:
            return None
        if resp.status != 200:
            raise self._unexpected(resp, f"listing referrers of {digest}")
        if "json" not in (resp.header("Content-Type") or ""):
            return None
        doc = oci.parse_json_object(resp.body, f"referrers of {digest}")
        items = doc.get("manifests")
        if not isinstance(items, list):
            return None
        where = f"registry {self.host}: referrers of {digest}"
        return [oci.Descriptor.from_json(d, f"{where}[{i}]") for i, d in enumerate(items)]

    def _unexpected(self, resp: Response, doing: str) -> RegistryError:
        detail = ""
        try:
            doc = json.loads(resp.body)
            errors = doc.get("errors") if isinstance(doc, dict) else None
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                detail = f": {errors[0].get('code', '')} {errors[0].get('message', '')}".rstrip()
        except ValueError:
            pass
        return RegistryError(
            f"registry {self.host}: {doing} failed with HTTP {resp.status}{detail}"
        )


def _read_limited(resp: Response, limit: int, what: str, host: str) -> bytes:
    out = bytearray()
    try:
        for block in resp.stream():
            out += block
            if len(out) > limit:
                resp.close()
                raise RegistryError(f"registry {host}: {what} is larger than {limit} bytes")
    except (OSError, http.client.HTTPException) as exc:
        raise RegistryError(f"registry {host}: connection lost reading {what} ({exc})") from None
    return bytes(out)


def sha256_digest(data: bytes) -> Digest:
    """``sha256:<hex>`` of ``data``."""
    return Digest("sha256:" + hashlib.sha256(data).hexdigest())


def client_for(
    ref: Reference, environ: Mapping[str, str], options: TransportOptions | None = None
) -> RegistryClient:
    """A client for ``ref``'s registry."""
    return RegistryClient(ref.api_host, environ=environ, options=options)


__all__ = ["MAX_MANIFEST_BYTES", "Manifest", "RegistryClient", "client_for", "sha256_digest"]
