"""GPU training throughput, timm benchmark.py-style, beside the harness's own step on the same
model and batch (bf16 autocast, channels_last, SGD). Prints images/s for both and their ratio."""

import sys
import time

import timm
import torch

sys.path.insert(0, "src")
from transferbench.training.loop import Step  # noqa: E402
from transferbench.training.schedules import SCHEDULES, make_optimizer  # noqa: E402


def bench(step, x, y, warmup=10, iters=40) -> float:
    for _ in range(warmup):
        step(x, y)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step(x, y)
    torch.cuda.synchronize()
    return iters * len(x) / (time.perf_counter() - t)


def main(model_name="tf_efficientnet_lite0", batch=256, size=224):
    dev = torch.device("cuda")
    model = timm.create_model(model_name, num_classes=1000).to(dev).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def timm_style(x, y):  # as timm's benchmark.py TrainBenchmarkRunner: autocast, backward, step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    bare = bench(timm_style, x, y)
    opt2 = make_optimizer(model.named_parameters(), "sgd", 0.01, 0.0)
    harness = bench(Step(model, opt2, SCHEDULES.get("constant")(opt2, 10**6), dev, amp=True, channels_last=True), x, y)
    print(f"{torch.cuda.get_device_name()} {model_name} batch {batch} at {size}px bf16 channels_last: "
          f"timm-style {bare:.0f} img/s, harness Step {harness:.0f} img/s, ratio {bare / harness:.3f}")


if __name__ == "__main__":
    main()
    main(size=64, batch=64)
