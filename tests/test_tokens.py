"""Per-token statistics: hand values, chunked == plain (values and gradients), masking, real HF models, bad inputs."""
import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from tokenpo.tokens import (IGNORE_INDEX, TokenStats, chunked_token_stats, completion_labels, hidden_states,
                            output_head, token_stats)


def _log_softmax(row):
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def test_completion_labels_shift_and_mask():
    input_ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 4, 9]])
    completion = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])   # row 0: prompt 5 6, completion 7 8, pad 0
    labels = completion_labels(input_ids, completion)
    assert labels.tolist() == [[-100, 7, 8, -100], [2, 3, 4, 9]]


def test_token_stats_hand_values():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]])
    ref_logits = torch.tensor([[[0.5, 0.5, 0.5], [1.0, 0.0, 2.0]]])
    labels = torch.tensor([[1, IGNORE_INDEX]])
    stats = token_stats(logits, labels, ref_logits)
    lp, lq = _log_softmax([1.0, 2.0, 0.5]), _log_softmax([0.5, 0.5, 0.5])
    kl = sum(math.exp(q) * (q - p) for p, q in zip(lp, lq))
    assert stats.logps[0].tolist() == pytest.approx([lp[1], 0.0], abs=1e-6)
    assert stats.ref_logps[0].tolist() == pytest.approx([lq[1], 0.0], abs=1e-6)
    assert stats.kl[0].tolist() == pytest.approx([kl, 0.0], abs=1e-6)
    assert kl > 0  # +KL(π_ref ‖ π_θ) sign
    assert stats.mask.tolist() == [[1.0, 0.0]]
    assert stats.seq_logps.item() == pytest.approx(lp[1], abs=1e-6)
    assert stats.lengths.tolist() == [1.0]


def test_token_stats_without_reference_or_kl():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 1, 2], [3, 4, IGNORE_INDEX]])
    assert token_stats(logits, labels).ref_logps is None
    stats = token_stats(logits, labels, logits + 1.0, with_kl=False)
    assert stats.kl is None and stats.ref_logps is not None
    with pytest.raises(ValueError, match="kl is None"):
        stats.seq_kl


