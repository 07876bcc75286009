"""The per-host agent: supervisor, routers and health checks behind a Unix-socket control API."""
