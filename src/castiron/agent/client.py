"""Client of the agent's control API over its Unix socket; the only way in for other layers."""
