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
