"""The state of an unfinished streamed run (:mod:`compressor.jobs.stream`): every finished layer one durable,
sealed file in ``.OUT.stream/`` beside the output, under a fingerprint of the checkpoint and the settings,
so that the same command run again after a crash continues where it stopped and writes the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from compressor.core.errors import CompressorError
from compressor.core.fileio import signals_deferred
from compressor.core.statefile import SEAL_SUFFIX, is_sealed, load_json, read_sealed, write_sealed

STATE_FORMAT = 2  # 2: every state file sealed (sha256 beside it)



def state_dir(out: Path) -> Path:
    """Where an unfinished run keeps its finished layers: ``.OUT.stream/`` beside the output folder."""
    out = Path(out)
    return out.parent / f".{out.name}.stream"


class StreamState:
    """The finished layers of a run, one durable file each, under a fingerprint of inputs and settings.

    Every file is sealed (:mod:`compressor.core.statefile`): its sha256 is checked before it is used, so a
    file changed since it was written (by anything, or by bit rot) stops the run in one line instead of
    giving other factors with exit 0; a file whose seal is missing was cut off by a crash and is redone.
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], restart: bool):
        self.folder = folder
        self.fingerprint = fingerprint
        if restart and (folder.exists() or folder.is_symlink()):
            self.remove()
        old = self._read_json(self.folder / "fingerprint.json", "fingerprint")
        if old is None and folder.is_dir() and has_results(folder):
            raise self._damaged(f"the unfinished run in '{folder}' has no intact fingerprint.json")
        if old is not None and old != fingerprint:
            what = [k for k in ("checkpoint", "settings", "format") if old.get(k) != fingerprint.get(k)]
            changed = ", ".join("the model files" if k == "checkpoint" else k for k in what)
            raise CompressorError(f"the unfinished run in '{folder}' was started with other inputs ({changed} "
                                  "changed)", "rerun the same command to continue it, or pass restart=True to "
                                  "start over", cli_fix="rerun the same command to continue it, or pass "
                                  "--restart to start over")
        for path in sorted((*folder.glob("layers/*.safetensors"), *folder.glob("carry.*.pt"))):
            self._read(path, "state file")  # every seal checked before any work: a damaged state changes nothing

    @staticmethod
    def _damaged(problem: str) -> CompressorError:
        return CompressorError(problem, "pass restart=True to start over", cli_fix="rerun with --restart")

    def _read(self, path: Path, what: str) -> bytes | None:
        """A state file's bytes once its seal matches; None when it was never finished."""
        return read_sealed(path, f"the streamed run's {what}", "pass restart=True to start over",
                           cli_fix="rerun with --restart")

    def _read_json(self, path: Path, what: str) -> dict[str, Any] | None:
        data = self._read(path, what)
        if data is None:
            return None
        return load_json(data, f"the streamed run's {what} '{path}'", "pass restart=True to start over",
                         cli_fix="rerun with --restart")

    def _begin(self) -> None:
        """Create the folder and its fingerprint with the first finished layer: a run refused before any
        work leaves nothing behind. The fingerprint is sealed before any layer is written."""
        if not is_sealed(self.folder / "fingerprint.json"):
            self.folder.mkdir(parents=True, exist_ok=True)
            write_sealed(self.folder / "fingerprint.json", (json.dumps(self.fingerprint, indent=2) + "\n").encode())
        (self.folder / "layers").mkdir(exist_ok=True)

    def _path(self, i: int, kind: str = "layer") -> Path:
        return self.folder / "layers" / f"{i:05d}.{kind}.safetensors"

    def has(self, i: int) -> bool:
        return is_sealed(self._path(i))

    def has_factors(self, i: int) -> bool:
        return is_sealed(self._path(i, "factors")) or self.factors_in_layer(i)

    def factors_in_layer(self, i: int) -> bool:
        return self.has(i) and self.layer(i)["factored"]

    def save_layer(self, i: int, result: dict[str, Any]) -> None:
        from safetensors.torch import save

        self._begin()
        factors = result["factors"] or {}
        info = {"total": result["total"], "check": result["check"], "seconds": result["seconds"],
                "factored": bool(factors)}
        if "calibration" in result:  # the whitening's summary (calibrated runs)
            info["calibration"] = result["calibration"]
        write_sealed(self._path(i), save({"S": result["S"], **factors}, metadata={"info": json.dumps(info)}))

    def save_factors(self, i: int, result: dict[str, Any]) -> None:
        from safetensors.torch import save

        self._begin()
        write_sealed(self._path(i, "factors"), save(result["factors"]))

    def _tensors(self, path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and header metadata of a sealed safetensors state file (read once, then parsed)."""
        from safetensors.torch import load

        data = self._read(path, what)
        if data is None:
            raise self._damaged(f"the streamed run's {what} '{path}' is missing")
        try:
            header = load_json(data[8:8 + int.from_bytes(data[:8], "little")], "header", "")
            return load(data), header.get("__metadata__") or {}
        except Exception:  # sealed but not safetensors: not what this version writes
            raise self._damaged(f"the streamed run's {what} '{path}' is not a safetensors file") from None

    def layer(self, i: int) -> dict[str, Any]:
        """Layer ``i``'s spectrum and what was recorded with it, verified."""
        path = self._path(i)
        tensors, meta = self._tensors(path, "layer result")
        info = load_json(meta.get("info", ""), f"the streamed run's layer result '{path}'",
                         "pass restart=True to start over", cli_fix="rerun with --restart")
        s = tensors.get("S")
        if s is None or s.dim() != 1 or not isinstance(info.get("factored"), bool) or \
                not all(isinstance(info.get(k), dict | None) for k in ("check", "calibration")):
            raise self._damaged(f"the streamed run's layer result '{path}' is not what this version writes")
        return {**info, "S": s}

    def factors_path(self, i: int) -> Path:
        """The file holding layer ``i``'s factors (its own, or the layer's file: factored in one pass),
        verified against its seal just before the output is written from it."""
        path = self._path(i, "factors") if is_sealed(self._path(i, "factors")) else self._path(i)
        self._tensors(path, "factors")
        return path

    def save_carry(self, tag: str, block: int, outputs: list[Any]) -> None:
        """Block ``block - 1``'s outputs per calibration batch: where a calibrated pass continues."""
        import io

        self._begin()
        buf = io.BytesIO()
        torch.save({"block": block, "outputs": outputs}, buf)
        write_sealed(self.folder / f"carry.{tag}.pt", buf.getvalue())

    def carry(self, tag: str) -> tuple[int, list[Any] | None]:
        """``(next block, outputs of the block before it)`` of a calibrated pass; ``(0, None)`` at its start."""
        import io

        path = self.folder / f"carry.{tag}.pt"
        data = self._read(path, "block outputs")
        if data is None:
            return 0, None
        try:
            saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            block, outputs = saved["block"], saved["outputs"]
        except Exception:  # sealed, yet not what save_carry writes
            raise self._damaged(f"the streamed run's block outputs '{path}' are not what this version writes") \
                from None
        if isinstance(block, bool) or not isinstance(block, int) or block < 0 or not isinstance(outputs, list):
            raise self._damaged(f"the streamed run's block outputs '{path}' are not what this version writes")
        return block, outputs

    def remove(self) -> None:
        with signals_deferred():
            if self.folder.is_symlink():
                self.folder.unlink()
            else:
                shutil.rmtree(self.folder, ignore_errors=True)


def has_results(folder: Path) -> bool:
    """Whether a run's state folder holds a sealed result (a layer, factors or block outputs)."""
    return any(p.name.endswith(SEAL_SUFFIX) for p in (*folder.glob("layers/*"), *folder.glob("carry.*")))

