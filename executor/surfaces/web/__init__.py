"""The review web page served by ``executor serve`` when ``EXECUTOR_UI_PORT`` is set.

``access`` (the address, the token and who may use the page), ``views`` (diffs, kept diffs and event rows
as the templates show them), ``app`` (the Starlette routes), ``server`` (uvicorn in a thread), ``templates/``.
Names load on first use: ``executor review url`` needs the token, not Starlette.
"""

from ...lazy import loader

_LAZY = {"fingerprint": "access", "page_token": "access", "web_url": "access", "create_app": "app",
         "WebServer": "server", "serve_web": "server"}

__all__ = [*_LAZY]

__getattr__ = loader(__name__, _LAZY, globals())
