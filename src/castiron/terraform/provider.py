"""The Terraform provider for castiron: the plugin protocol edge, built on the ``tf`` framework.

Owns the provider's schema (resource ``castiron_deployment``, data sources ``castiron_image``
and ``castiron_environment``), turning Terraform's values into
:class:`~castiron.terraform.operations.DeploymentArgs` and back, planning (the plan shows the
resolved digest and release id, also on create), reporting drift as a diff, and turning
castiron's errors into Terraform diagnostics with the same text. A failed create or update
leaves Terraform's state as it was (the engine left the old release serving).

It is the only module that imports ``tf`` (and, through it, grpc); everything it does goes
through :mod:`castiron.terraform.operations`. It never prints: stdout belongs to the plugin
handshake.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from copy import deepcopy
from pathlib import Path
from typing import Any, NoReturn

from tf import iface
from tf.provider import (
    ProviderServicer,
    _decode_state,
    _encode_state,
)
from tf.schema import Attribute, Schema
from tf.types import Bool, List, Map, Number, String, Unknown
from tf.utils import Diagnostics

from castiron.errors import CastironError
from castiron.settings import Settings
from castiron.terraform import operations as ops

PROVIDER_ADDRESS = "registry.terraform.io/castiron/castiron"
"""The provider's source address (``source = "castiron/castiron"`` in configurations)."""

_INPUTS = ("spec", "environment", "image", "promote_from", "replicas", "env")
_COMPUTED = ("release", "digest", "url", "deployed_at")


def report(diags: Diagnostics, exc: CastironError, path: list[str] | None = None) -> None:
    """Add ``exc`` to ``diags`` as an error with castiron's own text (its first line is the
    summary; a multi-line message, such as every issue of a spec, is the detail)."""
    text = str(exc)
    first, _, rest = text.partition("\n")
    detail = text if rest else ""
    if path:
        diags.add_error(first, detail, path=path)
    else:
        diags.add_error(first, detail)


class CastironProvider(iface.Provider):  # type: ignore[misc]
    """The provider: an optional ``home`` (castiron's state directory) in its configuration."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = dict(environ)
        self.home: str | None = None

    def get_model_prefix(self) -> str:
        return "castiron_"

    def full_name(self) -> str:
        return PROVIDER_ADDRESS

    def get_provider_schema(self, diags: Diagnostics) -> Schema:
        return Schema(
            version=1,
            attributes=[
                Attribute(
                    "home",
                    String(),
                    description="castiron's state directory (default: $CASTIRON_HOME, else "
                    ".castiron/ beside each spec), as `castiron --home`.",
                    optional=True,
                ),
            ],
        )

    def validate_config(self, diags: Diagnostics, config: dict[str, Any]) -> None:
        return None

    def configure_provider(self, diags: Diagnostics, config: dict[str, Any]) -> None:
        home = config.get("home")
        self.home = home if isinstance(home, str) and home else None

    def get_data_sources(self) -> list[type[Any]]:
        return [ImageData, EnvironmentData]

    def get_resources(self) -> list[type[Any]]:
        return [Deployment]

    def settings(self, spec: str) -> Settings:
        """castiron's settings for the spec file ``spec`` (as written in the configuration)."""
        return ops.settings_for(self.environ, spec, self.home)


def _known(value: Any) -> bool:
    """False when ``value`` or anything in it is not known yet (a value of another resource
    that the same apply computes first)."""
    if value is Unknown:
        return False
    if isinstance(value, dict):
        return all(_known(v) for v in value.values())
    if isinstance(value, list):
        return all(_known(v) for v in value)
    return True


def _args(state: Mapping[str, Any]) -> ops.DeploymentArgs:
    replicas = state.get("replicas")
    env = state.get("env") or {}
    return ops.DeploymentArgs(
        spec=str(state["spec"]),
        environment=str(state["environment"]),
        image=state.get("image") or None,
        promote_from=state.get("promote_from") or None,
        replicas=int(replicas) if replicas is not None else None,
        env={str(k): str(v) for k, v in env.items()},
    )


def _with_observed(state: dict[str, Any], observed: ops.Observed) -> dict[str, Any]:
    return {
        **state,
        "id": state["environment"],
        "release": observed.release,
        "digest": observed.digest,
        "url": observed.url,
        "deployed_at": observed.deployed_at,
        "drift": list(observed.drift),
    }


