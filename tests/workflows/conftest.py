"""Fixtures for the workflow tests: a real local Ray (the corpora, shards and a finished workflow they
share with the other suites are in tests/conftest.py)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    """A real local Ray with 2 CPUs and its state under the test's temp dir; shut down afterwards."""
    import ray

    temp = tmp_path_factory.mktemp("ray")
    os.environ["RAY_TMPDIR"] = str(temp)
    # A loaded machine (CI, or a benchmark beside the tests) can take over Ray Train's default 60 s to
    # start a worker group (each worker imports torch); the controller reads this at start.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    from workflows.compute.local_ray import TRIAL_DRIVER_RESOURCE

    ray.init(num_cpus=2, resources={TRIAL_DRIVER_RESOURCE: 2}, include_dashboard=True, _temp_dir=str(temp),
             logging_level="WARNING")
    yield ray
    ray.shutdown()
