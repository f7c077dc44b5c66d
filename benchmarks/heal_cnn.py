"""Healing a pretrained CNN by distillation on unlabelled, augmented photos: MobileNetV2 with 40% of its
factorable weights removed, from a plain and a data-aware start; and the digits CNN healed block-wise,
end-to-end and both.

    python benchmarks/heal_cnn.py [--threads 1] [--size 128] [--views 1200] [--steps 120] [--loss kl]
        [--mix cutmix] [--more-photos val] [--layers 'features.*'] [--out benchmarks/results]

The 18 photos of scikit-image's wheel are split by number: the even ones give the training views
(``zoo.augmented_images``: random resized crops, mirrors, colour jitter, seeded), a second seed of them the
validation views that pick the best checkpoint, and the data-aware start's calibration views; the odd
ones are never seen until the metric, taken on their 10 fixed views each (``zoo.sample_images``): top-1
agreement with the original network and the cosine of the logits. Distillation loss: KL at temperature 2
(end-to-end; ``--loss`` mse or cosine of the logits instead), masked MSE per block (block-wise). ``--mix``
blends pairs of training views (``zoo.augmented_images(mix=...)``: mixup or cutmix); ``--more-photos`` adds
the 3 photos of ``zoo.MORE_PHOTOS`` (scikit-learn's and matplotlib's): ``train`` to the training side
(training, validation, calibration), ``val`` as the only validation photos (then the best checkpoint is
the one that does best on photos it never trained on); the held-out photos stay the same. ``--layers``:
which factored layers train (``HealConfig.layers``). ``--net efficientnet_lite0``: EfficientNet-Lite0 instead
(images in [-1, 1], as it expects). Per held-out photo, the change of its mean logit
cosine and top-1 agreement from the start is recorded, with the standard error of their mean over the 9
photos (the views of one photo are not independent). Writes ``heal_cnn.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from _common import environment, load_average, log, md_table
from heal_blockwise import digits_markdown, digits_rows

import compressor
from compressor import zoo
from compressor.core.errors import CompressorError
from compressor.core.fileio import atomic_write_text
from compressor.train.heal import HealConfig, heal

# name -> (the pretrained network, its name in the report, the image normalization it expects)
NETS = {"mobilenet_v2": (zoo.mobilenet_v2, "MobileNetV2", "imagenet"),
        "efficientnet_lite0": (lambda: zoo.efficientnet_lite("lite0"), "EfficientNet-Lite0", "symmetric")}
TRAIN_PHOTOS = list(range(0, len(zoo.PHOTOS), 2))
HELD_OUT_PHOTOS = list(range(1, len(zoo.PHOTOS), 2))


@torch.no_grad()
def fidelity(model: torch.nn.Module, x: torch.Tensor, ref: torch.Tensor) -> dict:
    """Top-1 agreement and logit cosine over the held-out views, and per held-out photo (its 10 views)."""
    out = torch.cat([model(b) for b in x.split(32)])
    agree = (out.argmax(-1) == ref.argmax(-1)).float()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    photo = torch.arange(len(x)) % len(HELD_OUT_PHOTOS)  # held-out view i shows held-out photo i mod 9
    return {"top1_agreement": float(agree.mean()), "logit_cosine": float(cos.mean()),
            "photo_top1": [float(agree[photo == p].mean()) for p in range(len(HELD_OUT_PHOTOS))],
            "photo_cosine": [float(cos[photo == p].mean()) for p in range(len(HELD_OUT_PHOTOS))]}


def per_photo_change(start: dict, healed: dict) -> dict:
    """Healed minus start per held-out photo: mean, standard error of the mean over the photos, and how
    many photos went up / down (the views of a photo are correlated, so the photo is the unit of noise)."""
    out = {}
    for key in ("cosine", "top1"):
        d = torch.tensor(healed[f"photo_{key}"]) - torch.tensor(start[f"photo_{key}"])
        out[key] = {"mean": round(float(d.mean()), 4), "sem": round(float(d.std() / len(d) ** 0.5), 4),
                    "up": int((d > 0).sum()), "down": int((d < 0).sum())}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--removed", type=float, default=0.4)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels")
    ap.add_argument("--views", type=int, default=1200, help="augmented training views")
    ap.add_argument("--steps", type=int, default=120, help="end-to-end steps")
    ap.add_argument("--block-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--loss", default="kl", choices=["kl", "mse", "cosine"], help="end-to-end distillation loss")
    ap.add_argument("--mix", default=None, choices=list(zoo.MIXES), help="blend pairs of training views")
    ap.add_argument("--more-photos", default="none", choices=["none", "train", "val"],
                    help="zoo.MORE_PHOTOS: also train on them, or validate on them alone")
    ap.add_argument("--layers", default=None, help="globs of the factored layers that train [default: all]")
    ap.add_argument("--net", default="mobilenet_v2", choices=list(NETS), help="the pretrained CNN")
    ap.add_argument("--methods", default="end-to-end,both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--name", default="heal_cnn", help="output file name (without .md/.json)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("python benchmarks/heal_cnn.py " + " ".join(sys.argv[1:]))
    start = time.perf_counter()

    original, norm = NETS[args.net][0](), NETS[args.net][2]
    photos = TRAIN_PHOTOS + (list(zoo.MORE_PHOTOS) if args.more_photos == "train" else [])
    val_photos = list(zoo.MORE_PHOTOS) if args.more_photos == "val" else photos
    train = zoo.augmented_images(args.views, args.size, photos, seed=args.seed, mix=args.mix, normalization=norm)
    val = zoo.augmented_images(128, args.size, val_photos, seed=args.seed + 1, normalization=norm)
    calib = zoo.augmented_images(256, args.size, photos, seed=args.seed + 2, normalization=norm)
    photo = torch.arange(10 * len(zoo.PHOTOS)) % len(zoo.PHOTOS)
    held_out = zoo.sample_images(args.size, 10 * len(zoo.PHOTOS), normalization=norm)[photo % 2 == 1]
    with torch.no_grad():
        ref = torch.cat([original(b) for b in held_out.split(32)])
    cfg = HealConfig(loss=args.loss, temperature=2.0, lr=args.lr, block_lr=args.lr, steps=args.steps,
                     block_steps=args.block_steps, batch_size=args.batch, every=max(1, args.steps // 6),
                     warmup_steps=4, seed=args.seed, layers=args.layers)
    rows = []
    for start_kind in ("plain", "data-aware"):
        compressed = copy.deepcopy(original)
        kw = {"calibration": list(calib.split(args.batch))} if start_kind == "data-aware" else \
            {"example_inputs": calib[:args.batch]}
        plan = compressor.analyze(compressed, target=args.removed, progress=False, **kw)
        compressor.rewrite(compressed, plan)
        start_fid = fidelity(compressed, held_out, ref)
        rows.append({"start": start_kind, "method": "none (compressed)", **start_fid,
                     "removed_fraction": plan.totals()["removed_fraction"]})
        log(f"{start_kind}: {start_fid['top1_agreement']:.3f} / {start_fid['logit_cosine']:.4f}")
        for method in args.methods.split(","):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                r = heal(compressed, cfg.replace(method=method), teacher=original, data=train, val_data=val,
                         progress=False)
            except CompressorError as err:  # e.g. --layers names none of this plan's factored layers
                rows.append({"start": start_kind, "method": method, "note": f"not healed: {err.problem}"})
                log(f"  {method}: {rows[-1]['note']}")
                continue
            healed = fidelity(r.model, held_out, ref)
            rows.append({"start": start_kind, "method": method, **healed,
                         "per_photo": per_photo_change(start_fid, healed),
                         "heal_wall_seconds": round(time.perf_counter() - wall, 1),
                         "heal_cpu_seconds": round(time.process_time() - cpu, 1), "val_before": r.before,
                         "val_after": r.after, "best_step": r.best_step, "note": r.note, "history": r.history,
                         "blocks": [(b["block"], round(b["before"], 4), round(b["after"], 4)) for b in r.blocks]})
            log(f"  {method}: {rows[-1]['top1_agreement']:.3f} / {rows[-1]['logit_cosine']:.4f}, "
                f"{rows[-1]['heal_cpu_seconds']} CPU s, load {load_average()}")

    digits = None if args.skip_digits else digits_rows(args.seed)
    result = {"env": env, "load_average_at_end": load_average(), "total_seconds": round(time.perf_counter() - start),
              "images": {"size": args.size, "train_views": args.views, "mix": args.mix, "val_views": len(val),
                         "calibration_views": len(calib), "held_out_views": len(held_out),
                         "train_photos": [p if isinstance(p, str) else zoo.PHOTOS[p] for p in photos],
                         "val_photos": [p if isinstance(p, str) else zoo.PHOTOS[p] for p in val_photos],
                         "held_out_photos": [zoo.PHOTOS[i] for i in HELD_OUT_PHOTOS]},
              "settings": cfg.to_dict(), "net": args.net, args.net: rows, "digits": digits}
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / args.name
    atomic_write_text(base.with_suffix(".json"), json.dumps(result, indent=1, default=str) + "\n")
    atomic_write_text(base.with_suffix(".md"), _markdown(result))
    print(f"wrote {base}.md and .json ({result['total_seconds']} s in all)")
    return 0


def _change(row: dict, key: str) -> str | None:
    c = row.get("per_photo", {}).get(key)
    return None if c is None else f"{c['mean']:+.4f} +- {c['sem']:.4f} ({c['up']} up / {c['down']} down)"


def _markdown(r: dict) -> str:
    env, im, s, net = r["env"], r["images"], r["settings"], r.get("net", "mobilenet_v2")
    lines = [
        "# Healing pretrained and small CNNs by distillation", "",
        f"Produced by `{env['command']}` on {env['date']} ({env['processor']}, {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, {env['torch_threads']} thread; load average {env['load_average_at_start']} at "
        f"start and {r['load_average_at_end']} at the end: the machine was shared, so wall times are this "
        f"run's); {r['total_seconds']} s in all.", "",
        f"## {NETS[net][1]} (ImageNet weights), {r[net][0]['removed_fraction']:.0%} of its factorable "
        f"weights removed", "",
        f"Images {im['size']}x{im['size']}. Training: {im['train_views']} augmented views (random resized crops, "
        f"mirrors, colour jitter{', ' + im['mix'] + ' of pairs of them' if im.get('mix') else ''}) of "
        f"{len(im['train_photos'])} photos ({', '.join(im['train_photos'])}); validation (best "
        f"checkpoint): {im['val_views']} other views of "
        f"{'them' if im.get('val_photos', im['train_photos']) == im['train_photos'] else ', '.join(im['val_photos'])}"
        f"; data-aware start calibrated on "
        f"{im['calibration_views']} more views of the training photos. Held out, never seen before the metric: "
        f"{im['held_out_views']} "
        f"fixed views of the other {len(im['held_out_photos'])} photos ({', '.join(im['held_out_photos'])}).", "",
        f"Settings: end-to-end {s['steps']} steps{', training only ' + s['layers'] if s.get('layers') else ''}, "
        f"{'KL at temperature ' + str(s['temperature']) if s['loss'] == 'kl' else s['loss'] + ' of the logits'}, "
        f"lr {s['lr']}; "
        f"block-wise (`both`: then end-to-end) {s['block_steps']} steps per block, masked MSE, lr "
        f"{s['block_lr']}; batch {s['batch_size']}, AdamW, cosine schedule.", "",
        md_table(["start", "healing", "top-1 agreement", "logit cosine", "heal CPU s", "heal wall s",
                  "cosine change per photo", "top-1 change per photo"],
                 [[x["start"], x["method"], x.get("top1_agreement"), x.get("logit_cosine"), x.get("heal_cpu_seconds"),
                   x.get("heal_wall_seconds"), *[_change(x, k) for k in ("cosine", "top1")]]
                  for x in r[net]]), "",
        "Change per photo: healed minus start on each of the 9 held-out photos (mean of its 10 views), as mean "
        "+- standard error over the photos, and how many photos went up / down.", "",
    ]
    notes = [f"- {x['start']} {x['method']}: {x['note']}" for x in r[net] if x.get("note")]
    if notes:
        lines += ["Notes:", *notes, ""]
    return "\n".join(lines + digits_markdown(r["digits"]))


if __name__ == "__main__":
    sys.exit(main())
