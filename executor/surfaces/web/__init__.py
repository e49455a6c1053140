"""The review web page served by ``executor serve`` when ``EXECUTOR_UI_PORT`` is set.

``access`` (the address, the token and who may use the page), ``views`` (diffs, kept diffs and event rows
as the templates show them), ``app`` (the Starlette routes), ``server`` (uvicorn in a thread), ``templates/``.
Names load on first use: ``executor review url`` needs the token, not Starlette.
"""

from importlib import import_module

_LAZY = {"fingerprint": "access", "page_token": "access", "web_url": "access", "create_app": "app",
         "WebServer": "server", "serve_web": "server"}

__all__ = [*_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value
