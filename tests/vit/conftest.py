"""Fixtures shared by the model-core tests."""

import pytest

from tests.vit.test_data import write_dataset


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A small real-image shard set (CIFAR-sized, four classes' worth of train, two of val)."""
    return write_dataset(tmp_path_factory.mktemp("cifar"), {"train": [40, 24, 31, 33], "val": [20, 12]})
