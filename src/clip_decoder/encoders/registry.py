"""A registry of named backbones, in the style of timm's ``register_model``.

A backbone name is ``KIND`` or ``KIND:ARGUMENT`` (``offline``, ``hf:openai/clip-vit-base-patch16``);
the factory registered for ``KIND`` receives ``ARGUMENT`` (or None) and returns a ``Backbone``
whose towers keep the contract in ``base`` (checked here). To add a backbone: decorate its
factory with ``@register_backbone("kind")`` in a module of ``encoders/`` and import that module
in ``encoders/__init__.py`` (importing it registers the kind), or register it in your own code
before the first ``create_backbone``.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ClipDecoderError
from .base import Backbone, check_backbone

BackboneFactory = Callable[[str | None], Backbone]

_FACTORIES: dict[str, BackboneFactory] = {}


def register_backbone(kind: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: register a factory for backbone names ``kind`` and ``kind:ARGUMENT``."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if kind in _FACTORIES:
            raise ValueError(f"backbone kind {kind!r} is registered twice")
        _FACTORIES[kind] = factory
        return factory

    return decorate


def list_backbones() -> list[str]:
    """The registered backbone kinds."""
    return sorted(_FACTORIES)


def create_backbone(name: str) -> Backbone:
    """Build the backbone called ``name``; raise ClipDecoderError for an unknown name."""
    kind, _, argument = name.partition(":")
    factory = _FACTORIES.get(kind)
    if factory is None:
        raise ClipDecoderError(
            f"unknown backbone {name!r}; known kinds: {', '.join(list_backbones())}"
            " (use 'hf:<hub id or folder>' for transformers CLIP/SigLIP models)"
        )
    try:
        return check_backbone(factory(argument or None))
    except ValueError as error:
        raise ClipDecoderError(str(error)) from error
