"""Healing causal language models (compressor.train.decoder): the chunked losses against the whole-logits
ones, end-to-end and block-wise distillation on tiny Gemma 3 (sliding and full attention layers, soft-capped
logits) and Llama configs, and text read as a BOS-led token stream."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

import compressor  # noqa: E402
from compressor.core.rewrite import rewrite  # noqa: E402
from compressor.jobs.heal import load_training_data  # noqa: E402
from compressor.train.blockwise import block_error, capture  # noqa: E402
from compressor.train.decoder import LMLoss, head_inputs, is_causal_lm, text_tokens, uncached  # noqa: E402
from compressor.train.heal import heal  # noqa: E402

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def gemma3(seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2), max_position_embeddings=64,
        final_logit_softcapping=30.0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def sequences(n: int, length: int = 16, seed: int = 1) -> dict[str, torch.Tensor]:
    """Token sequences with structure to learn (a noisy repeated pattern), so a teacher is worth matching."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(length) * 7 % VOCAB
    ids = (base + torch.randint(0, 3, (n, 1), generator=g)) % VOCAB
    noise = torch.rand(n, length, generator=g) < 0.2
    ids = torch.where(noise, torch.randint(0, VOCAB, (n, length), generator=g), ids)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def compressed(model_fn, ratio: float = 0.25):
    teacher, student = model_fn(), model_fn()
    rewrite(student, compressor.analyze(student, rank_ratio=ratio, include=["model.layers.*"]))
    return teacher, student


