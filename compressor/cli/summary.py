"""What the commands print after a run: the few lines a person wants, from the report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from compressor.export.kv_cache import format_generation
from compressor.jobs.results import StreamResult
from compressor.report.report import Report, criterion, number


def summary(r: Report) -> str:
    """The few lines a person wants after a run."""
    lines = [f"{r.source['path']} ({r.source['format']}) -> {r.output}/"]
    if r.plan_totals:
        t = r.plan_totals
        lines.append(f"  layers factored   {t['layers_factored']} of {t['layers_supported']} factorizable "
                     f"({t['layers_total']} with weight matrices)")
        lines.append(f"  parameters        {r.params_before:,} -> {r.params_after:,} "
                     f"({r.params_ratio:.1%}); factorizable weights {t['removed_fraction']:.1%} removed")
    for note in r.notes or []:
        lines.append(f"  note: {note}")
    if r.fidelity:
        f = r.fidelity
        lines.append(f"  fidelity          cosine to original {number(f['cosine_mean'], '.5f')} "
                     f"(min {number(f['cosine_min'], '.5f')}) on {f.get('inputs', 'the example inputs')}"
                     + (f", {f['compared']}" if f.get("compared") else ""))
    for f in r.validations.values():
        if f.validation is None:
            lines.append(f"  onnx              skipped: {f.skipped}")
            continue
        v = f.validation
        tol = criterion(dataclasses.asdict(v))
        lines.append(f"  {v.path:<17} {v.size_bytes / 1e6:.2f} MB, "
                     f"max abs diff {number(v.max_abs_diff, '.2e')}, cosine {number(v.cosine, '.6f')} "
                     f"({tol}): {'PASS' if f.passed else 'FAIL'}")
        for problem in v.problems:
            lines.append(f"    problem         {problem}")
        if f.kept_fp16:
            lines.append(f"    kept in fp16    {', '.join(f.kept_fp16)}")
        if f.correction:
            c = f.correction
            lines.append(f"    corrected       {sum(1 for x in c['ranks'].values() if x)} layers, "
                         f"{c['parameters']:,} {c['factors']} factor weights "
                         f"({', '.join(f'{k}={x:g}' for k, x in c['rule'].items())})")
        chosen = (f.settings or {}).get("chosen")
        if chosen:
            lines.append(f"    calibrated      {chosen['method']}, {chosen.get('rounding', 'nearest')} rounding, "
                         f"float layers {', '.join(chosen['float_layers']) or 'none'}, float activations "
                         f"{', '.join(chosen.get('float_activations', [])) or 'none'}")
    if r.int8_choice:
        c = r.int8_choice
        lines.append(f"  int8 to ship      {c['recommended'] or 'none passed'} (" + ", ".join(
            f"{name} {f['latency_ratio']:.2f}x model.onnx latency" for name, f in c["files"].items()) + ")")
    if r.edge:
        for f in r.edge["variants"]:
            check = f["validation"]
            lines.append(f"  {'edge/' + f['file']:<17} {f['size_bytes'] / 1e6:.2f} MB, {f['latency_ms']:.2f} ms at "
                         f"batch 1, cosine {number(check['vs_model']['cosine'], '.6f')}: "
                         f"{'PASS' if check['passed'] else 'FAIL'}")
    for c in (r.kv_cache or {}).get("files", {}).values():
        lines.append(format_generation(c))
        for problem in c.get("problems") or []:
            lines.append(f"    problem         {problem}")
    if r.perplexity:
        first = next(iter(r.perplexity.results.values()))
        lines.append("  perplexity        " + ", ".join(
            f"{name} {p.ppl:.4f}" + ("" if name == "dense" or r.perplexity.ratio(name) is None
                                     else f" ({r.perplexity.ratio(name):.3f}x)")
            for name, p in r.perplexity.results.items()))
        lines.append(f"    protocol        {first.describe()}")
    lines.append(f"  report            {Path(r.output) / 'report.md'}")
    return "\n".join(lines)



def stream_summary(model: Any, summary: StreamResult) -> str:
    """The few lines of a streamed run (what :func:`compressor.jobs.stream.stream_compress` returns)."""
    t = summary.totals
    return (f"{model} (streamed, {summary.shards_in} shard(s)) -> {summary.output}/\n"
            f"  layers factored   {t['layers_factored']} of {t['layers_supported']} factorizable "
            f"({summary.resumed_layers} of {summary.layers} resumed from an earlier run)\n"
            f"  parameters        {t['params_before']:,} -> {t['params_after']:,}; factorizable weights "
            f"{t['removed_fraction']:.1%} removed\n"
            + (f"  calibration       {summary.calibration['samples']} samples, "
               f"{summary.calibration['tokens']} tokens, whitened block by block ({summary.blocks} "
               "blocks; no sequential refits or sensitivity probes)\n" if summary.calibration is not None else "")
            + f"  time              analyze {summary.analyze_seconds:.1f} s"
            + (f", rewrite {summary.rewrite_seconds:.1f} s" if summary.rewrite_seconds is not None else ""))
