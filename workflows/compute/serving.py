"""A registered vitflow model on Ray Serve: HTTP POST of an encoded image -> JSON (``vitflow serve``).

One deployment, :class:`ViTClassifier`, run by Ray Serve with its own batching (``@serve.batch``: requests
arriving together are classified in one forward pass, up to ``max_batch_size`` of them, waiting at most
``batch_wait_timeout_s`` for a batch to fill) and its own replicas. Each replica resolves the model itself
through the tracking server (the plain files of ``vit.inference``; nothing large travels through Serve's
controller) and classifies with ``vit.inference.ImageClassifier``, the path the MLflow pyfunc and batch
prediction use, so all three answer alike. An alias (``@champion``) is resolved to its version once, before
deploying: every replica serves the same model even if the alias moves while they start.

    POST {route}              body: the image file's bytes (JPEG, PNG, WebP); ?top_k=3 (default 5)
      200 {"label": ..., "score": ..., "top_labels": [...], "top_scores": [...], "model_uri": ...}
      400 {"error": "..."}    the body is not an image, or top_k is not a positive integer
    GET  {route}              what is served: the model URI, its classes and image size, the options, and
                              how many images and batches the answering replica has classified
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from vit.precision import CHOICES

APP_NAME = "vitflow"


@dataclass(frozen=True)
class ServeOptions:
    replicas: int = 1
    max_batch_size: int = 16  # images per forward pass
    batch_wait_timeout_s: float = 0.01  # how long a request waits for others to join its batch
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica; with a GPU the replica classifies on it
    precision: str = "auto"  # vit.precision: bf16 where the hardware has it natively
    top_k: int = 5  # the default number of classes in a response
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"

    def __post_init__(self):
        problems = [f"{name} must be >= 1, got {getattr(self, name)}" for name in ("replicas", "max_batch_size", "top_k")
                    if getattr(self, name) < 1]
        if self.batch_wait_timeout_s < 0 or self.num_cpus < 0 or self.num_gpus < 0:
            problems.append("batch_wait_timeout_s, num_cpus and num_gpus must be >= 0")
        if not 0 < self.port < 65536:
            problems.append(f"port must be in 1..65535, got {self.port}")
        if not self.route_prefix.startswith("/"):
            problems.append(f"route_prefix must start with '/', got {self.route_prefix!r}")
        if self.precision not in CHOICES:
            problems.append(f"precision must be one of {', '.join(CHOICES)}, got {self.precision!r}")
        if problems:
            raise ValueError("serve options: " + "; ".join(problems))


@serve.deployment
class ViTClassifier:
    def __init__(self, tracking_uri: str, model_uri: str, options: dict):
        import torch

        from vit import VisionTransformer
        from vit.inference import ImageClassifier
        from workflows.tracking.models import load_plain_model

        self.options = ServeOptions(**options)
        plain = load_plain_model(tracking_uri, model_uri)
        model = VisionTransformer(plain.config)
        model.load_state_dict(plain.state_dict)
        device = "cuda" if self.options.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        # every class ranked: a request's top_k slices them
        self.classifier = ImageClassifier(model, plain.class_names, plain.preprocessing, device=device,
                                          precision=self.options.precision, top_k=len(plain.class_names),
                                          batch_size=self.options.max_batch_size)
        self.model_uri = model_uri
        self.classify.set_max_batch_size(self.options.max_batch_size)
        self.classify.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)
        self.served = {"images": 0, "batches": 0}  # this replica's, since it started

    @serve.batch
    async def classify(self, images: list[bytes]) -> list:
        self.served["images"] += len(images)
        self.served["batches"] += 1
        # the forward pass off the event loop: the replica keeps answering health checks meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.classifier.classify, images)

    async def __call__(self, request: Request) -> JSONResponse:
        if request.method == "GET":
            return JSONResponse({"model_uri": self.model_uri, "classes": self.classifier.class_names,
                                 "image_size": self.classifier.image_size, "options": asdict(self.options),
                                 "served": self.served})
        raw_top_k = request.query_params.get("top_k", str(self.options.top_k))
        if not raw_top_k.isdigit() or int(raw_top_k) < 1:
            return JSONResponse({"error": f"top_k must be a positive integer, got {raw_top_k!r}"}, status_code=400)
        body = await request.body()
        if not body:
            return JSONResponse({"error": "the request has no body: POST the image file's bytes"}, status_code=400)
        result = await self.classify(body)
        if isinstance(result, ValueError):
            return JSONResponse({"error": str(result)}, status_code=400)
        k = int(raw_top_k)
        return JSONResponse({"label": result.label, "score": result.score, "top_labels": list(result.top_labels[:k]),
                             "top_scores": list(result.top_scores[:k]), "model_uri": self.model_uri})


def deploy(tracking_uri: str, model_uri: str, options: ServeOptions) -> str:
    """Deploy the model on the Ray this process is connected to; returns the URL it answers on."""
    serve.start(http_options={"host": options.host, "port": options.port})
    app = ViTClassifier.options(
        num_replicas=options.replicas,
        max_ongoing_requests=max(2 * options.max_batch_size, 8),  # enough queued for a batch to fill
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
    ).bind(tracking_uri, model_uri, asdict(options))
    serve.run(app, name=APP_NAME, route_prefix=options.route_prefix)
    return f"http://{options.host}:{options.port}{options.route_prefix}"


def shutdown() -> None:
    serve.shutdown()
