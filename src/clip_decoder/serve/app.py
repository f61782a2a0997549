"""FastAPI app: POST /v1/predict, GET /health, the web page at / and OpenAPI docs at /docs.

Requests never name a server-side path: images arrive as uploads, the model is fixed when the
app is built. Each request is bounded (body, uploads, images, pixels, labels, time) and so is the
number of requests waiting for the model; each excess is answered with a 4xx naming its limit.
(Open connections and the time to send a request head are bounded in ``connections``.)
"""

from __future__ import annotations

import base64
import io
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import asdict
from functools import partial
from importlib import resources
from typing import TypeVar

import anyio
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..decisions import Decider
from ..decoding import Tagger
from ..errors import ClipDecoderError
from ..heatmaps import heatmap
from ..images import load_image
from ..prompts import split_labels
from ..writers import result_record
from .limits import Limits

T = TypeVar("T")


def parse_labels(fields: list[str], limits: Limits) -> list[str]:
    """Labels from form fields: each field may hold several, comma-separated."""
    labels = split_labels(fields)
    if not labels:
        raise HTTPException(422, "no labels given: send 'labels' as a comma-separated string or repeat the field")
    if len(labels) > limits.max_labels:
        raise HTTPException(422, f"{len(labels)} labels; at most {limits.max_labels} per request (max_labels)")
    if too_long := [label for label in labels if len(label) > limits.max_label_chars]:
        raise HTTPException(422, f"label {too_long[0][:40]!r}... is longer than {limits.max_label_chars} characters (max_label_chars)")
    if len(set(labels)) != len(labels):
        raise HTTPException(422, "a label is given twice")
    return labels


def read_upload(upload: UploadFile, limits: Limits) -> tuple[str, bytes]:
    """An upload's filename (only ever echoed back) and bytes; 413 when over the size or pixel limit."""
    name = upload.filename or "upload"
    data = upload.file.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise HTTPException(413, f"{name}: larger than {limits.max_upload_bytes} bytes (max_upload_bytes)")
    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise HTTPException(413, f"{name}: more than {limits.max_image_pixels} pixels (max_image_pixels);"
                                 " possible decompression bomb") from error
    except Exception:  # not an image PIL can open: predict reports it for this image alone
        return name, data
    if width * height > limits.max_image_pixels:
        raise HTTPException(413, f"{name}: {width}x{height} pixels; at most {limits.max_image_pixels} per image"
                                 " (max_image_pixels)")
    return name, data


LABELS_PER_STEP = 8  # new labels embedded between two looks at the deadline (56 prompts with 7 templates)


def out_of_time(limits: Limits) -> HTTPException:
    return HTTPException(408, f"not finished within {limits.max_request_seconds} s (max_request_seconds):"
                              " send fewer images or labels")


def embed_new_labels(model, labels: list[str], deadline: float, limits: Limits) -> None:
    """Embed the labels not cached yet, a few at a time, and answer 408 once the deadline has passed.

    Those embedded stay cached, so the same request sent again goes on where this one stopped.
    """
    templates = model.templates
    new = model.embed_labels.missing(labels, templates)
    for start in range(0, len(new), LABELS_PER_STEP):
        model.embed_labels.arrays(new[start : start + LABELS_PER_STEP], templates)
        if time.monotonic() > deadline:
            raise out_of_time(limits)


def score_uploads(model, uploads: list[tuple[str, bytes]], names: list[str], decider: Decider, heatmaps: bool,
                  deadline: float, limits: Limits, draw: Decider | None = None) -> list[dict]:
    """One result per upload: its name and scores (or its error), decided labels, heatmaps (of the labels ``draw``
    decides, by default the decided ones); 408 past the deadline."""
    results: list[dict] = [{"image": name} for name, _ in uploads]
    with closing(model.predict_batches([data for _, data in uploads], names, attention=heatmaps)) as batches:
        embed_new_labels(model, names, deadline, limits)
        for batch in batches:
            for index, message in batch.failed.items():
                results[index]["error"] = message.replace("'<bytes>'", repr(uploads[index][0]))
            for row, (index, scores) in enumerate(zip(batch.indices, batch.scores)):
                chosen = decider(names, scores)
                result = results[index] = result_record(uploads[index][0], names, scores, chosen)
                if heatmaps and batch.attention is not None:  # (a tower alone, no head: no attention to show)
                    drawn = chosen if draw is None else draw(names, scores)
                    image = load_image(uploads[index][1], limits.max_image_pixels)
                    result["heatmaps"] = {label: png_data_url(heatmap(image, batch.attention[row][names.index(label)],
                                                                      model.preprocess))
                                          for label in drawn}
            if time.monotonic() > deadline:  # closing() stops the decoding of the batches left
                raise out_of_time(limits)
    return results


