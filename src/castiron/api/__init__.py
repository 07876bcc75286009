"""The HTTP edge, ``castiron serve``: the ``/api/v1`` API, the web dashboard, metrics and
webhooks. A thin edge like the CLI: it parses requests, calls the same library functions and
renders responses. It runs as its own process (``python -m castiron.api``), which the
``castiron serve`` command starts; only this package imports starlette, uvicorn and jinja2.
"""
