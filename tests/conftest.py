import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Embedded datasets and features are built into a fresh cache: the tests prove they can be."""
    path = tmp_path_factory.mktemp("cache")
    old = os.environ.get("TRANSFERBENCH_CACHE")
    os.environ["TRANSFERBENCH_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("TRANSFERBENCH_CACHE", None)
    else:
        os.environ["TRANSFERBENCH_CACHE"] = old


@pytest.fixture(scope="session")
def torch_single_thread():
    import torch

    torch.set_num_threads(1)