def png_data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class RequestGuard:
    """ASGI middleware: stamps each request's deadline and bounds its body's size and arrival time.

    An answer given before the whole body is in (413 for a body over the limit) is sent at once, but
    the connection closes only after the rest of the body is read and dropped, until the deadline: a
    client that sends its whole body before reading (Python's urllib does) then reads the answer
    instead of meeting a reset connection.
    """

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.limits
        deadline = time.monotonic() + limits.max_request_seconds
        scope.setdefault("state", {})["deadline"] = deadline
        too_large = f"request body larger than {limits.max_body_bytes} bytes (max_body_bytes)"
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        received, body_left = 0, declared not in ("", "0") or "transfer-encoding" in headers

        async def next_message() -> Message:
            nonlocal body_left
            message = await receive()
            body_left = message["type"] == "http.request" and message.get("more_body", False)
            return message

        async def bounded_receive() -> Message:
            nonlocal received
            with anyio.move_on_after(deadline - time.monotonic()) as timer:
                message = await next_message()
            if timer.cancelled_caught:
                raise HTTPException(408, f"request body not received within {limits.max_request_seconds} s (max_request_seconds)")
            received += len(message.get("body", b""))
            if received > limits.max_body_bytes:  # a chunked body, or one longer than it declared
                raise HTTPException(413, too_large)
            return message

        async def draining_send(message: Message) -> None:
            if message["type"] == "http.response.start" and body_left:
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            elif message["type"] == "http.response.body" and not message.get("more_body") and body_left:
                await send({**message, "more_body": True})  # the whole answer, as its length says
                with anyio.move_on_after(deadline - time.monotonic()):
                    while body_left:
                        await next_message()
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        if declared.isdigit() and int(declared) > limits.max_body_bytes:  # refused before the body is read
            await JSONResponse({"detail": too_large}, 413)(scope, receive, draining_send)
            return
        await self.app(scope, bounded_receive, draining_send)


class ModelGate:
    """One request at a time on the model, on one thread; at most ``max_queue`` more wait for it, each until
    its deadline."""

    def __init__(self, max_queue: int) -> None:
        self.max_queue = max_queue
        self.model_lock = threading.Lock()  # the model's caches are not thread-safe
        self.count_lock = threading.Lock()
        self.admitted_count = 0  # the request on the model and those waiting for it
        self.seconds = 1.0  # the latest request's time on the model, for Retry-After
        # The native libraries under torch keep state per calling thread (OpenMP's thread teams, scratch
        # memory): run from each of the server's worker threads in turn, the model made that state again
        # and again and the service's memory grew with them.
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="clip-decoder-model")

    def retry_after(self) -> dict[str, str]:
        """A Retry-After header: the admitted requests' time on the model at the latest one's pace."""
        return {"Retry-After": str(max(1, math.ceil(self.seconds * self.admitted_count)))}

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Count a request in, or answer 429 when ``max_queue`` requests already wait."""
        with self.count_lock:
            if self.admitted_count > self.max_queue:
                raise HTTPException(429, f"server busy: {self.max_queue} requests already wait for the model (max_queue);"
                                         " retry later", headers=self.retry_after())
            self.admitted_count += 1
        try:
            yield
        finally:
            with self.count_lock:
                self.admitted_count -= 1

    def run(self, work: Callable[[], T], deadline: float, limits: Limits) -> T:
        """``work()`` on the model's thread once the model is free, or 429 when the request's deadline passes while it waits."""
        if not self.model_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise HTTPException(429, f"server busy: the model was not free within the request's {limits.max_request_seconds} s"
                                     " (max_request_seconds); retry later", headers=self.retry_after())
        start = time.monotonic()
        try:
            return self.thread.submit(work).result()
        finally:
            self.seconds = time.monotonic() - start
            self.model_lock.release()


def create_app(model: Tagger, limits: Limits = Limits()) -> FastAPI:
    """The service around one loaded model: a CLIPDecoder, or an export run by ONNX Runtime (OnnxModel)."""
    app = FastAPI(title="clip-decoder", summary="Zero-shot multi-label image tagging: a probability for any label name.")
    app.state.limits = limits  # for the server's connection limits (connections.server_options)
    model.embed_labels.max_entries = limits.max_cached_labels
    model.text_tower.encode([])  # a text tower that loads on first use loads now, not in a request's time
    app.add_middleware(RequestGuard, limits=limits)
    gate = ModelGate(limits.max_queue)
    page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
    icon = resources.files(__package__).joinpath("favicon.svg").read_bytes()
    default_rule = model.default_thresholds()  # the decision when a request names none

    # async: answered on the event loop, never queued behind predictions for a worker thread
    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "backbone": model.backbone, "trained_labels": len(model.trained_labels),
                "limits": asdict(limits)}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/favicon.ico", include_in_schema=False)  # where browsers look; the page names it too
    async def favicon() -> Response:
        return Response(icon, media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})

    @app.post("/v1/predict")
    def predict(
        request: Request,
        images: list[UploadFile] = File(..., description="one or more image files"),
        labels: list[str] = Form(..., description="label names, comma-separated, or the field repeated"),
        top_k: int | None = Form(None, ge=1, description="decide: each image's K best labels"),
        threshold: float | None = Form(None, ge=0.0, le=1.0, description="decide: the labels scoring at least this;"
                                       " with neither, the model's own rule decides (as predict's)"),
        heatmaps: bool = Form(False, description="add a PNG (data URL) per decided label; with no top_k or"
                                                  " threshold, for the best labels up to the server's limit (20 by"
                                                  " default); none from a tower served alone (--backbone: no head)"),
    ) -> dict:
        deadline = request.state.deadline
        names = parse_labels(labels, limits)
        if len(images) > limits.max_images:
            raise HTTPException(413, f"{len(images)} images; at most {limits.max_images} per request (max_images)")
        decider = Decider.for_options(default_rule, top_k, threshold)
        # The page asks for no rule and shows any label's heatmap: draw the best ones then.
        draw = Decider(top_k=limits.max_heatmaps) if top_k is None and threshold is None else None
        with gate.admitted():
            uploads = [read_upload(upload, limits) for upload in images]
            work = partial(score_uploads, model, uploads, names, decider, heatmaps, deadline, limits, draw)
            return {"results": gate.run(work, deadline, limits)}

    @app.exception_handler(ClipDecoderError)
    def user_error(_request, error: ClipDecoderError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": str(error)})

    return app
