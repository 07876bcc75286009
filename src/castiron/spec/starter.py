"""The commented starter ``castiron.yaml`` that ``init`` writes.

Owns the text only; it must validate as written (a test loads it). It knows nothing of files,
the CLI or the environment.
"""

from __future__ import annotations

from castiron.errors import UsageError
from castiron.model import is_name

_STARTER = """\
# castiron.yaml: the desired state of {app}. Reference: docs/spec.md
# Check it with `castiron validate`; print a JSON Schema for your editor with `castiron schema`.

app: {app}                      # 1-63 lowercase letters, digits and '-'

image:                          # baked once, reproducibly; deployed by digest
  base: scratch                 # or oci:DIR[:TAG], oci-archive:FILE, docker:REF, ...
  context: {context:<21}# copied into the image (relative to this file); this file,
                                # .castiron/, .git/ and castiron-quickstart/ never are
  workdir: /app                 # where the context lands; the working directory
  exclude: ["**/__pycache__", ".venv", "*.pyc"]
  entrypoint: ["python3", "{entrypoint}"]
  # build: ["pip install --target deps -r requirements.txt"]   # host-side, in a clean copy
  # env: {{PYTHONPATH: /app/deps}}

service:
  port: 8000                    # the app listens on $PORT
  replicas: 1
  health:
    http: /healthz              # or `tcp: true`, or `command: [...]`
    interval: 1s
    timeout: 2s
    start_period: 30s
  env:
    LOG_LEVEL: info
  # secrets:                    # resolved at deploy time only, never baked or stored
  #   DB_PASSWORD: {{env: {env_prefix}_DB_PASSWORD}}

environments:
  staging:
    runtime: local              # local | docker | kubernetes
    listen: 127.0.0.1:{staging_port}  # the router; a port that was free when this was written
  production:
    runtime: local
    listen: 127.0.0.1:{production_port}
    replicas: 2
    promote_from: staging       # `castiron promote production` ships staging's release
    policy:
      soak: 10m                 # the release must have run in staging this long
    strategy:
      type: blue-green          # blue-green | rolling | canary

# Keys starting with x- are yours: castiron ignores them (anchors and aliases work too).
"""


def starter_spec(
    app: str,
    *,
    context: str = "./app",
    entrypoint: str = "server.py",
    staging_port: int = 8080,
    production_port: int = 8081,
) -> str:
    """The starter spec text for an app named ``app`` whose files are in ``context`` (relative
    to the spec file) and start with ``python3 ENTRYPOINT``, routed on the given ports.

    Raises:
        UsageError: when ``app`` is not a valid name.
    """
    if not is_name(app):
        raise UsageError(
            f"{app!r} is not a valid app name: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return _STARTER.format(
        app=app,
        env_prefix=app.upper().replace("-", "_"),
        context=context,
        entrypoint=entrypoint,
        staging_port=staging_port,
        production_port=production_port,
    )


__all__ = ["starter_spec"]
