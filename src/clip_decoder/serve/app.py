"""FastAPI app: POST /v1/predict, GET /health, the web page at / and OpenAPI docs at /docs.

Requests never name a server-side path: images arrive as uploads, the model is fixed when the
app is built. Uploads, images per request, labels per request and image pixels are bounded.
"""

from __future__ import annotations

import base64
import io
import threading
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse

from ..errors import ClipDecoderError
from ..images import load_image
from ..predict import Decider, heatmap


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each excess is answered with a 4xx naming the limit."""

    max_upload_bytes: int = 20 * 2**20  # per image file
    max_images: int = 32
    max_labels: int = 1000
    max_label_chars: int = 200
    max_heatmaps: int = 20  # per image, when no decision rule picks the labels


def parse_labels(fields: list[str], limits: Limits) -> list[str]:
    """Labels from form fields: each field may hold several, comma-separated."""
    labels = [part.strip() for field in fields for part in field.split(",") if part.strip()]
    if not labels:
        raise HTTPException(422, "no labels given: send 'labels' as a comma-separated string or repeat the field")
    if len(labels) > limits.max_labels:
        raise HTTPException(422, f"{len(labels)} labels; at most {limits.max_labels} per request")
    if too_long := [label for label in labels if len(label) > limits.max_label_chars]:
        raise HTTPException(422, f"label {too_long[0][:40]!r}... is longer than {limits.max_label_chars} characters")
    if len(set(labels)) != len(labels):
        raise HTTPException(422, "a label is given twice")
    return labels


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def create_app(model, limits: Limits = Limits()) -> FastAPI:
    """The service around one loaded CLIPDecoder."""
    app = FastAPI(title="clip-decoder", summary="Zero-shot multi-label image tagging: a probability for any label name.")
    lock = threading.Lock()  # one inference at a time: the model's caches are not thread-safe
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "backbone": model.config.backbone, "trained_labels": len(model.config.labels)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.post("/v1/predict")
    def predict(
        images: list[UploadFile] = File(..., description="one or more image files"),
        labels: list[str] = Form(..., description="label names, comma-separated, or the field repeated"),
        top_k: int | None = Form(None, ge=1),
        threshold: float | None = Form(None, ge=0.0, le=1.0),
        heatmaps: bool = Form(False, description="add a PNG (data URL) per decided label; with no decision rule,"
                                                  " for the best labels up to the server's limit (20 by default)"),
    ) -> dict:
        names = parse_labels(labels, limits)
        if len(images) > limits.max_images:
            raise HTTPException(413, f"{len(images)} images; at most {limits.max_images} per request")
        uploads = []
        for upload in images:
            data = upload.file.read(limits.max_upload_bytes + 1)
            if len(data) > limits.max_upload_bytes:
                raise HTTPException(413, f"{upload.filename}: larger than {limits.max_upload_bytes} bytes")
            uploads.append((upload.filename or "upload", data))
        decider = Decider(top_k, threshold)
        results: list[dict] = [{"image": name} for name, _ in uploads]
        with lock:
            batches = model.predict_batches([data for _, data in uploads], names, attention=heatmaps)
            for batch in batches:
                for index, message in batch.failed.items():
                    results[index]["error"] = message.replace("'<bytes>'", repr(uploads[index][0]))
                for row, (index, scores) in enumerate(zip(batch.indices, batch.scores)):
                    result = results[index]
                    result["scores"] = {label: round(float(s), 6) for label, s in zip(names, scores)}
                    chosen = decider(names, scores) if decider.active else None
                    if chosen is not None:
                        result["labels"] = chosen
                    if heatmaps:
                        drawn = chosen if chosen is not None else Decider(top_k=limits.max_heatmaps)(names, scores)
                        image = load_image(uploads[index][1])
                        result["heatmaps"] = {label: png_data_url(heatmap(image, batch.attention[row][names.index(label)],
                                                                          model.image_tower.preprocess))
                                              for label in drawn}
        return {"results": results}

    @app.exception_handler(ClipDecoderError)
    def user_error(_request, error: ClipDecoderError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(error)})

    return app
