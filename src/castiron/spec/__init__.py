"""The spec: parses and validates ``castiron.yaml`` into frozen model objects.

Knows nothing else.
"""
