"""Shared test fixtures: paths to the real sample corpora next to the repository."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DATASETS = REPO_ROOT.parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        raise FileNotFoundError(
            f"the sample corpora are missing: expected {DATASETS} (../shared/datasets next to the repository)"
        )
    return DATASETS
