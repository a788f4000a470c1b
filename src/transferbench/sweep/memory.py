"""Whether a study can fit in this machine's memory at all, checked at planning: a lower bound on what every cell
holds, so that an `image_size` no machine of this size can train (4096 px asked for 216 GB) is refused before the
first cell, not by every cell in turn. A lower bound only: a study that passes may still need more (workers, caches,
a backward pass); one that fails cannot run here."""

from __future__ import annotations

import functools
import math

from transferbench.core.errors import ConfigError

FLOAT_BYTES = 4  # targets are held as float32 tensors at the study's image size


def target_bytes(n_images: int, image_size: int) -> int:
    """A whole target (every split) as float32 [N, 3, S, S]: what `data.load_target` holds in each worker."""
    return n_images * 3 * image_size ** 2 * FLOAT_BYTES


@functools.cache
def largest_activation_bytes(model_name: str, batch_size: int, image_size: int) -> int:
    """The largest single tensor a forward pass of one batch makes (shapes only: computed on the meta device); 0
    where the meta device cannot run the model. Refused if the model cannot take this input size at all (a ViT
    built for 224 px given 32 px)."""
    import timm
    import torch

    try:
        return _largest_on_meta(model_name, batch_size, image_size)
    except Exception:  # the model refuses the size, or an op the meta device lacks: tell them apart on one image
        try:
            with torch.no_grad():
                timm.create_model(model_name).eval()(torch.zeros(1, 3, image_size, image_size))
        except Exception as e:
            size = timm.models.get_pretrained_cfg_value(model_name, "input_size")
            raise ConfigError("train.image_size", f"{model_name} cannot take {image_size} px inputs "
                              f"({type(e).__name__}: {' '.join(str(e).split())[:120]})",
                              f"use the size it was built for ({size[-1]} px)" if size else
                              "use the size the model was built for, or a model that takes any size") from None
        return 0


def _largest_on_meta(model_name: str, batch_size: int, image_size: int) -> int:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(model_name)
    largest = 0

    def measure(module, inputs, output):
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output.numel() * FLOAT_BYTES)

    leaves = [m for m in model.modules() if not any(m.children())]
    handles = [m.register_forward_hook(measure) for m in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(batch_size, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return largest


def check_fits(targets: dict[str, int], models: list[str], batch_size: int, image_size: int,
               total: int | None = None) -> None:
    """Refuse when the largest target's tensors plus one batch's largest activation exceed this machine's memory.
    `targets`: label -> number of images (every split)."""
    import psutil

    total = total or psutil.virtual_memory().total
    label, n = max(targets.items(), key=lambda kv: kv[1])
    model = max(models, key=lambda m: largest_activation_bytes(m, batch_size, image_size))
    data, act = target_bytes(n, image_size), largest_activation_bytes(model, batch_size, image_size)
    if data + act <= total:
        return
    largest_fitting = int(image_size * math.sqrt(total / (data + act)))  # both grow with the square of the size
    raise ConfigError("train.image_size", f"{image_size} px needs at least {(data + act) / 1e9:,.0f} GB of memory "
                      f"(the {n:,} images of '{label}' as float32 tensors: {data / 1e9:,.1f} GB; the largest "
                      f"activation of one batch of {batch_size} in {model}: {act / 1e9:,.1f} GB), above this "
                      f"machine's {total / 1e9:,.0f} GB", f"use a smaller image_size (below about {largest_fitting} px "
                      "here)")
