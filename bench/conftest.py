import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def bench_env(tmp_path_factory):
    """One thread (as a study worker runs) and a fresh feature cache: timings start cold."""
    os.environ.setdefault("TRANSFERBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.set_num_threads(1)


TIMES: dict[str, float] = {}  # mean seconds of each benchmark, for the side-by-side ratios


def record(benchmark, name: str, images: int) -> float:
    mean = benchmark.stats.stats.mean
    TIMES[name] = mean
    benchmark.extra_info["images_per_second"] = round(images / mean, 1)
    return mean
