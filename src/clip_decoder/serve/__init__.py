"""The HTTP service: ``create_app(model)`` (FastAPI) and the web page it serves at ``/``."""

from .app import Limits, create_app

__all__ = ["Limits", "create_app"]
