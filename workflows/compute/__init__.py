"""Compute: what runs on Ray. ``local_ray`` (the workflow's own Ray, or a cluster's), ``jobs`` (Ray Jobs
submission), ``training`` (the Ray Train worker and its typed ``WorkerSpec``, one ``TorchTrainer``
factory) and ``ui`` (the MLflow UI process). Imports configs, spec and tracking; no stage."""