def _problem(batch, length, hidden, vocab, dtype=torch.float32, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape, scale=1.0: (torch.randn(*shape, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, :3] = IGNORE_INDEX                     # prompt
    labels[-1, length - 2:] = IGNORE_INDEX           # padding
    return dict(hidden=make(batch, length, hidden).requires_grad_(), weight=make(vocab, hidden, scale=0.3).requires_grad_(),
                bias=make(vocab, scale=0.1).requires_grad_() if bias else None, labels=labels,
                ref_hidden=make(batch, length, hidden), ref_weight=make(vocab, hidden, scale=0.3),
                ref_bias=make(vocab, scale=0.1) if bias else None,
                g_logps=torch.randn(batch, length, generator=gen), g_kl=torch.randn(batch, length, generator=gen),
                g_ref=torch.randn(batch, length, generator=gen))


def _run(p, chunk_size=None, with_kl=True):
    """Statistics and gradients of sum(g·logps + g'·kl + g''·ref_logps) for the plain (None) or chunked path."""
    leaves = [t for t in (p["hidden"], p["weight"], p["bias"]) if t is not None]
    for t in leaves:
        t.grad = None
    if chunk_size is None:
        def logits(h, w, b):
            return h @ w.t() + (0 if b is None else b)
        stats = token_stats(logits(p["hidden"], p["weight"], p["bias"]), p["labels"],
                            logits(p["ref_hidden"], p["ref_weight"], p["ref_bias"]), with_kl=with_kl)
    else:
        stats = chunked_token_stats(p["hidden"], p["weight"], p["labels"], p["ref_hidden"], p["ref_weight"],
                                    bias=p["bias"], ref_bias=p["ref_bias"], chunk_size=chunk_size, with_kl=with_kl)
    objective = (p["g_logps"] * stats.logps).sum() + (p["g_ref"] * stats.ref_logps).sum()
    if with_kl:
        objective = objective + (p["g_kl"] * stats.kl).sum()
    objective.backward()
    values = [stats.logps, stats.ref_logps] + ([stats.kl] if with_kl else [])
    return [v.detach().float() for v in values], [t.grad.float() for t in leaves], stats


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 13, 1000])
@pytest.mark.parametrize("bias", [True, False])
def test_chunked_matches_plain_float32(chunk_size, bias):
    p = _problem(batch=3, length=9, hidden=16, vocab=50, bias=bias)   # 27 rows: 4, 7, 13 don't divide
    plain_values, plain_grads, _ = _run(p)
    values, grads, stats = _run(p, chunk_size)
    for a, b in zip(plain_values + plain_grads, values + grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert stats.logps.dtype == torch.float32 and stats.kl.dtype == torch.float32


def test_chunked_without_kl_matches_plain():
    p = _problem(batch=2, length=6, hidden=8, vocab=30)
    plain_values, plain_grads, _ = _run(p, with_kl=False)
    values, grads, stats = _run(p, 5, with_kl=False)
    assert stats.kl is None
    for a, b in zip(plain_values + plain_grads, values + grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_chunked_bfloat16_close_to_plain():
    """bf16 inputs: both paths round the logits to bf16 and then work in float32.

    Stated tolerance, against the float32 computation on the same (bf16-representable) inputs: values within 2e-2
    absolute (bf16 rounding of O(1) logits, 2^-8 relative) and gradients within 1.5e-2 of the largest gradient entry;
    the plain bf16 path has errors of the same size (measured: both ≤ 1e-2 and ≤ 6e-3 here).
    """
    p = _problem(batch=2, length=8, hidden=16, vocab=40, dtype=torch.bfloat16)
    exact = {k: (v.detach().float().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point()
                 else v) for k, v in p.items()}
    true_values, true_grads, _ = _run(exact)
    plain_values, plain_grads, _ = _run(p)
    values, grads, stats = _run(p, chunk_size=5)
    assert stats.logps.dtype == torch.float32
    for true, plain, chunked in zip(true_values, plain_values, values):
        torch.testing.assert_close(chunked, true, atol=2e-2, rtol=0)
        torch.testing.assert_close(chunked, plain, atol=2e-2, rtol=0)
    for true, chunked in zip(true_grads, grads):
        assert (chunked - true).abs().max() <= 1.5e-2 * true.abs().max()


def test_chunked_gradcheck_float64():
    p = _problem(batch=2, length=4, hidden=3, vocab=7, dtype=torch.float64)
    g1, g2 = p["g_logps"].double(), p["g_kl"].double()

    def f(hidden, weight, bias):
        s = chunked_token_stats(hidden, weight, p["labels"], p["ref_hidden"], p["ref_weight"], bias=bias,
                                ref_bias=p["ref_bias"], chunk_size=3)
        return (g1 * s.logps).sum() + (g2 * s.kl).sum()

    assert torch.autograd.gradcheck(f, (p["hidden"], p["weight"], p["bias"]))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_prompt_and_padding_contribute_nothing(chunk_size):
    p = _problem(batch=2, length=6, hidden=8, vocab=20)
    _, _, stats = _run(p, chunk_size)
    off = p["labels"] == IGNORE_INDEX
    assert off.any()
    assert (stats.mask[off] == 0).all() and (stats.mask[~off] == 1).all()
    for values in (stats.logps, stats.ref_logps, stats.kl):
        assert (values[off] == 0).all()
    assert (p["hidden"].grad[off] == 0).all()
    assert (p["hidden"].grad[~off].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_non_finite_logits_at_padding_reach_neither_statistics_nor_gradients(junk):
    """Plain path: a NaN/inf logit of the policy or the reference at a prompt/padding position changes nothing
    (only completion rows are normalised, so nothing flows back through the junk)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX], [2, 0, 4, 4]])
    clean, ref = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g)
    weights = torch.randn(2, 4, generator=g)

    def run(logits, ref_logits):
        logits = logits.clone().requires_grad_()
        stats = token_stats(logits, labels, ref_logits)
        (weights * (stats.logps + stats.kl + stats.ref_logps)).sum().backward()
        return stats, logits.grad

    expected, expected_grad = run(clean, ref)
    poisoned, poisoned_ref = clean.clone(), ref.clone()
    poisoned[0, 0, 2] = poisoned_ref[0, 3, 1] = junk
    got, grad = run(poisoned, poisoned_ref)
    for name in ("logps", "ref_logps", "kl"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_chunked_non_finite_hidden_at_padding_reaches_nothing(junk):
    p = _problem(batch=2, length=6, hidden=8, vocab=20)
    clean_values, clean_grads, _ = _run(p, 4)
    off = p["labels"] == IGNORE_INDEX
    with torch.no_grad():
        p["hidden"][off] = junk
        p["ref_hidden"][off] = junk
    values, grads, _ = _run(p, 4)
    for a, b in zip(clean_values + clean_grads[1:], values + grads[1:]):
        torch.testing.assert_close(b, a)
    torch.testing.assert_close(grads[0][~off], clean_grads[0][~off])


def test_chunked_reference_gets_no_gradient():
    p = _problem(batch=2, length=5, hidden=6, vocab=11)
    p["ref_hidden"].requires_grad_()
    p["ref_weight"].requires_grad_()
    stats = chunked_token_stats(p["hidden"], p["weight"], p["labels"], p["ref_hidden"], p["ref_weight"])
    (stats.logps.sum() + stats.kl.sum()).backward()
    assert p["ref_hidden"].grad is None and p["ref_weight"].grad is None
    assert not stats.ref_logps.requires_grad


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_hf_gpt2_chunked_equals_plain_logits(chunk_size):
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=101, n_positions=32, bos_token_id=0,
                        eos_token_id=0)
    policy, reference = GPT2LMHeadModel(config), GPT2LMHeadModel(config).eval()
    policy.eval()  # no dropout, so both forwards see the same function
    input_ids = torch.randint(1, 101, (3, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0
    completion = torch.zeros_like(input_ids)
    completion[:, 4:] = 1
    completion[2, 7:] = 0
    labels = completion_labels(input_ids, completion)

    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    plain = token_stats(logits, labels, ref_logits)
    (plain.logps.sum() + plain.kl.sum()).backward()
    plain_grads = {n: q.grad.clone() for n, q in policy.named_parameters()}
    policy.zero_grad()

    last, layers = hidden_states(policy, input_ids, attention_mask, all_layers=True)
    assert len(layers) == config.n_layer and torch.equal(layers[-1], last)   # GPT-2: last layer output is after ln_f
    with torch.no_grad():
        ref_last, _ = hidden_states(reference, input_ids, attention_mask)
    weight, bias = output_head(policy)
    assert weight is policy.transformer.wte.weight and bias is None          # tied embeddings
    chunked = chunked_token_stats(last[:, :-1], weight, labels, ref_last[:, :-1], output_head(reference)[0],
                                  chunk_size=chunk_size)
    (chunked.logps.sum() + chunked.kl.sum()).backward()
    for a, b in ((plain.logps, chunked.logps), (plain.ref_logps, chunked.ref_logps), (plain.kl, chunked.kl)):
        torch.testing.assert_close(b, a.detach(), atol=1e-5, rtol=1e-5)
    for name, q in policy.named_parameters():
        torch.testing.assert_close(q.grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_hidden_states_unwraps_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16,
                                       bos_token_id=0, eos_token_id=0)).eval()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
    input_ids, attention_mask = torch.randint(0, 50, (2, 6)), torch.ones(2, 6, dtype=torch.long)
    last, _ = hidden_states(wrapped, input_ids, attention_mask)
    weight, bias = output_head(wrapped)
    torch.testing.assert_close(last @ weight.t(), wrapped(input_ids=input_ids, attention_mask=attention_mask).logits)
    with wrapped.disable_adapter():
        base, _ = hidden_states(wrapped, input_ids, attention_mask)
        torch.testing.assert_close(base @ weight.t(), model(input_ids=input_ids, attention_mask=attention_mask).logits)
    assert (base - last).abs().max() > 1e-3   # the adapter was active in the first call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_chunked_matches_plain_cuda():
    p = _problem(batch=2, length=9, hidden=16, vocab=50)
    p = {k: (v.detach().cuda().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
         for k, v in p.items()}
    plain_values, plain_grads, _ = _run(p)
    values, grads, _ = _run(p, 4)
    for a, b in zip(plain_values + plain_grads, values + grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    h, w, labels = torch.randn(2, 4, 8), torch.randn(10, 8), torch.randint(0, 10, (2, 4))
    with pytest.raises(ValueError, match=r"weight must be \[V, H\] with H = 8"):
        chunked_token_stats(h, torch.randn(10, 7), labels)
    with pytest.raises(ValueError, match="labels .* must be \\[B, T\\]"):
        chunked_token_stats(h, w, labels[:, :3])
    with pytest.raises(ValueError, match=r"labels must be -100 or in \[0, 10\)"):
        chunked_token_stats(h, w, labels + 10)
    with pytest.raises(ValueError, match="without ref_weight"):
        chunked_token_stats(h, w, labels, ref_hidden=h)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_stats(h, w, labels, chunk_size=0)
    with pytest.raises(ValueError, match="ref_logits"):
        token_stats(torch.randn(2, 4, 10), labels, torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="same"):
        completion_labels(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="ref_logps is None"):
        TokenStats(logps=torch.zeros(1, 2), mask=torch.ones(1, 2)).seq_ref_logps