class Deployment(iface.Resource):  # type: ignore[misc]
    """``castiron_deployment``: one environment of a spec, serving a release."""

    def __init__(self, provider: CastironProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "deployment"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=1,
            description="An environment of a castiron spec serving a release. Create and "
            "update deploy by replacement with the environment's strategy; delete is "
            "`castiron down`.",
            attributes=[
                Attribute("id", String(), computed=True, description="The environment."),
                Attribute("spec", String(), required=True, description="The spec file."),
                Attribute(
                    "environment",
                    String(),
                    required=True,
                    requires_replace=True,
                    description="The environment of the spec.",
                ),
                Attribute(
                    "image",
                    String(),
                    optional=True,
                    description="Tag, digest or digest prefix (default: the newest baked image).",
                ),
                Attribute(
                    "promote_from",
                    String(),
                    optional=True,
                    description="Deploy by promotion of the release this environment serves.",
                ),
                Attribute(
                    "replicas", Number(), optional=True, description="Overrides the replicas."
                ),
                Attribute(
                    "env",
                    Map(String()),
                    optional=True,
                    description="Environment variables over the environment's (not secrets).",
                ),
                Attribute("release", String(), computed=True, description="The release id."),
                Attribute("digest", String(), computed=True, description="The image digest."),
                Attribute("url", String(), computed=True, description="Where it serves."),
                Attribute(
                    "deployed_at", String(), computed=True, description="When it last changed."
                ),
                Attribute(
                    "drift",
                    List(String()),
                    computed=True,
                    description="What runs but differs from the release (one line each).",
                ),
            ],
        )

    def plan(
        self, ctx: iface.PlanContext, current: dict[str, Any] | None, planned: dict[str, Any]
    ) -> dict[str, Any]:
        planned["id"] = planned["environment"]
        if not all(_known(planned.get(k)) for k in _INPUTS):
            for key in _COMPUTED:
                planned[key] = Unknown
            planned["drift"] = []
            return planned
        try:
            result = ops.plan(self.provider.settings(planned["spec"]), _args(planned))
        except CastironError as exc:
            report(ctx.diagnostics, exc)
            return planned
        planned.update(release=result.release, digest=result.digest, url=result.url, drift=[])
        unchanged = (
            current is not None
            and not result.changes
            and current.get("release") == result.release
            and not current.get("drift")
        )
        planned["deployed_at"] = current.get("deployed_at") if unchanged and current else Unknown
        return planned

    def create(self, ctx: iface.CreateContext, planned: dict[str, Any]) -> dict[str, Any] | None:
        try:
            observed = ops.deploy(self.provider.settings(planned["spec"]), _args(planned))
        except CastironError as exc:
            report(ctx.diagnostics, exc)
            return None  # nothing was created: Terraform records nothing
        return _with_observed(dict(planned), observed)

    def read(self, ctx: iface.ReadContext, current: dict[str, Any]) -> dict[str, Any] | None:
        settings = self.provider.settings(current["spec"])
        try:
            observed = ops.observe(settings, current["environment"])
        except CastironError as exc:
            report(ctx.diagnostics, exc)
            return current
        if observed is None:
            return None  # taken down outside Terraform: planned for creation again
        return _with_observed(dict(current), observed)

    def update(
        self, ctx: iface.UpdateContext, current: dict[str, Any], planned: dict[str, Any]
    ) -> dict[str, Any]:
        try:
            observed = ops.deploy(
                self.provider.settings(planned["spec"]),
                _args(planned),
                fix_drift=bool(current.get("drift")),
            )
        except CastironError as exc:
            report(ctx.diagnostics, exc)
            return current  # the old release still serves: the state stays as it was
        return _with_observed(dict(planned), observed)

    def delete(self, ctx: iface.DeleteContext, current: dict[str, Any]) -> None:
        try:
            ops.take_down(self.provider.settings(current["spec"]), current["environment"])
        except CastironError as exc:
            report(ctx.diagnostics, exc)

    def import_(self, ctx: iface.ImportContext, id: str) -> dict[str, Any] | None:
        try:
            spec, environment = ops.parse_import_id(id)
            observed = ops.import_environment(self.provider.settings(spec), environment)
        except CastironError as exc:
            report(ctx.diagnostics, exc)
            return None
        state: dict[str, Any] = {
            "spec": spec,
            "environment": environment,
            "image": observed.tag or observed.digest,
            "promote_from": None,
            "replicas": None,
            "env": None,
        }
        return _with_observed(state, observed)


