"""Write the evaluation and calibration texts made of whole standard-library docstrings (split by module, so
the two share none) and print what was written, for a benchmark to cite.

    python benchmarks/docstring_texts.py OUT_DIR [--eval-chars 200000] [--calibration-chars 200000]

``OUT_DIR/docstrings.eval.txt`` is for ``compress eval MODEL --text`` and ``compress --eval-text``;
``OUT_DIR/docstrings.calibration.txt`` (one passage per line) for ``--calibration``. Prints each file's
path, sha256, characters, passages and the Python version whose library they came from.
"""

from __future__ import annotations

import argparse
import json

from compressor.examples import DOCSTRING_TEXT_CHARS, write_docstring_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--eval-chars", type=int, default=DOCSTRING_TEXT_CHARS)
    parser.add_argument("--calibration-chars", type=int, default=DOCSTRING_TEXT_CHARS)
    args = parser.parse_args()
    print(json.dumps(write_docstring_texts(args.out, args.eval_chars, args.calibration_chars), indent=2))


if __name__ == "__main__":
    main()
