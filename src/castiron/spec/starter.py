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
  context: ./app                # copied into the image (relative to this file)
  workdir: /app                 # where the context lands; the working directory
  exclude: [".git", "**/__pycache__"]
  entrypoint: ["python3", "server.py"]
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
    listen: 127.0.0.1:8080
  production:
    runtime: local
    listen: 127.0.0.1:8081
    replicas: 2
    promote_from: staging       # `castiron promote production` ships staging's release
    policy:
      soak: 10m                 # the release must have run in staging this long
    strategy:
      type: blue-green          # blue-green | rolling | canary

# Keys starting with x- are yours: castiron ignores them (anchors and aliases work too).
"""


def starter_spec(app: str) -> str:
    """The starter spec text for an app named ``app``.

    Raises:
        UsageError: when ``app`` is not a valid name.
    """
    if not is_name(app):
        raise UsageError(
            f"{app!r} is not a valid app name: use 1-63 lowercase letters, digits and '-', "
            "not starting or ending with '-'"
        )
    return _STARTER.format(app=app, env_prefix=app.upper().replace("-", "_"))


__all__ = ["starter_spec"]
