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


def seconds_of(name: str, fn, rounds: int = 15, warmup: int = 3) -> float:
    """The mean seconds of benchmark `name` if it already ran in this session, else measured here the same way
    (warm-up rounds, then the mean of `rounds`): a ratio never depends on which test ran first, or alone."""
    import time

    if name not in TIMES:
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        TIMES[name] = (time.perf_counter() - t0) / rounds
    return TIMES[name]
