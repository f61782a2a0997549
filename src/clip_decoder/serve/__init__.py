"""The HTTP service: ``create_app(model)`` (FastAPI), the web page it serves at ``/``, and the
uvicorn options that bound its connections (``server_options``)."""

from .app import create_app
from .limits import Limits
from .connections import fit_file_limit, server_options

__all__ = ["Limits", "create_app", "fit_file_limit", "server_options"]
