"""The house rules a test can check: every module on a floor (core, data, models, training, sweep, measures,
analysis, report, pipeline, cli) and no import running up a floor, no import cycles inside the package, one
registered function per extension point (each registry's entries found by name), and the registries parametrise
the contract tests."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "transferbench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """transferbench modules this file imports, at module level or inside functions (a deferred import is still a
    dependency)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("transferbench"):
                found.add(target)
                found |= {f"{target}.{a.name}" for a in node.names}  # `from . import x` imports module x
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("transferbench")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports(p) if t in modules and t != m} for m, p in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_one_that_imports_it_back():
    edges = graph()
    # a package __init__ that re-exports its own submodules is not a cycle of meaning: leave those edges out
    edges = {m: {t for t in ts if not (t.startswith(m + ".") or m.startswith(t + ".") and t == m.rsplit(".", 1)[0])}
             for m, ts in edges.items()}
    assert cycles(edges) == []


# The floors of the house, bottom to top: a module may import its own floor and those below, never one above.
FLOORS = ["core", "data", "models", "training", "sweep", "measures", "analysis", "report", "pipeline", "advise", "cli"]


def floor(module: str) -> int:
    """transferbench.<folder>.<module> (or transferbench.pipeline, transferbench.cli) -> its floor; the package root
    sits at the bottom."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 else 0


def test_every_module_lives_on_a_floor():
    assert all(module == "transferbench" or module.split(".")[1] in FLOORS for module in graph())


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in edges.items() for t in ts if floor(t) > floor(m))


def test_no_lower_floor_imports_an_upper_one():
    found = upward(graph())
    assert found == [], "imports that run up the house: " + ", ".join(f"{m} -> {t}" for m, t in found)


def test_the_floor_check_can_fail():
    edges = {"transferbench.data.raw": {"transferbench.core.errors", "transferbench.training.loop"}}
    assert upward(edges) == [("transferbench.data.raw", "transferbench.training.loop")]


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def registries():
    from transferbench.data import DATASETS, SHIFTS
    from transferbench.measures import MEASURES
    from transferbench.models.backbones import WEIGHTS
    from transferbench.training.schedules import OPTIMIZERS, SCHEDULES

    return {"dataset": DATASETS, "shift": SHIFTS, "schedule": SCHEDULES, "optimizer": OPTIMIZERS,
            "weight source": WEIGHTS, "measure": MEASURES}


@pytest.mark.parametrize("kind", ["dataset", "shift", "schedule", "optimizer", "weight source", "measure"])
def test_every_registry_has_entries_with_docs_or_metadata(kind):
    reg = registries()[kind]
    assert reg.kind == kind and reg.names()
    for name, fn in reg.items():
        assert callable(fn) and isinstance(reg.meta(name), dict)


def test_every_measure_declares_inputs_sign_and_label():
    from transferbench.measures import MEASURES

    for name, _ in MEASURES.items():
        meta = MEASURES.meta(name)
        assert meta["inputs"] in ("pair", "labelled", "labelled_pair", "source", "bn_profile")
        assert meta["sign"] in (-1, 1)
        assert meta["label"]


@pytest.mark.parametrize("weights,source", [("imagenet", "imagenet"), ("none", "none"), ("hub", "hub"),
                                            ("pretrain:glyphs", "pretrain:<dataset>"),
                                            ("ckpt/model.safetensors", "<file>.pth|.safetensors"),
                                            ("model.pth", "<file>.pth|.safetensors")])
def test_weight_strings_are_served_by_one_registered_source(weights, source):
    from transferbench.models.backbones import weight_source

    assert weight_source(weights) == source


def test_an_unknown_weight_source_is_refused_with_a_suggestion():
    from transferbench.core.errors import ConfigError
    from transferbench.models.backbones import weight_source

    with pytest.raises(ConfigError, match="unknown weight source 'imagenett'"):
        weight_source("imagenett")


def test_figures_name_weight_sources_through_the_registry():
    from transferbench.report.plots import source_label

    assert source_label("pretrain:glyphs:3f75e78e067be62c") == "glyphs-pretrained"
    assert source_label("imagenet") == "imagenet" and source_label("ckpt/a.pth") == "ckpt/a.pth"


@pytest.mark.parametrize("kind", ["datasets", "shifts", "schedules", "recipes", "optimizers", "weights", "measures",
                                  "figures"])
def test_list_prints_every_entry_with_what_it_is(kind, capsys):
    """`transferbench list KIND` (timm's list_models for each registry): every entry named, each with a summary."""
    from transferbench.cli import LISTS, main

    assert kind in LISTS and main(["list", kind]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(len(line.split(None, 1)) == 2 for line in lines), lines
    if kind == "recipes":
        assert {line.split()[0] for line in lines} == {"lp_ft", "cosine_llrd"} and all("arm=" in x for x in lines)


def test_a_summary_is_the_first_sentence_not_cut_at_et_al():
    from transferbench.core.registry import Registry

    reg = Registry("thing")

    @reg.register()
    def cited():
        """Accuracy against compute (He et al. 2019: does scratch catch up?), per arm. Longer detail here."""

    @reg.register()
    def plain():
        """x0.1 at 50% of training"""

    assert reg.summary("cited") == "Accuracy against compute (He et al. 2019: does scratch catch up?), per arm."
    assert reg.summary("plain") == "x0.1 at 50% of training."
