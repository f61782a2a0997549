"""Image and text towers behind two small protocols, and a registry of named backbones."""

from . import hf, offline  # noqa: F401  (importing registers the backbones)
from .base import Backbone, ImageFeatures, ImageTower, TextTower
from .registry import create_backbone, list_backbones, register_backbone

__all__ = [
    "Backbone",
    "ImageFeatures",
    "ImageTower",
    "TextTower",
    "create_backbone",
    "list_backbones",
    "register_backbone",
]
