"""What one request may ask for and how many may wait: the service's limits, each declared once
(``clip-decoder serve``'s options are generated from these fields)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..errors import ClipDecoderError
from ..images import MAX_IMAGE_PIXELS

MEBIBYTE = 2**20


def limit(default, help: str, option: bool = True):
    """A Limits field, and unless ``option`` is False a command-line option (``option_flag``)."""
    return field(default=default, metadata={"help": help, "option": option})


def option_flag(name: str) -> str:
    """A limit's command-line flag: its name with dashes, byte sizes given in MB (max_body_bytes: --max-body-mb)."""
    return "--" + name.removesuffix("_bytes").replace("_", "-") + ("-mb" if name.endswith("_bytes") else "")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for and how many may wait; each excess is answered with a 4xx naming the limit."""

    max_body_bytes: int = limit(64 * MEBIBYTE, "the whole request body, multipart framing included: 413")
    max_upload_bytes: int = limit(20 * MEBIBYTE, "each image file: 413")
    max_images: int = limit(32, "images per request: 413")
    max_image_pixels: int = limit(MAX_IMAGE_PIXELS, "pixels per image, read from its header before anything is"
                                  f" decoded: 413 (at most {MAX_IMAGE_PIXELS})")
    max_labels: int = limit(1000, "labels per request: 422")
    max_label_chars: int = limit(200, "characters per label: 422", option=False)
    max_heatmaps: int = limit(20, "heatmaps per image when no decision rule picks the labels", option=False)
    max_request_seconds: float = limit(30.0, "from the request head to the answer (body, waiting for the model,"
                                       " embedding new labels, inference): 408, or 429 if spent waiting")
    max_queue: int = limit(16, "requests that may wait for the model while one runs; more get 429")
    max_cached_labels: int = limit(20_000, "label embeddings kept between requests, least recently used dropped"
                                   " first; bounds the service's memory (at least --max-labels)")
    max_connections: int = limit(512, "open connections; one more is answered 429 and closed")
    max_header_seconds: float = limit(10.0, "to send a request head, from connecting or from its first byte: 408"
                                      " and closed")

    def __post_init__(self) -> None:
        """Refuse limits that would refuse every request, or pixels above what load_image accepts."""
        values = asdict(self)
        if bad := [f"{name}={value}" for name, value in values.items() if value < 0 or (value == 0 and name != "max_queue")]:
            raise ClipDecoderError(f"service limits must be positive (max_queue may be 0): {', '.join(bad)}")
        if self.max_cached_labels < self.max_labels:  # a request's labels must stay cached while it is scored
            raise ClipDecoderError(f"max_cached_labels={self.max_cached_labels} must be at least max_labels={self.max_labels}")
        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ClipDecoderError(f"max_image_pixels={self.max_image_pixels}: images are decoded up to"
                                   f" {MAX_IMAGE_PIXELS} pixels")




def add_limit_options(group) -> None:
    """One ``serve`` option per limit on an argparse group, generated from Limits (its default and help)."""
    import argparse

    def mebibytes(text: str) -> int:
        return round(float(text) * MEBIBYTE)

    for item in fields(Limits):
        if item.metadata["option"]:
            in_mb = item.name.endswith("_bytes")
            default = item.default // MEBIBYTE if in_mb else f"{item.default:g}" if isinstance(item.default, float) else item.default
            metavar = "MB" if in_mb else "S" if item.name.endswith("seconds") else "N"
            group.add_argument(option_flag(item.name), dest=item.name, default=argparse.SUPPRESS,
                               type=mebibytes if in_mb else type(item.default), metavar=metavar,
                               help=f"{item.metadata['help']} (default {default})")
