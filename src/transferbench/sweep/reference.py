"""The speed of the host, measured in the same job as the cells and under the same load: images/s of a bare PyTorch
training step (timm's tf_efficientnet_lite0 at random init, 32 px, batch 32, SGD, no transferbench code in the loop)
on the threads one worker uses, in as many processes at once as the job has workers, as the cells run. Every record
of the job carries it (`reference_images_per_second`), and the gate divides each cell's images/s by its own job's
reference, so that two runs on different hosts compare as ratios each measured within its own job (the way
bench/test_speed.py sets the harness step beside the same bare step); an absolute images/s is compared only where a
side lacks one.

Why under load: where a host's two vCPUs are two hyperthreads of one physical core, two workers each train at a
fraction of what one alone does. A reference timed with the other worker idle (as it once was) is then faster than
anything the cells see, and the ratio moves with the host's topology, not the harness (docs/gate.md).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import time

MODEL, IMAGE_SIZE, BATCH, WARMUP_STEPS, TIMED_STEPS = "tf_efficientnet_lite0", 32, 32, 3, 12
BARRIER_SECONDS = 120  # the workers' start-up (importing torch and timm) is far shorter
WORKLOAD = dict(model=MODEL, weights="none", image_size=IMAGE_SIZE, batch_size=BATCH, optimizer="sgd",
                warmup_steps=WARMUP_STEPS, timed_steps=TIMED_STEPS)


def measure(threads: int, barrier=None) -> dict:
    """The bare step's images/s (the median of the timed steps) on `threads` threads, the timed steps starting when
    every party of `barrier` (a multiprocessing barrier, one party per worker) has warmed up; the process's thread
    count and random state are left as they were (cells trained after it in this process draw what they would
    have)."""
    import timm
    import torch
    import torch.nn.functional as F

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = timm.create_model(MODEL, pretrained=False, num_classes=10).train()
            x, y = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE), torch.arange(BATCH) % 10
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            times, began = [], time.time()
            for i in range(WARMUP_STEPS + TIMED_STEPS):
                if i == WARMUP_STEPS and barrier is not None:
                    barrier.wait(timeout=BARRIER_SECONDS)
                    began = time.time()
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if i >= WARMUP_STEPS:
                    times.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    times.sort()
    timed = dict(pid=os.getpid(), began=began, ended=time.time()) if barrier is not None else {}
    return dict(images_per_second=BATCH / times[len(times) // 2], threads=threads, workload=WORKLOAD) | timed


def for_job(study, backend: str, workers: int) -> dict:
    """The record fields of this job's reference: measured where the cells train on this host's CPU, by `workers`
    processes at once (`under_load`); none for a dask cluster (other hosts) or a GPU (not measured against a CPU
    step)."""
    from transferbench.models.device import resolve_device

    if backend == "dask" or resolve_device(study.train.device).type != "cpu":
        return {}
    return dict(reference_images_per_second=under_load(workers, study.run.threads_per_worker))


def under_load(workers: int, threads: int) -> float:
    """The median images/s of the bare step run by `workers` processes at once (`at_once`), each on `threads`
    threads: the load the cells train under. One worker measures in this process."""
    if workers == 1:
        return measure(threads)["images_per_second"]
    return statistics.median(m["images_per_second"] for m in at_once(workers, threads))


def at_once(workers: int, threads: int) -> list[dict]:
    """`measure` in `workers` fresh processes whose timed steps start together (after every one's warm-up). Fresh
    processes, not the job's joblib workers: loky restarts a worker whose memory grows by 300 MB after its first
    task, and a first task this small would set that mark below every worker's feature cache. Spawned, so a script
    that calls this (through `run_cells`) needs the usual `if __name__ == "__main__":` guard; the CLI has it."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's thread pools
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    processes = [ctx.Process(target=_measure_into, args=(threads, barrier, results), daemon=True)
                 for _ in range(workers)]
    for p in processes:
        p.start()
    try:
        measured = _collect(results, processes, time.monotonic() + BARRIER_SECONDS + 60)
    finally:
        for p in processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    failed = [m for m in measured if "error" in m]
    if failed:
        raise RuntimeError(f"the reference step failed in a worker: {failed[0]['error']}")
    return measured


def _collect(results, processes: list, deadline: float) -> list[dict]:
    """One result per process; a process that died without one (killed, crashed in start-up) fails at once."""
    measured: list[dict] = []
    while len(measured) < len(processes):
        try:
            measured.append(results.get(timeout=1))
        except queue.Empty:
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"the reference step did not finish in every worker (exit codes {dead})" if dead
                                   else "the reference step did not finish in time in every worker") from None
    return measured


def _measure_into(threads: int, barrier, results) -> None:
    try:
        results.put(measure(threads, barrier))
    except Exception as e:  # the parent raises it: a hang would be worse than a failed study start
        barrier.abort()
        results.put(dict(error=f"{type(e).__name__}: {e}"))
