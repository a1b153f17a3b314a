"""`patchcore-serve MODEL...`: saved models behind an HTTP service (FastAPI on uvicorn).

Each MODEL (a saved model folder, an exported file or an export folder, run by `--runtime`
exactly as `patchcore-predict` runs it: `patchcore.apps.predict.load_scorer`) is loaded once
and served as one category: `name=MODEL`, or the category `patchcore-export` would name it
(`mvtec_bottle` -> `bottle`; an exported file's stem).

Endpoints (see docs/how-to/serve.md):
- `POST /v1/categories/{category}/inspect`: one image, as the raw request body or as the
  `image` field (or the only file) of a multipart form. The answer is predict's decision row
  (`patchcore.apps.predict.decision_fields`: score, threshold, decision, model_id,
  model_format) with the category, the time taken and the batch it was scored in; with
  `?heatmap=true` also predict's heat map as a base64 PNG (`heatmap_png`).
- `GET /v1/categories`: the categories served and their models.
- `GET /health` (the process answers), `GET /ready` (models loaded, not draining),
  `GET /metrics` (Prometheus text: requests by category and decision, errors by reason,
  latency and batch-size histograms, queue depth).

Uploads are decoded by predict's chain (`patchcore.data.preprocessing.decode_image`, the
bytes form of `open_image`: the same pixel and aspect limits, `PATCHCORE_MAX_IMAGE_PIXELS`,
16-bit images scaled to 8 bits as predict scales them; `patchcore.apps.predict.model_input`)
on a small pool of decoding threads. Prepared images wait in one bounded queue; a single model
thread (`BatchingWorker`) takes the first waiting image, collects more for up to
`batch_wait_ms` or until `max_batch` (default 1 on the CPU, where batches did not pay, 8 on
a GPU: `default_max_batch`), and scores them in batches of one category and input size, so
the model never competes with itself for the cores. A full queue is refused at once
(503, `Retry-After`). Refusals are one line of JSON (`error`, `reason`, `decision: "error"`),
counted by reason, and never an accept; a non-finite score is a reject (predict's rule) and
answers 500.

On SIGTERM uvicorn stops accepting connections and waits for the requests in flight; the
service then lets the model thread finish what is queued and the process exits 0.

`ray_application` runs the same app as a Ray Serve deployment, one replica per CPU group or
GPU (each replica loads the models and runs its own batching worker).
"""


import asyncio
import base64
import collections
import concurrent.futures
import contextlib
import hmac
import io
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from patchcore.apps.export import category_name
from patchcore.apps.predict import (
    ImageOutputs,
    Scorer,
    decision_fields,
    decision_threshold,
    image_outputs,
    load_scorer,
    model_input,
    original_pixels,
    size_problem,
)
from patchcore.apps.runtimes import default_runtime
from patchcore.config import RUNTIMES, SearchConfig
from patchcore.data.preprocessing import decode_image
from patchcore.errors import ConfigurationError, DataError, missing_dependency
from patchcore.files import printable_name

LOGGER = logging.getLogger(__name__)

API_VERSION = 1
API_KEY_VARIABLE = "PATCHCORE_SERVE_API_KEY"
API_KEY_HEADER = "x-api-key"
DEFAULT_HOST = "127.0.0.1"
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
# Measured by bench/bench_serve.py (docs/how-to/serve.md): on a 2-core CPU batches raised no
# throughput and lengthened waits; on a GPU a batch costs little more than one image.
DEFAULT_MAX_BATCH = 1
GPU_MAX_BATCH = 8
DEFAULT_BATCH_WAIT_MS = 5.0
DEFAULT_QUEUE_SIZE = 64
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_DECODE_THREADS = 2
CATEGORY_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MULTIPART_FIELD = "image"
RETRY_AFTER_SECONDS = "1"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

# Refusal reasons: the `reason` of an error answer and the label of the errors counter.
UNAUTHORIZED, TOO_LARGE, BAD_REQUEST, UNKNOWN_CATEGORY = (
    "unauthorized", "too_large", "bad_request", "unknown_category",
)  # fmt: skip
BAD_IMAGE, WRONG_SIZE, QUEUE_FULL, SHUTTING_DOWN = (
    "bad_image", "wrong_size", "queue_full", "shutting_down",
)  # fmt: skip
MODEL_FAILED, NON_FINITE_SCORE = "model_failed", "non_finite_score"
REASONS = (UNAUTHORIZED, TOO_LARGE, BAD_REQUEST, UNKNOWN_CATEGORY, BAD_IMAGE, WRONG_SIZE,
           QUEUE_FULL, SHUTTING_DOWN, MODEL_FAILED, NON_FINITE_SCORE)  # fmt: skip


