"""MobileNetV2's data-aware start at heal_cnn.py's setting, as the data-starved threshold varies.

    python benchmarks/cnn_starved_check.py [--starved 4,32] [--threads 1]

40% of the factorable weights removed, calibrated on 256 augmented 128-px views of the 9 even-numbered
photos (batches of 16, as ``heal_cnn.py`` does); scored by the logit cosine to the original on the 90
fixed views of the other 9. ``--starved`` sets ``calibration.STARVED_ROWS_PER_FEATURE`` for each run:
layers with fewer calibration rows per input feature take their error curve and probe factors from the
held-out batches. Prints one line per value and the ranks that differ from the first; writes nothing.
Run at another commit with ``PYTHONPATH=<checkout>`` to bisect (the README cites such runs).
"""

from __future__ import annotations

import argparse
import copy

import torch

import compressor
from compressor import zoo
from compressor.analysis import calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starved", default="4,32", help="comma-separated STARVED_ROWS_PER_FEATURE values")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_photos = list(range(0, len(zoo.PHOTOS), 2))
    calib = zoo.augmented_images(256, 128, train_photos, seed=2)
    photo = torch.arange(10 * len(zoo.PHOTOS)) % len(zoo.PHOTOS)
    held = zoo.sample_images(128, 10 * len(zoo.PHOTOS))[photo % 2 == 1]
    original = zoo.mobilenet_v2()
    with torch.no_grad():
        ref = torch.cat([original(b) for b in held.split(32)])
    first = None
    for value in (float(v) for v in args.starved.split(",")):
        calibration.STARVED_ROWS_PER_FEATURE = value
        model = copy.deepcopy(original)
        plan = compressor.analyze(model, target=0.4, progress=False, calibration=list(calib.split(16)))
        compressor.rewrite(model, plan)
        with torch.no_grad():
            out = torch.cat([model(b) for b in held.split(32)])
        cos = float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())
        ranks = {lp.name: getattr(lp, "rank", None) for lp in plan.layers}
        first = first or ranks
        changed = {k: (first[k], r) for k, r in ranks.items() if r != first[k]}
        print(f"STARVED_ROWS_PER_FEATURE={value:g}: held-out logit cosine {cos:.4f}; ranks changed: {changed}")


if __name__ == "__main__":
    main()
