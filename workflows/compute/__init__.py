"""Compute: what runs on Ray. ``local_ray`` (the workflow's own Ray, or a cluster's), ``jobs`` (Ray Jobs
submission), ``training`` (the Ray Train worker and its typed ``WorkerSpec``, one ``TorchTrainer``
factory), ``searches`` (several Tune searches at once, each in its own Ray task, their trial events
relayed to the driver) and ``ui`` (the MLflow UI process). Imports configs, spec and tracking; no stage."""