def full_kl(student, teacher, batch, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position from the models' whole logits, padding left out."""
    s = student(**batch).logits / temperature
    t = teacher(**batch).logits / temperature
    per = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    m = batch["attention_mask"].float()
    return (per * m).sum() / m.sum() * temperature ** 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_the_whole_logits_kl(temperature):
    """Value and gradients (to every factor) of the chunked KL, chunks of 5 positions across sequence
    boundaries and padding, equal those of the KL computed on the whole logits (Gemma's soft-capping in)."""
    teacher, student = compressed(gemma3)
    batch = sequences(3, 12)
    batch["attention_mask"][1, 9:] = 0
    params = [p for n, p in student.named_parameters() if ".down." in n or ".up." in n]
    assert params
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    want = full_kl(student, teacher, batch, temperature)
    want_grads = torch.autograd.grad(want, params)
    lm = LMLoss(student, teacher, "kl", temperature, chunk=5)
    with torch.no_grad():
        target = head_inputs(teacher, batch)
    got = lm(head_inputs(student, batch), target, batch)
    got_grads = torch.autograd.grad(got, params)
    assert want.item() > 1e-3  # the compressed model differs: the comparison is not of two zeros
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_kl_over_the_text_tokens_is_the_kl_of_both_distributions_renormalised_over_them():
    """A training step with ``kl_tokens="text"`` (the causal-LM default): the value and gradients are those of
    the KL between teacher and student restricted to the text's distinct tokens, each renormalised over them
    (Gemma's soft-capping in); evaluation still compares over the whole vocabulary."""
    teacher, student = compressed(gemma3)
    batch = sequences(3, 12)
    vocab = text_tokens(batch, [sequences(40, 16, seed=5)])
    assert 2 * 32 <= len(vocab) < VOCAB and torch.equal(vocab, torch.unique(vocab))  # hidden width 32
    params = [p for n, p in student.named_parameters() if ".down." in n or ".up." in n]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    s, t = student(**batch).logits[..., vocab], teacher(**batch).logits[..., vocab].detach()
    want = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    want_grads = torch.autograd.grad(want, params)
    lm = LMLoss(student, teacher, "kl", chunk=5, vocabulary=vocab)
    with torch.no_grad():
        target = head_inputs(teacher, batch)
    got = lm(head_inputs(student, batch), target, batch)
    assert want.item() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    for g, w in zip(torch.autograd.grad(got, params), want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)
    assert LMLoss(student, teacher, "kl", vocabulary=vocab[:63]).sub is None  # too few tokens: all are used
    with torch.no_grad():
        total, count = lm.measure(head_inputs(student, batch), target, batch)["loss"]
    torch.testing.assert_close(torch.tensor(total / count), full_kl(student, teacher, batch).detach(),
                               rtol=1e-5, atol=1e-7)


def test_chunked_ce_equals_the_model_loss():
    """The chunked next-token loss is the model's own language-modelling loss (labels = the inputs)."""
    _, student = compressed(llama)
    batch = sequences(4, 10)
    lm = LMLoss(student, None, "ce", chunk=7)
    with torch.no_grad():
        got = lm(head_inputs(student, batch), None, batch)
        want = student(**batch, labels=batch["input_ids"]).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def held_out(student, teacher, batch, loss: str) -> float:
    """What the loss trains for, on ``batch``: the KL to the teacher (kl) or the text's NLL (ce)."""
    with torch.no_grad():
        if loss == "ce":
            return float(student(**batch, labels=batch["input_ids"]).loss)
        return float(full_kl(student, teacher, batch))


@pytest.mark.parametrize("kind, settings", [("gemma3", {}), ("llama", {}), ("gemma3", {"distill": "hidden"}),
                                            ("gemma3", {"loss": "ce"})])
def test_decoder_heal_lowers_held_out_distillation_loss(kind, settings):
    """End-to-end healing of a compressed tiny decoder lowers its loss on sequences it never saw (not its
    validation data either): the KL to the teacher (kl, the decoder default, alone or with hidden states), the
    text's next-token loss (ce); the input models are not modified."""
    teacher, student = compressed({"gemma3": gemma3, "llama": llama}[kind])
    assert is_causal_lm(student)
    loss = settings.get("loss", "kl")
    train, held = sequences(48, seed=1), sequences(16, seed=2)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    before = held_out(student, teacher, held, loss)
    result = heal(student, teacher=teacher, data=train, batch_size=8, epochs=4, lr=1e-2, **settings)
    after = held_out(result.model, teacher, held, loss)
    # The KL falls by a share; the NLL (near log(vocab) on a random-init model) by a margin in nats.
    assert after < (before - 0.1 if loss == "ce" else 0.8 * before), (before, after)
    assert result.config.loss == loss
    assert all(torch.equal(state[k], v) for k, v in student.state_dict().items())
    assert student.config.use_cache and result.model.config.use_cache  # no setting left behind


def test_decoder_heal_reports_held_out_nll():
    """With validation data a decoder heal monitors the held-out loss and reports the next-token NLL too."""
    teacher, student = compressed(gemma3)
    result = heal(student, teacher=teacher, data=sequences(32), val_data=sequences(8, seed=3), batch_size=8,
                  epochs=2, lr=1e-2)
    assert result.config.monitor == "val_loss"
    assert set(result.before) == {"val_loss", "val_nll"}
    assert result.after["val_loss"] < result.before["val_loss"]


def test_train_all_trains_the_dense_layers_too_and_never_the_tied_head():
    """train="all": the factors and every linear layer left dense train (so more of the error is recovered on
    sequences never seen); the tied embedding / output head, the norms and the biases stay as they were."""
    teacher, student = gemma3(), gemma3()
    rewrite(student, compressor.analyze(student, rank_ratio=0.1, include=["model.layers.0.mlp.*"]))
    before = student.state_dict()
    train, held = sequences(48, seed=1), sequences(16, seed=2)
    results = {t: heal(student, teacher=teacher, data=train, batch_size=8, epochs=4, lr=1e-3, train=t)
               for t in ("factors", "all")}
    moved = {t: {k for k, v in r.model.state_dict().items() if not torch.equal(v, before[k])}
             for t, r in results.items()}
    factors = {k for k in before if k.endswith(("down.weight", "up.weight"))}
    assert factors and moved["factors"] == factors
    assert factors < moved["all"] and "model.layers.1.self_attn.q_proj.weight" in moved["all"]
    assert all(k.endswith(("proj.weight", "down.weight", "up.weight")) for k in moved["all"]), moved["all"]
    kl = {t: held_out(r.model, teacher, held, "kl") for t, r in results.items()}
    assert kl["all"] < kl["factors"] < held_out(student, teacher, held, "kl"), kl


def test_blockwise_heal_on_gemma3_sliding_and_full_layers():
    """Block-wise healing on Gemma 3 (sliding-window blocks of 4 tokens and full-attention blocks take
    different masks and rotary embeddings, both built by the model): every block's held-out output error
    falls, then the end-to-end phase runs on; each block was run with exactly the model's arguments, so the
    healed student's blocks, called by the model, reproduce the errors the phase measured."""
    teacher, student = compressed(lambda: gemma3(layers=4), ratio=0.2)
    train, val = sequences(32, 16), sequences(8, 16, seed=5)
    result = heal(student, teacher=teacher, data=train, val_data=val, method="blockwise", block_steps=40,
                  batch_size=8, lr=1e-2)
    assert [b["block"] for b in result.blocks] == [f"model.layers.{i}" for i in range(4)]
    for b in result.blocks:
        assert b["after"] < 0.9 * b["before"], b
        # Re-measured with the block's inputs captured from a fresh pass of the healed model (the masks and
        # rotary embeddings the model builds): the error the phase kept, so it trained on those arguments.
        data = capture(result.model, teacher, b["block"], [uncached(val)])
        assert block_error(result.model.get_submodule(b["block"]), data) == pytest.approx(b["after"], rel=1e-4)
    both = heal(student, teacher=teacher, data=train, val_data=val, method="both", block_steps=40, batch_size=8,
                lr=1e-2, epochs=2)
    assert both.steps == 8 and both.after["val_loss"] < both.before["val_loss"]


def test_text_for_a_decoder_is_a_bos_led_token_stream(tmp_path):
    """A text file for a causal LM becomes sequences of seq_len tokens cut from one token stream, each led by
    the BOS the tokenizer puts before a text, in one set of tensors (heal batches it); no padding."""

    class Chars:  # a tokenizer: one id per character, BOS = 1 before a text
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=True, return_tensors=None):
            ids = ([1] if add_special_tokens else []) + [3 + ord(c) % 90 for c in text]
            return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    path = tmp_path / "text.txt"
    text = "abcdefghijklmnopqrstuvwxyz" * 3
    path.write_text(text)
    inputs, targets = load_training_data(path, Chars(), samples=4, seq_len=8)
    assert targets is None
    ids = inputs["input_ids"]
    assert ids.shape == (4, 8) and bool(inputs["attention_mask"].all())
    assert ids[:, 0].tolist() == [1] * 4
    stream = Chars()(text, add_special_tokens=False)["input_ids"]
    assert ids[:, 1:].reshape(-1).tolist() == stream[:28]


