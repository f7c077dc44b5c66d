"""What the search, heal and streamed jobs return: typed results whose ``to_dict()`` is the JSON they write.

    result = run_search("model.pt", constraints=Constraints(min_fidelity=0.99), options=...)
    result.chosen.recipe.name, result.file, result.front.built    # report.json is result.to_dict()
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compressor.search.front import Point, SearchResult


@dataclass
class SearchJobResult:
    """What :func:`compressor.jobs.search.run_search` returns; ``to_dict()`` is ``report.json``."""

    source: str  # the model's path
    format: str  # as compressor.load detected it
    output: str  # the output folder
    front: SearchResult  # every measured recipe, the chosen one, the constraints (front.json)
    file: str  # the chosen file's name in the output folder
    cache: str  # the measurement cache folder
    plots: list[str]  # the front's plots in the output folder
    command: str | None
    versions: dict[str, str]
    passed: bool  # False only when an edge file failed its validation
    edge: dict[str, Any] | None  # with options.edge: the edge build's report
    date: str

    @property
    def chosen(self) -> Point:
        """The chosen recipe's measurement."""
        return self.front.chosen

    def to_dict(self) -> dict[str, Any]:
        front = self.front.to_dict()
        return {"mode": "search", "source": {"path": self.source, "format": self.format}, "output": self.output,
                "chosen": {**self.chosen.to_dict(), "file": self.file}, "front": front, "cache": self.cache,
                "plots": self.plots, "command": self.command, "versions": self.versions, "passed": self.passed,
                "edge": self.edge, "date": self.date}


@dataclass
class HealFolderResult:
    """What :func:`compressor.jobs.heal.heal_folder` returns; ``to_dict()`` is ``heal.json``."""

    source: str
    output: str
    teacher: str | None  # the model distilled from (None: trained on targets, or next tokens)
    supervised: bool  # the data held targets
    before: dict[str, float]  # metrics of the input model
    after: dict[str, float]  # metrics of the healed model (the best step)
    best_step: int
    steps: int
    resumed_from: int | None
    seconds: float
    note: str | None  # one line when the input came back unchanged
    blocks: list[dict[str, Any]]  # blockwise healing: per block, without its history
    history: list[dict[str, Any]]  # {"step", "metrics"} per evaluation
    config: dict[str, Any]  # the HealConfig used, as JSON
    recipe: dict[str, Any]  # which kind's defaults the run used, and the settings they filled
    checkpoint_dir: str | None
    command: str | None
    versions: dict[str, str]
    adapter: str | None = None  # with save_adapter: where the trained adapters went
    plot: str | None = None  # the monitored metric over steps, when it was numeric

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("source", "output", "teacher", "supervised", "before", "after",
                                           "best_step", "steps", "resumed_from", "seconds", "note", "blocks",
                                           "history", "config", "recipe", "checkpoint_dir", "command", "versions")}
        return d | {k: getattr(self, k) for k in ("adapter", "plot") if getattr(self, k) is not None}


@dataclass
class StreamResult:
    """What :func:`compressor.jobs.stream.stream_compress` returns; ``to_dict()`` is ``stream.json``."""

    source: str
    output: str | None  # set once the output folder is written
    mode: str  # "analyze" or "compress"
    svd: str  # "exact" or "randomized"
    workers: int
    ray: str | None
    shards_in: int
    layers: int
    resumed_layers: int  # layers finished by an earlier run
    seconds_per_layer: dict[str, float]
    analyze_seconds: float
    fingerprint_seconds: float
    checkpoint_bytes: int
    peak_rss_analyze_gib: float
    max_rank: int | None
    svd_checks: dict[str, Any]
    totals: dict[str, Any]  # Plan.totals()
    # calibrated (block by block) runs only:
    calibration: dict[str, Any] | None = None
    blocks: int | None = None
    seconds_per_block: dict[str, float] | None = None
    # mode "compress" only:
    files: list[str] | None = None
    rewrite_seconds: float | None = None
    # set with the output folder:
    peak_rss_gib: float | None = None
    bytes_written: int | None = None
    def timings(self) -> dict[str, float]:
        """The run's timed steps, for the report: fingerprint, analyze and (mode "compress") rewrite."""
        return {"fingerprint": self.fingerprint_seconds, "analyze": self.analyze_seconds,
                **({} if self.rewrite_seconds is None else {"rewrite": self.rewrite_seconds})}

    def to_dict(self) -> dict[str, Any]:
        optional = ("calibration", "blocks", "seconds_per_block", "files", "rewrite_seconds", "peak_rss_gib",
                    "bytes_written")
        return {k: v for k, v in vars(self).items() if k not in optional or v is not None}