def require_serving_packages() -> None:
    """A one-line error naming the `serve` extra when FastAPI, uvicorn or prometheus_client
    is missing."""
    import importlib.util

    for module, package in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"),
                            ("prometheus_client", "prometheus_client"),
                            ("multipart", "python-multipart")):  # fmt: skip
        if importlib.util.find_spec(module) is None:
            raise missing_dependency("patchcore-serve", package, "serve")


# ------------------------------------------------------------------------ options
@dataclass(frozen=True)
class ServedModel:
    """One category: its MODEL and how it is run (what `load_scorer` reads)."""

    category: str
    model_dir: Path
    runtime: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    search: SearchConfig = field(default_factory=SearchConfig)
    threshold: float | None = None  # patchcore-serve decides at the model's saved threshold

    @property
    def runtime_name(self) -> str:
        """The runtime that scores this model (predict's default when none is named)."""
        if self.runtime is not None:
            return self.runtime
        return "torch" if Path(self.model_dir).is_dir() else default_runtime(self.model_dir)


def served_models(
    arguments: Sequence[str], runtime: str | None = None,
    device: torch.device | None = None, search: SearchConfig | None = None,
) -> tuple[ServedModel, ...]:  # fmt: skip
    """The MODEL arguments (`PATH` or `NAME=PATH`) as categories; a ConfigurationError names
    a missing path, a malformed or repeated category."""
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigurationError(f"--runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if not arguments:
        raise ConfigurationError("give at least one MODEL (a model folder or exported file)")
    models: dict[str, ServedModel] = {}
    for argument in arguments:
        name, separator, text = argument.partition("=")
        path = Path(text if separator else argument)
        if not path.exists():
            raise ConfigurationError(f"MODEL {path}: no such file or folder")
        if not separator:
            name = category_name(path) if path.is_dir() else path.stem
        if not CATEGORY_PATTERN.fullmatch(name):
            raise ConfigurationError(
                f"MODEL {argument}: category '{name}' must be letters, digits, '_', '.' or "
                "'-' (at most 100, not starting with a symbol); name it with NAME=PATH"
            )
        if name in models:
            raise ConfigurationError(
                f"MODEL {argument}: category '{name}' is also {models[name].model_dir}; name "
                "one of them with NAME=PATH"
            )
        models[name] = ServedModel(
            name, path, runtime, device or torch.device("cpu"), search or SearchConfig()
        )
    return tuple(models.values())


def default_max_batch(device: torch.device) -> int:
    """`--max_batch` when none is given: 1 on the CPU, GPU_MAX_BATCH on a GPU."""
    return GPU_MAX_BATCH if torch.device(device).type == "cuda" else DEFAULT_MAX_BATCH


def read_api_key(path: Path | None) -> str | None:
    """The API key: the first line of `path` (--api_key_file), else the environment variable
    API_KEY_VARIABLE, else None (no key required). An empty key is an error."""
    if path is not None:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        key = lines[0].strip() if lines else ""
        where = f"--api_key_file {path}"
    else:
        key = os.environ.get(API_KEY_VARIABLE)
        where = API_KEY_VARIABLE
        if key is None:
            return None
        key = key.strip()
    if not key:
        raise ConfigurationError(f"{where}: the API key is empty")
    return key


@dataclass(frozen=True)
class ServeOptions:
    """A service's models and limits; checked once when built. The API key is left out of
    the options' printed form."""

    models: tuple[ServedModel, ...]
    max_batch: int = DEFAULT_MAX_BATCH
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    queue_size: int = DEFAULT_QUEUE_SIZE
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    decode_threads: int = DEFAULT_DECODE_THREADS
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigurationError("give at least one MODEL (a model folder or exported file)")
        for option, value, lowest in (
            ("--max_batch", self.max_batch, 1), ("--queue_size", self.queue_size, 1),
            ("--max_request_mb", self.max_request_bytes, 1),
            ("--decode_threads", self.decode_threads, 1),
        ):  # fmt: skip
            if not isinstance(value, int) or value < lowest:
                raise ConfigurationError(f"{option} must be a whole number >= {lowest}, got {value}")
        if not (math.isfinite(self.batch_wait_ms) and 0 <= self.batch_wait_ms <= 1000):
            raise ConfigurationError(
                f"--batch_wait_ms must be between 0 and 1000 ms, got {self.batch_wait_ms}"
            )
        if self.queue_size < self.max_batch:
            raise ConfigurationError(
                f"--queue_size ({self.queue_size}) must be at least --max_batch ({self.max_batch})"
            )

    def key_matches(self, given: str | None) -> bool:
        """Whether a request's key is accepted: always when no key is configured; otherwise
        compared in constant time."""
        if self.api_key is None:
            return True
        return given is not None and hmac.compare_digest(
            given.encode("utf-8"), self.api_key.encode("utf-8")
        )


# ------------------------------------------------------------------------ categories
@dataclass(frozen=True)
class Category:
    """A loaded model and how its answers are made."""

    name: str
    scorer: Scorer
    threshold: float
    drawing: ImageOutputs
    runtime: str

    def describe(self) -> dict:
        return {"category": self.name, "model_id": self.scorer.identity,
                "model_format": self.scorer.model_format, "threshold": self.threshold,
                "runtime": self.runtime, "model": self.scorer.name}  # fmt: skip


def load_category(model: ServedModel) -> Category:
    """`model` loaded as predict loads it, deciding at its saved threshold."""
    scorer = load_scorer(model)
    threshold = decision_threshold(scorer, model)
    LOGGER.info("Category %s: %s (%s, model %s, threshold %.6g)", model.category,
                model.model_dir, model.runtime_name, scorer.identity, threshold)  # fmt: skip
    return Category(model.category, scorer, threshold, image_outputs(scorer, threshold),
                    model.runtime_name)  # fmt: skip


# ------------------------------------------------------------------------ batching
@dataclass
class Job:
    """One prepared image waiting for the model; `result` gets (score, map)."""

    category: Category
    image: torch.Tensor
    result: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    batch_size: int = 0  # set by the worker: how many images its batch held


class RequestQueue:
    """A bounded first-in first-out queue of jobs between the request handlers and the model
    thread; `offer` refuses when full or closed instead of blocking."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._jobs: collections.deque[Job] = collections.deque()
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, job: Job) -> bool:
        with self._changed:
            if self._closed or len(self._jobs) >= self.size:
                return False
            self._jobs.append(job)
            self._changed.notify()
            return True

    def take(self, most: int, wait_s: float) -> list[Job]:
        """Waits for a first job, then for up to `wait_s` more seconds for others, and returns
        at most `most` of them; an empty list once the queue is closed and empty."""
        with self._changed:
            self._changed.wait_for(lambda: self._jobs or self._closed)
            deadline = time.monotonic() + wait_s
            while len(self._jobs) < most and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._changed.wait(left):
                    break
            return [self._jobs.popleft() for _ in range(min(most, len(self._jobs)))]

    def close(self) -> None:
        """No more jobs are accepted; those waiting are still taken."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()


class BatchingWorker:
    """The one thread that runs the models: takes up to `max_batch` jobs at a time from the
    queue and scores them in groups of one category and one input size."""

    def __init__(
        self, queue: RequestQueue, max_batch: int, wait_s: float,
        observe_batch: Callable[[int], None],
    ) -> None:  # fmt: skip
        self.queue = queue
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.observe_batch = observe_batch
        self.thread = threading.Thread(target=self._run, name="patchcore-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self) -> None:
        """Closes the queue, lets the thread score what is still waiting, and joins it."""
        self.queue.close()
        if self.thread.is_alive():
            self.thread.join()

    def _run(self) -> None:
        with torch.inference_mode():
            jobs = self.queue.take(self.max_batch, self.wait_s)
            while jobs:
                self.observe_batch(len(jobs))
                for group in self._groups(jobs):
                    self._score(group)
                jobs = self.queue.take(self.max_batch, self.wait_s)

    @staticmethod
    def _groups(jobs: list[Job]) -> list[list[Job]]:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault((job.category.name, tuple(job.image.shape)), []).append(job)
        return list(groups.values())

    @staticmethod
    def _score(group: list[Job]) -> None:
        scorer = group[0].category.scorer
        try:
            scores, maps = scorer.score(torch.stack([job.image for job in group]))
        except Exception as error:  # any model failure must answer its requests, not kill the thread
            LOGGER.exception("Scoring a batch of %d %s images failed", len(group),
                             group[0].category.name)  # fmt: skip
            for job in group:
                job.result.set_exception(error)
            return
        for job, score, model_map in zip(group, scores, maps, strict=True):
            job.batch_size = len(group)
            job.result.set_result((float(score), model_map))


# ------------------------------------------------------------------------ metrics
class ServeMetrics:
    """The service's Prometheus metrics, in its own registry."""

    def __init__(self, queue: RequestQueue) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "patchcore_serve_requests", "Inspections answered, by category and decision "
            "(accept, reject, error)", ["category", "decision"], registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "patchcore_serve_errors", "Requests refused or failed, by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        for reason in REASONS:
            self.errors.labels(reason)
        self.latency = Histogram(
            "patchcore_serve_request_seconds", "Time from a request's arrival to its answer, "
            "inspections of a served category", ["category"], buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )  # fmt: skip
        self.batches = Histogram(
            "patchcore_serve_batch_images", "Images taken by the model thread at a time",
            buckets=BATCH_BUCKETS, registry=self.registry,
        )  # fmt: skip
        depth = Gauge("patchcore_serve_queue_depth", "Images waiting for the model thread",
                      registry=self.registry)  # fmt: skip
        depth.set_function(lambda: len(queue))

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ------------------------------------------------------------------------ service
@dataclass(frozen=True)
class Refusal:
    """An answer that is not a decision: HTTP status, reason, one line of explanation."""

    status: int
    reason: str
    message: str

    def body(self, category: str | None = None) -> dict:
        body = {"error": self.message, "reason": self.reason, "decision": "error"}
        return body if category is None else {"category": category, **body}


@dataclass(frozen=True)
class Prepared:
    """A decoded upload: the model's input and, for a heat map, the original pixels."""

    image: torch.Tensor
    original: torch.Tensor | None


def one_line(text: str) -> str:
    return " ".join(str(text).split())


class InspectionService:
    """The categories, the queue, the model thread and the metrics of one process (or one
    Ray Serve replica)."""

    def __init__(self, categories: dict[str, Category], options: ServeOptions) -> None:
        self.categories = categories
        self.options = options
        self.queue = RequestQueue(options.queue_size)
        self.metrics = ServeMetrics(self.queue)
        self.worker = BatchingWorker(
            self.queue, options.max_batch, options.batch_wait_ms / 1000, self.metrics.batches.observe
        )
        self.decoder = concurrent.futures.ThreadPoolExecutor(
            options.decode_threads, thread_name_prefix="patchcore-decode"
        )
        self.started = False

    @classmethod
    def load(cls, options: ServeOptions) -> "InspectionService":
        """Loads every category's model (once) and returns the service, not yet started."""
        return cls({model.category: load_category(model) for model in options.models}, options)

    def start(self) -> None:
        self.worker.start()
        self.started = True

    def stop(self) -> None:
        """Scores what is queued, then stops the model thread and the decoders."""
        self.worker.stop()
        self.decoder.shutdown(wait=True)
        LOGGER.info("Model thread stopped; every queued image was answered")

    @property
    def ready(self) -> bool:
        return self.started and self.worker.alive and not self.queue.closed

    # ---- one inspection
    def refuse(self, refusal: Refusal, category: str | None = None) -> Refusal:
        """Counts a refusal (and, for a served category, an `error` decision)."""
        self.metrics.errors.labels(refusal.reason).inc()
        if category in self.categories:
            self.metrics.requests.labels(category, "error").inc()
        LOGGER.info("Refused (%d %s): %s", refusal.status, refusal.reason, refusal.message)
        return refusal

    def prepare(self, category: Category, data: bytes, name: str, keep_original: bool):
        """An upload decoded and prepared as predict prepares a file (runs on a decoding
        thread); a Refusal naming what is wrong with it."""
        try:
            picture = decode_image(data, name, "RGB")
            image = model_input(
                picture, Path(name),
                None if category.scorer.whole_images else category.scorer.preprocessing,
            )  # fmt: skip
        except DataError as error:
            return Refusal(422, BAD_IMAGE, one_line(str(error)))
        problem = size_problem(category.scorer, name, image)
        if problem:
            return Refusal(422, WRONG_SIZE, one_line(problem))
        return Prepared(image, original_pixels(picture) if keep_original else None)

    def heatmap_png(
        self, category: Category, prepared: Prepared, model_map, score: float, rejected: bool
    ) -> str:
        """predict's heat map of the image, as base64 PNG text (runs on a decoding thread)."""
        array = category.drawing.heatmap(prepared.original, model_map, score, rejected)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    async def inspect(
        self, name: str, data: bytes, filename: str, heatmap: bool, arrived: float
    ) -> tuple[int, dict]:
        """(HTTP status, JSON body) of one image for category `name`."""
        category = self.categories.get(name)
        if category is None:
            served = ", ".join(sorted(self.categories))
            message = f"unknown category '{printable_name(name)}'; served: {served}"
            return self._refused(Refusal(404, UNKNOWN_CATEGORY, message))
        if not data:
            return self._refused(
                Refusal(400, BAD_REQUEST, "the request holds no image (empty body)"), name
            )
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self.decoder, self.prepare, category, data, filename, heatmap
        )
        if isinstance(prepared, Refusal):
            return self._refused(prepared, name)
        job = Job(category, prepared.image)
        if not self.queue.offer(job):
            refusal = (
                Refusal(503, SHUTTING_DOWN, "the service is shutting down")
                if self.queue.closed
                else Refusal(503, QUEUE_FULL, f"the queue is full ({self.queue.size} images "
                                              "waiting); retry shortly")
            )  # fmt: skip
            return self._refused(refusal, name)
        await asyncio.wait([asyncio.wrap_future(job.result)])
        return await self._answer(category, job, prepared, heatmap, arrived)

    def _refused(self, refusal: Refusal, category: str | None = None) -> tuple[int, dict]:
        self.refuse(refusal, category)
        return refusal.status, refusal.body(category if category in self.categories else None)

    async def _answer(
        self, category: Category, job: Job, prepared: Prepared, heatmap: bool, arrived: float
    ) -> tuple[int, dict]:
        """The decision row of a scored job (predict's `decision_fields`)."""
        failure = job.result.exception()
        if failure is not None:
            message = f"the model failed on this image ({type(failure).__name__}: {failure})"
            return self._refused(Refusal(500, MODEL_FAILED, one_line(message)), category.name)
        score, model_map = job.result.result()
        fields = decision_fields(category.scorer, category.threshold, score)
        rejected = fields["decision"] != "accept"
        status, extra = 200, {}
        if not math.isfinite(score):
            # predict's rule rejects it; JSON has no NaN, so the score is reported as null.
            status = 500
            extra = {"score": None, "error": f"the model gave a non-finite score ({score}); "
                     "the image is rejected", "reason": NON_FINITE_SCORE}  # fmt: skip
            self.metrics.errors.labels(NON_FINITE_SCORE).inc()
            LOGGER.warning("Non-finite score %s in category %s: rejected", score, category.name)
        elif heatmap:
            loop = asyncio.get_running_loop()
            extra["heatmap_png"] = await loop.run_in_executor(
                self.decoder, self.heatmap_png, category, prepared, model_map, score, rejected
            )
        elapsed = time.perf_counter() - arrived
        self.metrics.requests.labels(category.name, fields["decision"]).inc()
        self.metrics.latency.labels(category.name).observe(elapsed)
        body = {"category": category.name, **fields, "runtime": category.runtime,
                "api_version": API_VERSION, "elapsed_ms": round(elapsed * 1000, 3),
                "batch_size": job.batch_size, **extra}  # fmt: skip
        return status, body


# ------------------------------------------------------------------------ HTTP
async def read_upload(request, limit: int) -> tuple[bytes, str] | Refusal:
    """The image of a request: the raw body, or the `image` field (else the only file) of a
    multipart form; at most `limit` bytes in all (a Refusal as soon as more arrive)."""
    declared = request.headers.get("content-length", "")
    too_large = Refusal(413, TOO_LARGE, f"the request is larger than {limit} bytes "
                                        "(--max_request_mb)")  # fmt: skip
    if declared.isdigit() and int(declared) > limit:
        return too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
    data = b"".join(chunks)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return data, "upload"
    return await _multipart_image(request.headers, data)


async def _multipart_image(headers, data: bytes) -> tuple[bytes, str] | Refusal:
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def body():
        yield data

    try:
        form = await MultiPartParser(headers, body(), max_files=1, max_fields=16).parse()
    except MultiPartException as error:
        return Refusal(400, BAD_REQUEST, one_line(f"malformed multipart form: {error}"))
    files = [value for value in form.values() if isinstance(value, UploadFile)]
    chosen = form.get(MULTIPART_FIELD)
    if not isinstance(chosen, UploadFile):
        chosen = files[0] if len(files) == 1 else None
    if chosen is None:
        return Refusal(400, BAD_REQUEST, f"the multipart form has no '{MULTIPART_FIELD}' file")
    content = await chosen.read()
    await form.close()
    return content, printable_name(chosen.filename or "upload")


def request_key(request) -> str | None:
    """The API key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.headers.get(API_KEY_HEADER)


def create_app(load: Callable[[], InspectionService] | None = None):
    """The FastAPI app. With `load`, the app's lifespan builds and starts the service and
    stops it (draining the queue) at shutdown; without, whoever hosts the app (a Ray Serve
    replica) sets `app.state.service`."""
    require_serving_packages()
    from fastapi import FastAPI, Request, Response
    from fastapi.responses import JSONResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        service = load()
        service.start()
        app.state.service = service
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.stop)

    app = FastAPI(
        title="patchcore-serve", version=str(API_VERSION), lifespan=lifespan if load else None,
        docs_url=None, redoc_url=None, openapi_url=None,
    )  # fmt: skip

    def denied(request: Request) -> JSONResponse | None:
        service: InspectionService = request.app.state.service
        if service.options.key_matches(request_key(request)):
            return None
        refusal = service.refuse(Refusal(401, UNAUTHORIZED, "missing or wrong API key "
                                         "(Authorization: Bearer KEY or X-API-Key: KEY)"))  # fmt: skip
        return JSONResponse(refusal.body(), 401, headers={"WWW-Authenticate": "Bearer"})

    @app.post("/v1/categories/{category}/inspect")
    async def inspect(category: str, request: Request, heatmap: bool = False):
        arrived = time.perf_counter()
        service: InspectionService = request.app.state.service
        refused = denied(request)
        if refused is not None:
            return refused
        upload = await read_upload(request, service.options.max_request_bytes)
        if isinstance(upload, Refusal):
            service.refuse(upload, category)
            known = category if category in service.categories else None
            return JSONResponse(upload.body(known), upload.status)
        status, body = await service.inspect(category, *upload, heatmap, arrived)
        headers = {"Retry-After": RETRY_AFTER_SECONDS} if status == 503 else None
        return JSONResponse(body, status, headers=headers)

    @app.get("/v1/categories")
    async def categories(request: Request):
        refused = denied(request)
        if refused is not None:
            return refused
        service: InspectionService = request.app.state.service
        return {"categories": [category.describe() for category in service.categories.values()]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request):
        service = getattr(request.app.state, "service", None)
        if service is None or not service.ready:
            state = "draining" if service is not None and service.queue.closed else "starting"
            return JSONResponse({"status": state}, 503)
        return {"status": "ready", "categories": sorted(service.categories)}

    @app.get("/metrics")
    async def metrics(request: Request):
        refused = denied(request)
        if refused is not None:
            return refused
        content, media_type = request.app.state.service.metrics.text()
        return Response(content, media_type=media_type)

    return app


# ------------------------------------------------------------------------ running
def warn_about_host(host: str, options: ServeOptions) -> None:
    """A warning when the service listens beyond this machine (and louder without a key)."""
    if host in LOOPBACK_HOSTS:
        return
    LOGGER.warning(
        "Listening on %s: any machine that can reach the port can send images%s", host,
        "" if options.api_key else " (and no API key is required: set --api_key_file or "
        f"{API_KEY_VARIABLE}); serve on a trusted network or behind a TLS proxy",
    )  # fmt: skip


@dataclass(frozen=True)
class ServerSettings:
    """Where the service listens and how long a stop may wait for requests in flight."""

    host: str = DEFAULT_HOST
    port: int = 8080
    drain_seconds: float = 30.0
    log_level: str = "info"


def serve_forever(options: ServeOptions, settings: ServerSettings) -> None:
    """Runs the service under uvicorn until SIGTERM or SIGINT, then drains and returns.

    uvicorn stops listening at the signal, waits (up to `drain_seconds`) for the requests in
    flight to be answered, and runs the app's shutdown, which lets the model thread score
    what is queued; the command then exits 0."""
    import signal

    import uvicorn

    require_serving_packages()
    warn_about_host(settings.host, options)
    service = InspectionService.load(options)
    app = create_app(lambda: service)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, timeout_graceful_shutdown=settings.drain_seconds,
        # connections beyond the queue and a batch being scored get uvicorn's 503 at once
        limit_concurrency=options.queue_size + 2 * options.max_batch + 16,
        proxy_headers=False, server_header=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    handled = (signal.SIGTERM, signal.SIGINT)
    stops: list[int] = []
    # uvicorn handles the signals while it runs and, once stopped, raises the one it got
    # again for the handler it found; that handler is this one, which only records it.
    previous = {number: signal.signal(number, lambda number, _: stops.append(number))
                for number in handled}  # fmt: skip
    LOGGER.info("Serving %s on http://%s:%d (POST /v1/categories/CATEGORY/inspect)",
                ", ".join(service.categories), settings.host, settings.port)  # fmt: skip
    try:
        server.run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    LOGGER.info("Stopped%s", f" by signal {stops[0]}, requests drained" if stops else "")


# ------------------------------------------------------------------------ Ray Serve
@dataclass(frozen=True)
class ReplicaSettings:
    """Ray Serve replicas: how many, and the CPUs and GPUs each one reserves."""

    replicas: int = 1
    cpus: float = 1.0
    gpus: float = 0.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ConfigurationError(f"--replicas must be >= 1, got {self.replicas}")
        if not self.cpus > 0:
            raise ConfigurationError(f"--replica_cpus must be > 0, got {self.cpus}")
        if not self.gpus >= 0:
            raise ConfigurationError(f"--replica_gpus must be >= 0, got {self.gpus}")


def ray_application(options: ServeOptions, replicas: ReplicaSettings):
    """The app as a Ray Serve deployment, bound to `options`: each replica loads the models,
    runs its own model thread (torch limited to the replica's CPUs) and serves the same
    FastAPI app; Ray Serve's proxies spread requests over the replicas."""
    from ray import serve

    threads = max(1, int(replicas.cpus))

    @serve.deployment(
        name="patchcore", num_replicas=replicas.replicas,
        ray_actor_options={"num_cpus": replicas.cpus, "num_gpus": replicas.gpus},
        max_ongoing_requests=options.queue_size + options.max_batch,
        graceful_shutdown_timeout_s=30,
    )  # fmt: skip
    @serve.ingress()
    class PatchCoreReplica:
        def __init__(self, options: ServeOptions) -> None:
            torch.set_num_threads(threads)
            self.service = InspectionService.load(options)
            self.service.start()

        def __serve_build_asgi_app__(self):
            # Ray Serve builds the replica's app after __init__: this replica's service
            app = create_app()
            app.state.service = self.service
            return app

        def check_health(self) -> None:
            # Ray Serve's health check: an exception marks the replica unhealthy.
            if not self.service.ready:
                raise RuntimeError("the model thread has stopped")

        def __del__(self) -> None:
            self.service.stop()

    return PatchCoreReplica.bind(options)


def serve_on_ray(options: ServeOptions, settings: ServerSettings, replicas: ReplicaSettings,
                 address: str | None = None) -> None:  # fmt: skip
    """Runs the app on Ray Serve (a local Ray instance, or the cluster at `address`) until
    SIGTERM or SIGINT, then shuts the deployment down (replicas finish their requests)."""
    import signal

    from patchcore.apps.sweep import ClusterOptions, ray_session

    warn_about_host(settings.host, options)
    stop = threading.Event()
    handled = (signal.SIGTERM, signal.SIGINT)
    with ray_session(ClusterOptions(address=address)):
        from ray import serve

        # Replicas answer (and /ready says so) before serve.run returns: a stop signal from
        # then on must reach this handler, not Ray's, which aborts the driver.
        previous = {number: signal.signal(number, lambda *_: stop.set()) for number in handled}
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(ray_application(options, replicas), name="patchcore", route_prefix="/")
        for number in handled:
            signal.signal(number, lambda *_: stop.set())
        LOGGER.info("Serving %s on Ray Serve, %d replica(s), http://%s:%d",
                    ", ".join(model.category for model in options.models),
                    replicas.replicas, settings.host, settings.port)  # fmt: skip
        try:
            stop.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
            serve.shutdown()
    LOGGER.info("Stopped")
