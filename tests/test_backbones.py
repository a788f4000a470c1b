import pytest
import timm
import torch
from PIL import Image
from skimage import data as skdata

from transferbench.core.errors import ConfigError
from transferbench.models.backbones import create_backbone, group_sizes, resolve_depth, split_at_depth


@pytest.mark.parametrize("model", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_bundled_imagenet_weights_are_real(model):
    """No network: the bundled state dicts classify skimage photos as ImageNet does."""
    bb = create_backbone(model, "imagenet", num_classes=10, seed=0)
    net = bb.model.eval()
    preprocess = timm.data.create_transform(**bb.data_config)  # the weights' own preprocessing
    for photo, imagenet_class in [("chelsea", 285), ("coffee", 967)]:
        x = preprocess(Image.fromarray(getattr(skdata, photo)()))[None]
        with torch.no_grad():
            logits = bb.source_head(net.forward_head(net.forward_features(x), pre_logits=True))
        assert logits.argmax().item() == imagenet_class


def test_depth_groups_follow_timms_coarse_groups():
    bb = create_backbone("tf_efficientnet_lite0", "none", 10, 0)
    assert bb.n_groups == 8  # stem, blocks.0-5, blocks.6 + conv_head; the classifier is the head
    assert bb.groups[0] == ["conv_stem", "bn1"]
    assert resolve_depth("all", bb.n_groups) == 8
    with pytest.raises(ConfigError, match="beyond the backbone's 8 groups"):
        resolve_depth(9, bb.n_groups)
    sizes = group_sizes(bb)
    assert len(sizes) == 8 and all(s > 0 for s in sizes)
    assert sum(sizes) == sum(p.numel() for p in bb.model.parameters()) - sum(
        p.numel() for p in bb.model.get_classifier().parameters())


@pytest.mark.parametrize("k", [0, 1, 5, 8])
def test_prefix_then_suffix_is_the_model(k):
    bb = create_backbone("tf_efficientnet_lite0", "imagenet", 10, 0)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = bb.model.eval()((x - 0.5) / 0.5)
        prefix, suffix, cacheable = split_at_depth(bb, k)
        assert cacheable
        got = suffix.eval()(prefix(x))
    assert torch.allclose(expected, got, atol=1e-5)
    assert not any(p.requires_grad for p in prefix.parameters())
    assert all(p.requires_grad for p in suffix.parameters())


def test_in_place_freezing_keeps_weights_and_bn_statistics():
    """The uncached path (e.g. with augmentation): the first k groups stay exactly as loaded."""
    bb = create_backbone("tf_efficientnet_lite0", "imagenet", 10, 0)
    prefix, model, cacheable = split_at_depth(bb, 3, allow=False)
    assert not cacheable
    frozen_names = ("conv_stem", "bn1", "blocks.0", "blocks.1")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(frozen_names)}
    trainable = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("blocks.3")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    loss = model(prefix(torch.rand(8, 3, 32, 32))).logsumexp(1).mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # weights and running stats
    assert any(not torch.equal(v, after[k]) for k, v in trainable.items())


def test_local_weights_files(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("tf_efficientnet_lite0")
    torch.save(src.state_dict(), tmp_path / "w.pth")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("w.pth", "w.safetensors"):
        bb = create_backbone("tf_efficientnet_lite0", str(tmp_path / name), 10, 0)
        assert torch.equal(bb.model.conv_stem.weight, src.conv_stem.weight)
        assert bb.weights_id.startswith("file:")


class Payload:  # an arbitrary object: loading it would need unpickling code
    pass


def test_checkpoint_needing_unpickling_is_refused(tmp_path):
    torch.save({"obj": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="arbitrary unpickling"):
        create_backbone("tf_efficientnet_lite0", str(tmp_path / "evil.pth"), 10, 0)


def test_missing_weights_file_and_unknown_names():
    with pytest.raises(ConfigError, match="does not exist"):
        create_backbone("tf_efficientnet_lite0", "nowhere/w.pth", 10, 0)
    with pytest.raises(ConfigError, match="did you mean 'tf_efficientnet_lite0'"):
        create_backbone("tf_efficientnet_lite0x", "none", 10, 0)
    with pytest.raises(ConfigError, match="no bundled ImageNet weights"):
        create_backbone("resnet18", "imagenet", 10, 0)


def test_scratch_init_depends_on_the_seed_only():
    a = create_backbone("tf_efficientnet_lite0", "none", 10, 1).model.conv_stem.weight
    b = create_backbone("tf_efficientnet_lite0", "none", 10, 1).model.conv_stem.weight
    c = create_backbone("tf_efficientnet_lite0", "none", 10, 2).model.conv_stem.weight
    assert torch.equal(a, b) and not torch.equal(a, c)
