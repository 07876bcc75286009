"""The HTTP API edge (later): parses requests, calls the engine, renders responses."""
