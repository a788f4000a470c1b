"""Source pretraining: `weights: pretrain:<dataset>` trains the backbone from scratch on an embedded
source dataset (the same training loop as every cell), caches the checkpoint as safetensors keyed
by the source cell's id (the one hash of a cell: adding a Cell field with a default leaves it unchanged), and
serves it as pretrained weights (`pretrain:<dataset>:<cell id>`).
"""

from __future__ import annotations

from transferbench.core.atomic import replacing
from transferbench.core.study import Cell, Study, machine_protocol

PREFIX = "pretrain:"


def source_cell(study: Study, model: str, dataset: str) -> Cell:
    """Scratch training on the source's whole training pool, with the study's pretraining budget."""
    from transferbench.data import DATASETS, load_raw
    from transferbench.data.sampling import class_counts

    DATASETS.get(dataset, "backbones.weights (pretrain:<dataset>)")
    p, t = study.pretraining, study.train
    n = min(class_counts(load_raw(dataset).splits["train"][1]).values())
    return Cell(arm="scratch", model=model, weights="none", dataset=dataset, shift=None, severity=0, frozen_depth=0,
                n_per_class=n, schedule=p.schedule, lr=p.lr, seed=p.seed, epochs=p.epochs, batch_size=p.batch_size,
                augment=p.augment, **machine_protocol(t))


def weights_map(study: Study) -> dict[tuple[str, str], str]:
    """(model, 'pretrain:<dataset>') -> 'pretrain:<dataset>:<cell id of the source cell>'."""
    from transferbench.models.backbones import trained_here

    return {(b.model, b.weights): f"{b.weights}:{source_cell(study, b.model, b.weights[len(PREFIX):]).cell_id}"
            for b in study.backbones if trained_here(b.weights)}


def ensure_checkpoints(study: Study, log=print) -> None:
    """Train every `pretrain:` source the study names that is not cached yet."""
    from safetensors.torch import save_file

    from transferbench.models.backbones import source_checkpoint
    from transferbench.training.cell import fit

    for (model, weights), resolved in weights_map(study).items():
        cell = source_cell(study, model, weights[len(PREFIX):])
        path = source_checkpoint(model, resolved)
        if path.exists():
            continue
        log(f"pretraining {model} on {cell.dataset}: {cell.epochs} epochs, {cell.n_per_class} per class")
        net, record = fit(cell)
        assert net is not None  # a source cell trains a network
        with replacing(path) as tmp:  # source_checkpoint's folder comes from cache_dir, which makes it
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                      metadata={"source": cell.dataset, "val_acc": f"{record['val_acc']:.4f}"})
        log(f"  source val accuracy {record['val_acc']:.3f} in {record['cell_seconds']:.0f} s -> {path}")


def cells_of(study: Study) -> list[Cell]:
    """The study's cells, with pretrained sources named by their config hash."""
    from transferbench.core.study import expand

    return expand(study, weights_map(study))
