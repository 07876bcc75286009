"""Supervises local instances: starts, watches and replaces processes; never restarts in place."""
