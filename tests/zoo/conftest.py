"""Zoo fixtures: data from APPARATE_DATA or ../shared/data (relative to the repo root)."""

from __future__ import annotations

import pytest

from tests.model.conftest import find_data_dir


@pytest.fixture(scope="session")
def data_dir():
    return find_data_dir()


@pytest.fixture(scope="session")
def r20(data_dir):
    from apparate.zoo.workloads import get_workload

    return get_workload("cifar10-resnet20", data_dir)
