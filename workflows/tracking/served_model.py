"""The MLflow pyfunc every vitflow model is logged with: images in, class names and probabilities out.

This file is an MLflow "model from code" (``mlflow.pyfunc.log_model(python_model=<this file>)``): MLflow
copies it into the model and runs it where the model is loaded, with the ``vit`` package shipped beside it
(``code_paths``), so loading a model unpickles nothing and needs no vitflow install, only the logged
requirements (torch, torchvision, pillow). It is never imported by vitflow itself.

Input: a DataFrame with a column ``image``, one base64-encoded image (JPEG, PNG, WebP) per row; the model's
own preprocessing (resolution, normalisation, centre crop, as logged with it) is applied inside.
Output: a DataFrame with, per row, ``label`` (the top-1 class name), ``score`` (its probability),
``top_labels`` and ``top_scores`` (the k most probable; ``top_k`` is a parameter, 5 by default).
Options when loading (``mlflow.pyfunc.load_model(uri, model_config={...})``): ``precision`` (auto: bf16
where the hardware has it), ``top_k`` (5) and ``batch_size`` (64 images per forward pass). None is logged
with the model: MLflow would log them as the run's params, beside (and clashing with) its training's.
A row that is not an image fails the request (HTTP 400 from ``mlflow models serve``) with an error naming
every such row and why; nothing is returned for the others.

    mlflow models serve -m models:/vit-flowers@champion --env-manager local -p 5001
    curl -H 'Content-Type: application/json' -d '{"dataframe_split": {"columns": ["image"],
         "data": [["<base64>"]]}}' localhost:5001/invocations
"""

from __future__ import annotations

import base64
import binascii

import mlflow
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

IMAGE_COLUMN = "image"


class VitImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        from vit.inference import ImageClassifier

        config = context.model_config or {}
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.classifier = ImageClassifier.from_folder(
            context.artifacts["model"], device=device, precision=config.get("precision", "auto"),
            top_k=int(config.get("top_k", 5)), batch_size=int(config.get("batch_size", 64)))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException(f"expected a column {IMAGE_COLUMN!r} of base64-encoded images, got {columns}",
                                  error_code=INVALID_PARAMETER_VALUE)
        classifier = self.classifier
        top_k = int((params or {}).get("top_k", classifier.top_k))
        if top_k < 1:
            raise MlflowException(f"top_k must be >= 1, got {top_k}", error_code=INVALID_PARAMETER_VALUE)
        decoded, problems = {}, {}
        for row, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                decoded[row] = bytes(value) if isinstance(value, (bytes, bytearray)) else base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError, ValueError) as error:
                problems[row] = f"row {row}: not base64 ({error})"
        rows = list(decoded)
        results = classifier.classify([decoded[row] for row in rows], names=[f"row {row}" for row in rows], top_k=top_k)
        problems.update((row, str(result)) for row, result in zip(rows, results) if isinstance(result, ValueError))
        if problems:
            raise MlflowException(f"{len(problems)} of {len(model_input)} rows are not images: "
                                  + "; ".join(problems[row] for row in sorted(problems)), error_code=INVALID_PARAMETER_VALUE)
        return pd.DataFrame({
            "label": [result.label for result in results],
            "score": [result.score for result in results],
            "top_labels": [list(result.top_labels) for result in results],
            "top_scores": [list(result.top_scores) for result in results],
        })

mlflow.models.set_model(VitImageClassifier())
