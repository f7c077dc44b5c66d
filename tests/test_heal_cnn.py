"""Augmented views of the sample photos (compressor.zoo.augmented_images), the unlabelled data that heals a
pretrained CNN by distillation."""

from __future__ import annotations

import copy
import importlib.metadata

import pytest
import torch
from torch import nn

import compressor
from compressor import zoo
from compressor.core.errors import CompressorError
from compressor.train.heal import heal

try:
    importlib.metadata.distribution("scikit-image")
    HAVE_PHOTOS = True
except importlib.metadata.PackageNotFoundError:
    HAVE_PHOTOS = False


@pytest.mark.skipif(not HAVE_PHOTOS, reason="pip install scikit-image")
def test_augmented_views_are_seeded_varied_and_drawn_only_from_the_named_photos():
    a = zoo.augmented_images(12, 32, photos=[0, 2], seed=3)
    assert a.shape == (12, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, zoo.augmented_images(12, 32, photos=[0, 2], seed=3))  # the same seed, the same views
    assert not torch.equal(a, zoo.augmented_images(12, 32, photos=[0, 2], seed=4))
    assert len({tuple(v.flatten()[:64].tolist()) for v in a}) == 12  # every view differs
    # In [0, 1] before the normalisation: within the normalised range of black and white.
    lo = (0 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD)
    hi = (1 - torch.tensor(zoo.IMAGENET_MEAN)) / torch.tensor(zoo.IMAGENET_STD)
    assert (a.amin((0, 2, 3)) >= lo - 1e-5).all() and (a.amax((0, 2, 3)) <= hi + 1e-5).all()
    # A single grey photo gives grey views: the crops come from the named photos only.
    grey = zoo.augmented_images(4, 32, photos=[zoo.PHOTOS.index("camera.png")], seed=0, normalization="symmetric")
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)
    with pytest.raises(CompressorError, match="normalization"):
        zoo.augmented_images(2, 32, normalization="bgr")


@pytest.mark.skipif(not HAVE_PHOTOS, reason="pip install scikit-image")
def test_mixed_views_blend_two_unmixed_views_of_the_same_call():
    base = zoo.augmented_images(8, 24, photos=[0, 2], seed=1)
    cut = zoo.augmented_images(8, 24, photos=[0, 2], seed=1, mix="cutmix")
    assert torch.equal(cut, zoo.augmented_images(8, 24, photos=[0, 2], seed=1, mix="cutmix"))  # seeded
    assert not torch.equal(cut, base)
    flat_base, pasted = base.flatten(1), 0
    for view, own in zip(cut.flatten(1), flat_base, strict=True):
        # Every pixel is the view's own or, inside the pasted square, one other view's.
        foreign = view != own
        if foreign.any():
            donors = [b for b in flat_base if torch.equal(b[foreign], view[foreign])]
            assert donors
            pasted += 1
    assert pasted > 0
    mixed = zoo.augmented_images(8, 24, photos=[0, 2], seed=1, mix="mixup").flatten(1)
    for view, own in zip(mixed, flat_base, strict=True):
        # (1 - s) * own + s * other for some other view and s in [0, 1]: the best fit leaves nothing over.
        fits = []
        for other in flat_base:
            d = other - own
            s = float((view - own) @ d / (d @ d).clamp(min=1e-12))
            fits.append((float((own + s * d - view).abs().max()), s))
        err, s = min(fits)
        assert err < 1e-4 and -1e-4 <= s <= 1 + 1e-4
    with pytest.raises(CompressorError, match="mix"):
        zoo.augmented_images(2, 24, mix="blend")


@pytest.mark.skipif(not HAVE_PHOTOS, reason="pip install scikit-image")
def test_views_of_photos_from_other_wheels_and_names():
    x = zoo.augmented_images(3, 24, photos=["china.jpg", "chelsea.png"], seed=0)
    assert x.shape == (3, 3, 24, 24) and torch.isfinite(x).all()
    by_index = zoo.augmented_images(3, 24, photos=[zoo.PHOTOS.index("chelsea.png")], seed=0)
    assert torch.equal(by_index, zoo.augmented_images(3, 24, photos=["chelsea.png"], seed=0))
    for photo in ("nope.png", 99):
        with pytest.raises(CompressorError, match="unknown photo"):
            zoo.augmented_images(1, 24, photos=[photo])


@pytest.mark.parametrize("train", ["factors", "lora"])
def test_heal_trains_only_the_named_layers(train):
    # A pretrained CNN's classifier over-fits a few photos: heal(layers=...) keeps it fixed.
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=2))
    x = torch.randn(64, 16)
    r = heal(student, teacher=teacher, data=x, loss="mse", steps=10, lr=1e-2, batch_size=16, train=train,
             layers="0", progress=False)
    assert not torch.equal(r.model[0].down.weight, student[0].down.weight)  # trained (LoRA merged into it)
    for part in ("down", "up"):
        assert torch.equal(getattr(r.model[2], part).weight, getattr(student[2], part).weight)  # fixed
    with pytest.raises(CompressorError, match="names none of the factored layers"):
        heal(student, teacher=teacher, data=x, steps=1, train=train, layers="classifier.*", progress=False)


def test_blockwise_heal_of_one_factored_layer_takes_the_layer_as_its_block():
    # Was: the layer's two factors taken as blocks, which the teacher lacks (AttributeError).
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8))
    student = compressor.rewrite(copy.deepcopy(teacher), compressor.analyze(teacher, rank=2))
    r = heal(student, teacher=teacher, data=torch.randn(64, 16), method="blockwise", layers="0", block_steps=20,
             lr=1e-2, batch_size=16, progress=False)
    assert [b["block"] for b in r.blocks] == ["0"] and r.blocks[0]["after"] < r.blocks[0]["before"]
