import numpy as np
import pytest
import torch

from transferbench.core.errors import ConfigError
from transferbench.data import DATASETS, SHIFTS, class_counts, load_raw, load_target, nested_kshot
from transferbench.data.embedded import SOURCE_REFERENCE_IMAGES, TEXTURE_IMAGES


@pytest.mark.parametrize("name,min_classes", [("textures", 10), ("digits", 10), ("glyphs", 20), ("faces", 2)])
def test_embedded_targets_have_three_splits_and_enough_classes(name, min_classes):
    t = load_target(name, None, 0, 32)
    assert t.num_classes >= min_classes
    for split in ("train", "val", "test"):
        x, y = t.x[split], t.y[split]
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and len(x) == len(y)
        assert 0 <= x.min() and x.max() <= 1 and x.std() > 0.05  # real images, not blanks
        assert set(y.tolist()) == set(range(t.num_classes))


def test_builders_are_deterministic():
    a, b = DATASETS.get("glyphs")(), DATASETS.get("glyphs")()
    for split in ("train", "val", "test"):
        assert np.array_equal(a.splits[split][0], b.splits[split][0])


def test_source_reference_shares_no_photo_with_textures():
    assert not set(SOURCE_REFERENCE_IMAGES) & set(TEXTURE_IMAGES)


# The contract of each embedded target (task_adaptation style): declared split sizes and classes, splits that share
# no image, and a test set where one image moves accuracy by at most 0.5 pp where the data allows it.
DECLARED = {"textures": ((600, 200, 300), 10), "digits": ((1074, 269, 454), 10), "glyphs": ((1300, 300, 600), 20),
            "faces": ((120, 30, 50), 2)}  # faces: 200 images in all, the data allows no larger test set


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_embedded_target_contract(name):
    raw = load_raw(name)
    sizes, classes = DECLARED[name]
    assert tuple(len(raw.splits[s][1]) for s in ("train", "val", "test")) == sizes
    assert len(raw.classes) == classes
    seen = {}
    for split in ("train", "val", "test"):
        for img in raw.splits[split][0]:
            where = seen.setdefault(img.tobytes(), split)
            assert where == split, f"an image of {split} is also in {where}"
    if name != "faces":
        assert sizes[2] >= 200  # one test image is at most 0.5 pp


def test_glyph_splits_share_no_font():
    from transferbench.data.embedded import glyph_fonts_by_split

    fonts = glyph_fonts_by_split()
    assert [len(fonts[s]) for s in ("train", "val", "test")] == [13, 3, 6]
    assert not set(fonts["train"]) & set(fonts["test"]) and not set(fonts["train"]) & set(fonts["val"])
    assert not set(fonts["val"]) & set(fonts["test"])


def test_cached_copy_equals_a_fresh_build():
    cached = load_raw("digits")  # second call reads the npz
    fresh = DATASETS.get("digits")()
    assert np.array_equal(cached.splits["test"][0], fresh.splits["test"][0])


def test_kshot_subsets_are_nested_and_stratified():
    y = load_target("glyphs", None, 0, 32).y["train"].numpy()
    small, large = nested_kshot(y, 5, seed=3), nested_kshot(y, 20, seed=3)
    assert set(small) <= set(large)
    assert set(class_counts(y[small]).values()) == {5} and set(class_counts(y[large]).values()) == {20}
    assert not np.array_equal(small, nested_kshot(y, 5, seed=4))  # the seed draws another subset


def test_size_larger_than_a_class_is_an_error():
    y = load_target("faces", None, 0, 32).y["train"].numpy()
    with pytest.raises(ConfigError, match="smallest class holds 60"):
        nested_kshot(y, 61, seed=0)


def _high_freq(x):
    return (x[..., 1:] - x[..., :-1]).abs().mean().item()


def test_shift_severity_is_graded():
    clean = load_target("textures", None, 0, 32).x["test"]
    noise = [load_target("textures", "gaussian_noise", s, 32).x["test"] for s in (1, 3, 5)]
    errs = [(n - clean).pow(2).mean().item() for n in noise]
    assert errs[0] < errs[1] < errs[2]
    blur = [_high_freq(load_target("textures", "gaussian_blur", s, 32).x["test"]) for s in (1, 3, 5)]
    assert _high_freq(clean) > blur[0] > blur[1] > blur[2]
    contrast = [load_target("textures", "contrast", s, 32).x["test"].std().item() for s in (1, 3, 5)]
    assert clean.std().item() > contrast[0] > contrast[1] > contrast[2]


def test_shifted_copy_is_fixed():
    a = load_target("digits", "gaussian_noise", 2, 32).x["val"]
    load_target.cache_clear()
    b = load_target("digits", "gaussian_noise", 2, 32).x["val"]
    assert torch.equal(a, b)


def test_at_least_the_required_shifts_exist():
    assert {"gaussian_noise", "gaussian_blur", "contrast"} <= set(SHIFTS.names())


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_registered_dataset_has_a_contract(name):
    """A dataset built from dependencies declares its split sizes above; one read from disk (a fingerprint in its
    registry metadata) refuses to build without its folder, in one line naming the option."""
    from transferbench.core.errors import ConfigError

    if "fingerprint" not in DATASETS.meta(name):
        assert name in DECLARED or name == "source_reference", f"declare the split sizes of '{name}' in DECLARED"
        return
    with pytest.raises(ConfigError, match=r"targets\.options\.(root|path)"):
        DATASETS.get(name)()


@pytest.mark.parametrize("shift", SHIFTS.names())
def test_every_registered_shift_is_fixed_bounded_and_graded(shift):
    from transferbench.data import apply_shift

    x = load_target("textures", None, 0, 32).x["val"][:64]
    out = [apply_shift(x.clone(), shift, s, seed=0) for s in (1, 3, 5)]
    assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in out)
    assert torch.equal(out[1], apply_shift(x.clone(), shift, 3, seed=0))  # the same seed, the same copy
    change = [(o - x).pow(2).mean().item() for o in out]
    assert 0 < change[0] <= change[1] <= change[2], change
