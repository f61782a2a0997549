"""Image and text towers behind a declared contract (``base``), and a registry of named backbones.

Each module below registers its backbone kinds when imported; a new built-in backbone is a module
here plus its import on the next line (see ``registry``).
"""

from . import hf, offline  # noqa: F401  (importing registers the backbones)
from .base import Backbone, ImageFeatures, ImageNetClassifier, ImageTower, TextTower
from .registry import create_backbone, list_backbones, register_backbone

__all__ = [
    "Backbone",
    "ImageFeatures",
    "ImageNetClassifier",
    "ImageTower",
    "TextTower",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