def test_decoder_losses_refused_and_ce_without_teacher():
    """mse and cosine have no meaning on next-token distributions: refused in one line before training; ce
    learns the text itself, so it needs no teacher."""
    from compressor.core.errors import CompressorError

    teacher, student = compressed(llama)
    data = sequences(8)
    for loss in ("mse", "cosine"):
        with pytest.raises(CompressorError, match="pass loss= \\(--loss\\) kl or ce"):
            heal(student, teacher=teacher, data=data, loss=loss, steps=1)
    with pytest.raises(CompressorError, match="no teacher was given"):
        heal(student, data=data, loss="kl", steps=1)
    result = heal(student, data=data, val_data=sequences(4, seed=4), loss="ce", batch_size=4, epochs=3, lr=1e-2)
    assert result.after["val_nll"] < result.before["val_nll"]


def test_decoder_default_learning_rate():
    """A causal LM heals at LM_LR unless told otherwise (a compressed Gemma's factors move too far at the
    general default); a plain model keeps LR."""
    from compressor.train.heal import LM_LR, LR

    teacher, student = compressed(llama)
    assert heal(student, teacher=teacher, data=sequences(4), steps=1).config.lr == LM_LR
    assert heal(student, teacher=teacher, data=sequences(4), steps=1, lr=3e-3).config.lr == 3e-3
    plain = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    rewrite(plain, compressor.analyze(plain, rank=8))
    assert heal(plain, data=torch.randn(8, 64), targets=torch.randn(8, 64), steps=1).config.lr == LR
