"""Augmented views of the sample photos (compressor.zoo.augmented_images), the unlabelled data that heals a
pretrained CNN by distillation."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from compressor import zoo
from compressor.core.errors import CompressorError

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
