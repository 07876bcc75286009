"""The agent process: composes the supervisor, routers and health checks; serves the control API."""
