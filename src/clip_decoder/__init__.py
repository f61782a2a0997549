"""clip-decoder: zero-shot multi-label image classification with CLIP-Decoder."""

from .errors import ClipDecoderError

__version__ = "0.1.0"

__all__ = ["CLIPDecoder", "ClipDecoderError", "ModelConfig", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `clip-decoder --help` does not wait for torch.
    if name in ("CLIPDecoder", "ModelConfig"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'clip_decoder' has no attribute {name!r}")