class ImageData(iface.DataSource):  # type: ignore[misc]
    """``castiron_image``: a tag or digest → digest, tags, signature and provenance facts."""

    def __init__(self, provider: CastironProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "image"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=1,
            attributes=[
                Attribute("ref", String(), required=True, description="Tag or digest."),
                Attribute(
                    "spec", String(), optional=True, description="The spec (locates the store)."
                ),
                Attribute(
                    "public_keys",
                    List(String()),
                    optional=True,
                    description="Public key files: verify the signature with them.",
                ),
                Attribute("digest", String(), computed=True),
                Attribute("tags", List(String()), computed=True),
                Attribute("created", String(), computed=True),
                Attribute("git_commit", String(), computed=True),
                Attribute("signed", Bool(), computed=True),
                Attribute("signature_keyids", List(String()), computed=True),
                Attribute("provenance", Bool(), computed=True),
                Attribute("verified", Bool(), computed=True),
                Attribute("verification", String(), computed=True),
            ],
        )

    def read(self, ctx: iface.ReadDataContext, config: dict[str, Any]) -> dict[str, Any] | None:
        settings = self.provider.settings(config.get("spec") or "castiron.yaml")
        try:
            facts = ops.image_facts(settings, config["ref"], list(config.get("public_keys") or []))
        except CastironError as exc:
            report(ctx.diagnostics, exc, ["ref"])
            return None
        return {**config, **facts}


class EnvironmentData(iface.DataSource):  # type: ignore[misc]
    """``castiron_environment``: the release an environment serves, its url and health."""

    def __init__(self, provider: CastironProvider) -> None:
        self.provider = provider

    @classmethod
    def get_name(cls) -> str:
        return "environment"

    @classmethod
    def get_schema(cls) -> Schema:
        return Schema(
            version=1,
            attributes=[
                Attribute("environment", String(), required=True),
                Attribute(
                    "spec", String(), optional=True, description="The spec (locates the state)."
                ),
                Attribute("release", String(), computed=True),
                Attribute("digest", String(), computed=True),
                Attribute("tag", String(), computed=True),
                Attribute("url", String(), computed=True),
                Attribute("known_good", String(), computed=True),
                Attribute("instances", Number(), computed=True),
                Attribute("healthy_instances", Number(), computed=True),
                Attribute("healthy", Bool(), computed=True),
            ],
        )

    def read(self, ctx: iface.ReadDataContext, config: dict[str, Any]) -> dict[str, Any] | None:
        settings = self.provider.settings(config.get("spec") or "castiron.yaml")
        try:
            facts = ops.environment_facts(settings, config["environment"])
        except CastironError as exc:
            report(ctx.diagnostics, exc, ["environment"])
            return None
        return {**config, **facts}


class _Servicer(ProviderServicer):  # type: ignore[misc]
    """tf's servicer, except that a create is planned by the resource too: the plan of a new
    deployment shows the digest and release it resolves to."""

    def PlanResourceChange(self, request: Any, context: Any) -> Any:
        response = super().PlanResourceChange(request, context)
        diags = Diagnostics()
        type_name = request.type_name
        attrs = self._get_res_attrs(type_name)
        blocks = self._get_res_blocks(type_name)
        _, prior = _decode_state(diags, attrs, blocks, request.prior_state)
        if prior is not None or response.diagnostics or diags.has_errors():
            return response
        planned_enc, planned = _decode_state(diags, attrs, blocks, response.planned_state)
        if planned is None or diags.has_errors():
            return response
        resource = self.app.new_resource(self._get_res_cls(type_name))
        ctx = iface.PlanContext(diags, type_name, changed_fields=set(planned))
        new = resource.plan(ctx, None, deepcopy(planned))
        response.planned_state.CopyFrom(_encode_state(attrs, blocks, new, planned_enc))
        response.diagnostics.extend(diags.to_pb())
        return response


CERT_DAYS = 30
"""How long the provider's self-signed TLS certificate is valid (it is cached meanwhile)."""


