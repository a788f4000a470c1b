import numpy as np
import pytest
import torch

from transferbench.core.errors import ConfigError
from transferbench.data import DATASETS, SHIFTS, class_counts, load_raw, load_target, nested_kshot
from transferbench.data.embedded import SOURCE_REFERENCE_IMAGES, TEXTURE_IMAGES


@pytest.mark.parametrize("name,min_classes", [("textures", 10), ("digits", 10), ("glyphs", 20), ("faces", 2),
                                              ("counting", 6), ("sprites", 5)])
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
            "faces": ((120, 30, 50), 2),  # faces: 200 images in all, the data allows no larger test set
            "counting": ((600, 240, 300), 6), "sprites": ((500, 200, 250), 5)}


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


def broken_neighbours(x: torch.Tensor, shifted: torch.Tensor, shift: str, severity: int) -> float:
    """The share of horizontally adjacent pixels that were not adjacent before: block shuffling's grade (every
    shuffle moves about as many pixels, so the pixel change says nothing of the block size)."""
    from transferbench.data import apply_shift

    side = x.shape[-1]
    where = torch.arange(side * side, dtype=torch.float64).view(1, 1, side, side).expand(1, 3, side, side)
    moved = apply_shift(where / where.max(), shift, severity, seed=0)[0, 0] * where.max()
    return ((moved[:, 1:] - moved[:, :-1]).round() != 1).double().mean().item()


def decorrelation(x: torch.Tensor, shifted: torch.Tensor, shift: str, severity: int) -> float:
    """1 - the correlation of the shifted images with the originals: a high-pass filter's grade (each output is
    rescaled to [0, 1], so the pixel change is not monotone in what was removed)."""
    return 1 - torch.corrcoef(torch.stack([x.flatten(), shifted.flatten()]))[0, 1].item()


GRADE = {"block_shuffle": broken_neighbours, "high_pass": decorrelation}  # default: the mean squared pixel change


@pytest.mark.parametrize("shift", SHIFTS.names())
def test_every_registered_shift_is_fixed_bounded_and_graded(shift):
    from transferbench.data import apply_shift

    x = load_target("textures", None, 0, 32).x["val"][:64]
    out = [apply_shift(x.clone(), shift, s, seed=0) for s in (1, 3, 5)]
    assert all(o.shape == x.shape and o.min() >= 0 and o.max() <= 1 for o in out)
    assert torch.equal(out[1], apply_shift(x.clone(), shift, 3, seed=0))  # the same seed, the same copy
    grade = GRADE.get(shift, lambda x, o, *_: (o - x).pow(2).mean().item())
    change = [grade(x, o, shift, s) for o, s in zip(out, (1, 3, 5))]
    assert 0 < change[0] < change[1] < change[2], change


def foreground(images: np.ndarray) -> np.ndarray:
    """The drawn objects of a procedural scene: every channel >= 100 (objects are drawn at 120-255, the background
    tint at 0-59)."""
    return images.min(-1) >= 100


def test_a_counting_scene_shows_as_many_objects_as_its_label():
    from scipy import ndimage

    x, y = load_raw("counting").splits["test"]
    counts = [ndimage.label(m)[1] for m in foreground(x)]
    assert counts == (y + 1).tolist()


@pytest.mark.parametrize("label", ["position", "orientation"])
def test_a_sprite_label_is_what_the_image_shows(label):
    """Position: the band of the sprite's centroid (5 bands over x from 12 to 52); orientation: the angle of its
    major axis (second moments; image y points down) within 15 degrees of its bin's centre."""
    raw = load_raw("sprites", {"label": label})
    x, y = raw.splits["test"]
    assert len(raw.classes) == (5 if label == "position" else 6)
    for img, k in zip(foreground(x), y):
        rows, cols = np.nonzero(img)
        if label == "position":
            assert int((cols.mean() - 12) // 8) == k
        else:
            c = np.cov(np.stack([cols, -rows]))
            angle = np.degrees(0.5 * np.arctan2(2 * c[0, 1], c[0, 0] - c[1, 1])) % 180
            assert min(abs(angle - 30 * k), 180 - abs(angle - 30 * k)) <= 15, (angle, k)


def test_sprites_by_orientation_keep_the_contract():
    raw = load_raw("sprites", {"label": "orientation"})
    assert [len(raw.splits[s][1]) for s in ("train", "val", "test")] == [600, 240, 300]
    seen = {img.tobytes(): s for s in ("train", "val", "test") for img in raw.splits[s][0]}
    assert len(seen) == 1140  # no image twice, within or across splits


def test_block_shuffle_moves_whole_blocks_by_one_permutation_for_every_split():
    """Each split's copy is shifted with its own seed; the permutation must still be the same (a label-preserving
    dial), and every block keeps its pixels."""
    from transferbench.data import apply_shift

    x = torch.arange(16.0).view(1, 1, 4, 4).expand(2, 3, 4, 4) / 16
    a, b = apply_shift(x, "block_shuffle", 1, seed=1), apply_shift(x, "block_shuffle", 1, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    blocks = {tuple(a[0, 0, i:i + 2, j:j + 2].flatten().mul(16).int().tolist()) for i in (0, 2) for j in (0, 2)}
    assert blocks == {(0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15)}


def test_solarize_at_full_severity_is_the_colour_negative():
    from transferbench.data import apply_shift

    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(apply_shift(x, "solarize", 5, seed=0), 1 - x)
