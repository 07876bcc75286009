"""Images: deterministic layers, the OCI store, archives, safe unpacking, signing.

Knows no runtime.
"""