def _new_certificate() -> tuple[bytes, bytes, bytes]:
    """A fresh self-signed certificate for ``localhost`` (go-plugin's server name): its DER
    bytes, the private key's PEM and the certificate's PEM."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return (
        cert.public_bytes(serialization.Encoding.DER),
        key_pem,
        cert.public_bytes(serialization.Encoding.PEM),
    )


def certificate(cache: Path, now: float) -> tuple[bytes, bytes, bytes]:
    """The provider's TLS certificate (DER, key PEM, certificate PEM), from ``cache`` while it
    has more than a day left, else a new one written there (0600, atomically). Loading it
    from the cache needs no X.509 parsing: Terraform starts the provider several times per
    command."""
    import base64
    import json

    try:
        data = json.loads(cache.read_text())
        if float(data["not_after"]) - now > 86400:
            return (
                base64.b64decode(data["der"]),
                str(data["key_pem"]).encode(),
                str(data["cert_pem"]).encode(),
            )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    der, key_pem, cert_pem = _new_certificate()
    record = {
        "not_after": now + CERT_DAYS * 86400 - 600,
        "der": base64.b64encode(der).decode(),
        "key_pem": key_pem.decode(),
        "cert_pem": cert_pem.decode(),
    }
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    try:
        cache.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(record))
        os.replace(tmp, cache)
    except OSError:  # no cache: a new certificate next time
        tmp.unlink(missing_ok=True)
    return der, key_pem, cert_pem


def _cert_cache(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "castiron" / "terraform-provider-cert.json"


class _StoppingServicer(_Servicer):
    """The servicer, telling the server loop when Terraform asks the provider to stop."""

    def __init__(self, provider: CastironProvider, stopped: threading.Event) -> None:
        super().__init__(provider)
        self.stopped = stopped

    def StopProvider(self, request: Any, context: Any) -> Any:
        self.stopped.set()
        return super().StopProvider(request, context)


def serve(environ: Mapping[str, str] | None = None) -> NoReturn:
    """Serve the provider on the plugin protocol until Terraform stops it (the go-plugin
    handshake line on stdout, gRPC with a self-signed certificate on a Unix socket), then end
    the process."""
    import base64
    import signal
    import tempfile
    import time
    from concurrent import futures

    import grpc
    from tf.gen import grpc_controller_pb2 as controller_pb
    from tf.gen import grpc_controller_pb2_grpc as controller_rpc
    from tf.gen import grpc_stdio_pb2_grpc as stdio_rpc
    from tf.gen import tfplugin_pb2_grpc as rpc

    # As every go-plugin server does: Terraform handles Ctrl-C and stops its providers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = environ if environ is not None else os.environ
    provider = CastironProvider(env)
    stopped = threading.Event()
    server = grpc.server(thread_pool=futures.ThreadPoolExecutor(max_workers=4))
    rpc.add_ProviderServicer_to_server(_StoppingServicer(provider, stopped), server)

    class Controller(controller_rpc.GRPCControllerServicer):  # type: ignore[misc]
        def Shutdown(self, request: Any, context: Any) -> Any:
            stopped.set()
            return controller_pb.Empty()

    class Stdio(stdio_rpc.GRPCStdioServicer):  # type: ignore[misc]
        def StreamStdio(self, request: Any, context: Any) -> Any:
            return iter([])

    controller_rpc.add_GRPCControllerServicer_to_server(Controller(), server)
    stdio_rpc.add_GRPCStdioServicer_to_server(Stdio(), server)
    der, key_pem, cert_pem = certificate(_cert_cache(env), time.time())
    credentials = grpc.ssl_server_credentials([(key_pem, cert_pem)], require_client_auth=False)
    with tempfile.TemporaryDirectory(prefix="castiron-tf-") as tmp:
        socket = f"{tmp}/provider.sock"
        server.add_secure_port(f"unix://{socket}", credentials)
        server.start()
        cert = base64.b64encode(der).decode().rstrip("=")
        os.write(1, f"1|6|unix|{socket}|grpc|{cert}\n".encode())
        stopped.wait()
        server.stop(grace=0.5).wait()
    # Terraform waits for the process to exit after every command phase, several times per
    # command: skip the interpreter's teardown of grpc's threads (nothing is left to flush).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


__all__ = [
    "PROVIDER_ADDRESS",
    "CastironProvider",
    "Deployment",
    "EnvironmentData",
    "ImageData",
    "report",
    "serve",
]
