"""clip-decoder: zero-shot multi-label image classification with CLIP-Decoder."""

from .errors import ClipDecoderError
from .model import CLIPDecoder, ModelConfig

__version__ = "0.1.0"

__all__ = ["CLIPDecoder", "ClipDecoderError", "ModelConfig", "__version__"]
