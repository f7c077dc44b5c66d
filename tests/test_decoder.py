"""The block-by-block calibrated analysis of decoders (compressor.analysis.decoder), on tiny Gemma 3 and Llama
configs: the same statistics as the whole-model pass, the output head never run on more than a chunk, the
output-side Fisher against a brute-force gradient, and the job end to end."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from compressor.analysis.analyze import find_layers  # noqa: E402
from compressor.analysis.calibration import calibrated_analysis  # noqa: E402
from compressor.analysis.decoder import decoder_analysis, is_decoder, output_fisher  # noqa: E402
from compressor.core.policies import TargetPolicy  # noqa: E402


def gemma3(vocab: int = 97, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64, final_logit_softcapping=30.0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def llama(vocab: int = 97, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


MODELS = {"gemma3": gemma3, "llama": llama}


def batches(vocab: int, n: int = 3, size: int = 4, length: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (size, length), generator=g),
             "attention_mask": torch.ones(size, length, dtype=torch.long)} for _ in range(n)]


def layers(model) -> dict:
    return {c.name: c.module for c in find_layers(model, ["model.layers.*"]) if c.skip is None}


@pytest.mark.parametrize("kind", list(MODELS))
def test_block_passes_match_the_whole_model_pass(kind):
    """Without sequential refits or weighting, the block-by-block statistics are the whole-model pass's: the
    same whitened spectra for every layer."""
    model = MODELS[kind]()
    assert is_decoder(model)
    mods, data = layers(model), batches(97)
    blockwise = decoder_analysis(model, mods, data, TargetPolicy(0.3), 1, {}, sequential=False, weighting=None)
    whole = calibrated_analysis(model, mods, data, TargetPolicy(0.3), 1, {}, sequential=False, sensitivity=False,
                                spatial=False)
    assert set(blockwise.decompositions) == set(mods)
    for name in mods:
        torch.testing.assert_close(blockwise.decompositions[name].S, whole.decompositions[name].S,
                                   rtol=1e-4, atol=1e-6)
    assert blockwise.ranks == whole.ranks


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_head_never_sees_more_than_a_chunk(kind, monkeypatch):
    """Memory does not grow with vocabulary x tokens: without weighting the head never runs; with the Fisher
    weighting it runs on at most a chunk of positions per call (data.perplexity.head_chunk), whatever the
    sequence length."""
    import compressor.data.perplexity as perplexity

    monkeypatch.setattr(perplexity, "HEAD_CHUNK_BYTES", 5 * 4 * 211)  # five positions of logits
    model = MODELS[kind](vocab=211)
    seen: list[int] = []
    head = model.get_output_embeddings()
    head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[:-1].numel()))
    mods, data = layers(model), batches(211, length=23)
    decoder_analysis(model, mods, data, TargetPolicy(0.3), 1, {}, weighting=None)
    assert seen == []
    output_fisher(model, mods, data)
    assert seen and max(seen) <= 5 and sum(seen) == len(data) * 4 * 22  # every position, once


def test_output_fisher_equals_a_brute_force_gradient():
    """The chunked Fisher diagonal is the squared gradient of the summed next-token NLL computed on whole
    logits, per output unit of each layer."""
    model = gemma3()
    mods, data = layers(model), batches(97, n=2)
    got = output_fisher(model, mods, data, chunk=5)
    want = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in mods.items()}
    outer = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in mods.items()}
    outs: dict[str, torch.Tensor] = {}
    def keep(name: str, out: torch.Tensor) -> None:  # returns None: the output is not replaced
        out.retain_grad()
        outs[name] = out

    hooks = [m.register_forward_hook(lambda _m, _a, o, n=n: keep(n, o)) for n, m in mods.items()]
    for batch in data:
        logits = model(**batch).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), batch["input_ids"][:, 1:].reshape(-1),
                                                 reduction="sum")
        model.zero_grad()
        loss.backward()
        for n, o in outs.items():
            g = o.grad.double().reshape(-1, o.shape[-1])
            want[n] += g.square().sum(0)
            outer[n] += g.T @ g
    for h in hooks:
        h.remove()
    full = output_fisher(model, mods, data, chunk=5, full=True)
    for n in mods:
        torch.testing.assert_close(got[n], want[n].float(), rtol=1e-3, atol=1e-9)
        # Off-diagonal sums cancel: float32 products summed in another order (another CPU's BLAS) differ by
        # a small fraction of the largest entry, not of their own size.
        torch.testing.assert_close(full[n], outer[n].float(), rtol=1e-3, atol=1e-4 * float(outer[n].abs().max()))
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_kfac_weighting_keeps_full_rank_exact_and_beats_none_on_the_weighted_error():
    """The full output factor: at full rank the factors give the layer back; at a cut, the KFAC-weighted
    error of its factors is below that of the unweighted (and the diagonal) factors at the same rank."""
    from compressor.analysis.whitened import Moments, whitened_decomposition

    torch.manual_seed(0)
    W, X = torch.randn(12, 16), torch.randn(200, 16) @ torch.randn(16, 16)
    g = torch.randn(300, 12) @ torch.randn(12, 12)  # correlated output gradients
    G = g.T @ g
    m = Moments()
    m.add(X)
    def weighted_error(dec, r):
        up, down = dec.factors(r)
        E = (W - up @ down) @ X.T
        return float(torch.trace(E.T @ G @ E))
    full, _ = whitened_decomposition(W, m, out_weight=G)
    up, down = full.factors(12)
    torch.testing.assert_close(up @ down, W, rtol=1e-3, atol=1e-3)
    plain, _ = whitened_decomposition(W, m)
    diag, _ = whitened_decomposition(W, m, out_weight=G.diagonal().clone())
    assert weighted_error(full, 4) < min(weighted_error(plain, 4), weighted_error(diag, 4))


@pytest.mark.parametrize("weighting", ["fisher", "kfac"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_sequential_fisher_analysis_meets_the_target(kind, weighting):
    model = MODELS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mods = layers(model)
    cal = decoder_analysis(model, mods, batches(97), TargetPolicy(0.3), 1, {}, weighting=weighting)
    assert cal.info["layers_refit_sequentially"] > 0
    assert cal.info["allocation"].endswith("Fisher" if weighting == "fisher" else "(KFAC)")
    removed = sum(m.weight.numel() - r * sum(m.weight.shape) for n, m in mods.items()
                  for r in [cal.ranks[n]] if r is not None and r * sum(m.weight.shape) < m.weight.numel())
    assert removed >= 0.3 * sum(m.weight.numel() for m in mods.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not changed


def test_progress_says_each_block_and_estimates_from_block_steps_only(capsys):
    """One line per step; the Fisher pass is said with its time but not counted as a block step (it made the
    first estimate of a Gemma 3 270M run 84 minutes for a 10-minute analysis)."""
    model = llama()
    decoder_analysis(model, layers(model), batches(97), TargetPolicy(0.3), 1, {}, progress=True)
    lines = capsys.readouterr().err.strip().splitlines()
    fisher = [line for line in lines if "Fisher done" in line]
    assert len(fisher) == 1 and "left" not in fisher[0]
    steps = [line for line in lines if "left" in line]
    assert [line.split(",")[0] for line in steps] == [
        "calibrating: block 1/2 analysed", "calibrating: block 2/2 analysed",
        "calibrating: block 1/2 refit", "calibrating: block 2/2 refit"]
    assert steps[-1].endswith("about 0s left")


def test_a_truncated_decomposition_gives_the_same_factors_up_to_its_rank():
    """What the decoder analysis keeps of a refit layer (``Decomposition.truncated``): the same factors at any
    rank up to the kept one, a clear error above it, and none of the n x n whitening factor."""
    from compressor.analysis.whitened import Moments, whitened_decomposition

    torch.manual_seed(0)
    W, X = torch.randn(24, 16), torch.randn(200, 16) @ torch.randn(16, 16)
    mom = Moments()
    mom.add(X, X + 0.01 * torch.randn_like(X))  # the sequential refit's moments: original and compressed inputs
    full, _ = whitened_decomposition(W, mom, (1e-6,), None)
    assert full.right_tri is not None or full.right_inv is not None  # a whitened one: the map is dropped
    short = full.truncated(6)
    assert short.right_tri is None and short.right_inv is None and short.Vh.shape == (6, 16)
    for r in (1, 6):
        for a, b in zip(full.factors(r), short.factors(r), strict=True):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="truncated to rank 6"):
        short.factors(7)


def test_sequential_analysis_keeps_only_what_its_ranks_need_and_an_edited_plan_is_refused():
    """Layers the sequential analysis leaves dense keep only their spectrum (the whole decompositions were
    1.2 GB of Gemma 3 270M's peak); factored ones their factors up to the chosen rank. A plan edited to ask
    for more than was kept is refused by rewrite in one line, before the model changes."""
    import compressor
    from compressor.core.errors import PlanError
    from compressor.core.rewrite import rewrite

    model = llama()
    plan = compressor.analyze(model, target=0.3, include=["model.layers.*"], calibration=batches(97))
    kept = {n: dec.kept_rank for n, (dec, _) in plan._cache.items()}
    factored = {lp.name: lp.rank for lp in plan.layers if lp.rank is not None}
    dense = set(layers(model)) - set(factored)
    assert factored and dense
    assert all(kept[n] == r for n, r in factored.items())
    assert all(kept[n] == 0 and len(plan._cache[n][0].S) > 0 for n in dense)
    name = sorted(dense)[0]
    edited = next(lp for lp in plan.layers if lp.name == name)
    edited.rank = 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PlanError, match="analysed for ranks up to 0"):
        rewrite(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_release_freed_memory_asks_glibc_where_there_is_one():
    import platform

    from compressor.core.memory import release_freed_memory

    assert release_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
