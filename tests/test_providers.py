"""Tests of tokenpo.providers: MaPO activation masks, SparsePO mask networks, SePO selection, ConfPO tokens, random
masks, dataset columns — alone and as providers of a step."""
import importlib
import math

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM)

from tokenpo.objectives import mask_statistics
from tokenpo.providers.activations import token_statistics
from tokenpo.providers.mapo import mapo_batch_masks, mapo_masks, zn_rescale
from tokenpo.providers.random import random_mask, random_selection
from tokenpo.providers.sepo import oracle_scores, selection_counts, sepo_selection
from tokenpo.providers.sparsepo import SparsePOMask, SparsePOMasks
from tokenpo.tokens import align_to_labels

VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def _neox(parallel=True):
    return GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                            use_parallel_residual=parallel, bos_token_id=0, eos_token_id=0))


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


BUILDERS = {"gpt2": _gpt2, "neox": _neox, "neox_sequential": lambda: _neox(False), "llama": _llama}
# hooked tensors per type for a 2-layer model (see the table in tokenpo.providers.activations)
EXPECTED_COUNTS = {
    "gpt2": {"resid": 5 * 2 + 2, "attn": 4 * 2, "mlp": 2, "logits": 1},
    "neox": {"resid": 5 * 2 + 2, "attn": 6 * 2, "mlp": 2, "logits": 1},
    "neox_sequential": {"resid": 6 * 2 + 2, "attn": 6 * 2, "mlp": 2, "logits": 1},
    "llama": {"resid": 6 * 2 + 2, "attn": 6 * 2, "mlp": 2, "logits": 1},
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: build().eval() for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def batch():
    """3 rows, L = 10: prompt = first 4 tokens; row 1 right-padded after 7 tokens."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    ids[1, 7:] = 0
    comp = torch.zeros_like(ids)
    comp[:, 4:] = 1
    comp[1, 7:] = 0
    return ids, attn, comp


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------------------------ zn_rescale
def test_zn_rescale_matches_hand_computation():
    values = torch.tensor([[9.0, 2.0, 3.0, 7.0, -4.0], [5.0, 5.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    got = zn_rescale(values, mask)
    # row 0: response r = (2, 3, 7): mean 4, unbiased std sqrt(7); z = (r-4)/sqrt(7); min-max of z
    r = [2.0, 3.0, 7.0]
    mean = sum(r) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 2) + 1e-12
    z = [(x - mean) / std for x in r]
    row0 = [0.0] + [(v - min(z)) / (max(z) - min(z)) for v in z] + [0.0]
    assert got[0].tolist() == pytest.approx(row0, abs=1e-6)
    assert got[1].tolist() == pytest.approx([1.0, 1.0, 0.0, 0.0, 0.0], abs=1e-6)


def test_zn_rescale_degenerate_rows():
    values = torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 0], [0, 0, 0]])
    got = zn_rescale(values, mask)
    assert got.tolist() == [[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    assert torch.isfinite(got).all()


# ----------------------------------------------------------------------------------------------------- MaPO
@pytest.mark.parametrize("family", list(BUILDERS))
def test_mapo_masks_properties(models, batch, family):
    model = models[family]
    ids, attn, comp = batch
    labels_mask = comp[:, 1:]
    model.train()                                           # must be put in eval and restored
    masks, by_type = mapo_masks(model, ids, attn, labels_mask, hook="all", return_by_type=True)
    assert model.training
    model.eval()
    assert masks.shape == (3, 9) and not masks.requires_grad
    assert (masks >= 0).all() and (masks <= 1).all()
    assert (masks[labels_mask == 0] == 0).all()
    assert (masks[labels_mask == 1] > 0).any()
    assert set(by_type) == {"resid", "attn", "mlp", "logits"}
    torch.testing.assert_close(masks, torch.stack(list(by_type.values())).mean(0))
    assert _hook_count(model) == 0
    # one hooked tensor (logits): every response spans exactly [0, 1]
    single = mapo_masks(model, ids, attn, labels_mask, hook="logits")
    for row in range(3):
        values = single[row][labels_mask[row] == 1]
        assert values.max().item() == pytest.approx(1.0) and values.min().item() == pytest.approx(0.0)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_hooked_tensor_counts(models, batch, family):
    ids, attn, _ = batch
    stats = token_statistics(models[family], ids, attn, ("resid", "attn", "mlp", "logits"))
    assert {k: len(v) for k, v in stats.items()} == EXPECTED_COUNTS[family]
    assert all(s.shape == (ids.shape[0], ids.shape[1] - 1) for v in stats.values() for s in v)   # label-aligned
    assert _hook_count(models[family]) == 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logits_mask_equals_official_formula(models, batch, family):
    """Independent re-implementation of the official per-row loop (mean over vocab, torch.std, min/max)."""
    model = models[family]
    ids, attn, comp = batch
    labels_mask = comp[:, 1:].bool()
    with torch.no_grad():
        reduced = model(ids, attention_mask=attn).logits.mean(-1)[:, :-1]
    expected = torch.zeros_like(reduced)
    for i in range(len(ids)):
        sel = reduced[i, labels_mask[i]]
        z = (reduced[i] - sel.mean()) / (sel.std() + 1e-12)
        zs = z[labels_mask[i]]
        expected[i] = (z - zs.min()) / (zs.max() - zs.min()) * labels_mask[i]
    got = mapo_masks(model, ids, attn, comp[:, 1:], hook="logits")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mlp_hook_reads_post_activation(models, batch):
    """GPT-2's `mlp` statistic is the mean of act(c_fc(x)), read here independently from the `mlp.act` module."""
    model = models["gpt2"]
    ids, attn, _ = batch
    seen = []
    handles = [b.mlp.act.register_forward_hook(lambda m, a, o: seen.append(o.mean(-1))) for b in model.transformer.h]
    try:
        stats = token_statistics(model, ids, attn, ("mlp",))
    finally:
        for h in handles:
            h.remove()
    for ours, theirs in zip(stats["mlp"], seen):
        torch.testing.assert_close(ours, theirs[:, :-1])


@pytest.mark.parametrize("family", ["neox", "llama"])
def test_post_rotary_queries_match_the_model(models, batch, family):
    """The rotated q/k recorded by the hooks equal the ones the attention actually uses."""
    model = models[family]
    ids, attn, _ = batch
    module = importlib.import_module(type(model).__module__)
    original = module.apply_rotary_pos_emb
    used = []

    def spy(q, k, cos, sin, unsqueeze_dim=1):
        out = original(q, k, cos, sin, unsqueeze_dim)
        used.append([t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1).mean(-1) for t in out])
        return out

    module.apply_rotary_pos_emb = spy
    try:
        stats = token_statistics(model, ids, attn, ("attn",))
    finally:
        module.apply_rotary_pos_emb = original
    model_q, model_k = used[2]           # our q and k rotations call the spy first, then the layer itself
    assert torch.allclose(stats["attn"][1], model_q[:, :-1], atol=1e-6)     # order: q, rot q, k, rot k, v, v_out
    assert torch.allclose(stats["attn"][3], model_k[:, :-1], atol=1e-6)


def test_hooks_removed_and_mode_restored_on_error(models, batch):
    model = models["gpt2"]
    ids, attn, comp = batch
    model.train()
    with pytest.raises(IndexError):
        mapo_masks(model, ids + VOCAB, attn, comp[:, 1:])          # out-of-vocabulary ids fail inside the forward
    assert _hook_count(model) == 0 and model.training
    model.eval()


def test_uniform_and_other_mappings(models, batch):
    model = models["neox"]
    ids, attn, comp = batch
    labels_mask = comp[:, 1:]
    assert torch.equal(mapo_masks(model, ids, attn, labels_mask, hook="uniform"), labels_mask.float())
    sig = mapo_masks(model, ids, attn, labels_mask, mapping="sigmoid")
    on = labels_mask == 1
    assert (sig[on] > 0).all() and (sig[on] < 1).all() and (sig[~on] == 0).all()
    for mapping in ("layernorm", "none"):
        out = mapo_masks(model, ids, attn, labels_mask, hook=("attn", "resid"), mapping=mapping)
        assert (out[~on] == 0).all() and torch.isfinite(out).all()


def test_mapo_batch_masks_split_sides(models, batch):
    model = models["gpt2"]
    ids, attn, comp = batch
    other = torch.roll(ids, 1, dims=1)
    b = {"chosen_input_ids": ids, "chosen_attention_mask": attn, "chosen_completion_mask": comp,
         "rejected_input_ids": other, "rejected_attention_mask": attn, "rejected_completion_mask": comp}
    chosen, rejected = mapo_batch_masks(model, b)
    torch.testing.assert_close(chosen, mapo_masks(model, ids, attn, comp[:, 1:]))
    torch.testing.assert_close(rejected, mapo_masks(model, other, attn, comp[:, 1:]))


def test_mapo_on_peft_wrapped_reference(models, batch):
    from peft import LoraConfig, get_peft_model
    ids, attn, comp = batch
    base = _gpt2().eval()
    expected = mapo_masks(base, ids, attn, comp[:, 1:])
    wrapped = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    torch.testing.assert_close(mapo_masks(wrapped, ids, attn, comp[:, 1:]), expected)   # LoRA B = 0 at init
    assert _hook_count(wrapped) == 0


def test_mapo_bad_inputs(models, batch):
    ids, attn, comp = batch
    with pytest.raises(ValueError, match="labels_mask"):
        mapo_masks(models["gpt2"], ids, attn, comp)
    with pytest.raises(ValueError, match="hook"):
        mapo_masks(models["gpt2"], ids, attn, comp[:, 1:], hook="mlp,heads")
    with pytest.raises(ValueError, match="mapping"):
        mapo_masks(models["gpt2"], ids, attn, comp[:, 1:], mapping="softmax")


# ------------------------------------------------------------------------------------------------ SparsePO
def _ref_layers(n_layers=3, d=16, requires_grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, d, generator=g).requires_grad_(requires_grad) for _ in range(n_layers)]


def test_sparsepo_mask_shape_sign_and_zeros():
    torch.manual_seed(0)
    net = SparsePOMask(3, 16)
    mask = torch.ones(4, 7)
    mask[0, :3] = 0
    m = net([align_to_labels(h) for h in _ref_layers()], mask)
    assert m.shape == (4, 7) and (m >= 0).all()
    assert (m[mask == 0] == 0).all()
    assert (m[mask == 1] == 0).any() and (m[mask == 1] > 0).any()        # ReLU gives exact zeros
    dead = SparsePOMask(3, 16, mixer_init=-1.0)
    assert (dead(_ref_layers()) == 0).all()
    alive = SparsePOMask(3, 16, mixer_init=1.0)
    assert torch.all(alive.mixer.weight == 1.0)


def test_sparsepo_mask_equals_hand_formula():
    """m = ReLU(Σ_ℓ w_mix[ℓ] · ReLU(W_ℓ · LayerNorm(h_ℓ) + b_ℓ)) with ONE LayerNorm for all layers."""
    torch.manual_seed(1)
    net = SparsePOMask(3, 16)
    with torch.no_grad():
        net.layer_norm.weight.uniform_(0.5, 1.5)
        net.layer_norm.bias.uniform_(-0.1, 0.1)
    layers = _ref_layers()
    ln = net.layer_norm
    total = 0
    for l, h in enumerate(layers):
        normed = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + ln.eps)
        normed = normed * ln.weight + ln.bias
        score = torch.relu(normed @ net.layer_scorers[l].weight[0] + net.layer_scorers[l].bias[0])
        total = total + net.mixer.weight[0, l] * score
    torch.testing.assert_close(net(layers), torch.relu(total))


def test_sparsepo_gradients_reach_parameters_not_reference():
    torch.manual_seed(0)
    net = SparsePOMask(3, 16, mixer_init=0.5)
    layers = _ref_layers(requires_grad=True)
    net(layers).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(h.grad is None for h in layers)


def test_sparsepo_structure_common_and_independent():
    common = SparsePOMasks("common", 3, 16)
    indep = SparsePOMasks("independent", 3, 16)
    per_net = 3 * (16 + 1) + 3 + 2 * 16                   # L(d+1) + L + 2d (docs/equations.md#sparsepo)
    assert sum(p.numel() for p in common.parameters()) == per_net
    assert sum(p.numel() for p in indep.parameters()) == 2 * per_net
    for masks in (common, indep):
        assert all("_mask" in name for name, _ in masks.named_parameters())
        for net in masks.children():
            assert sum(isinstance(m, torch.nn.LayerNorm) for m in net.modules()) == 1   # shared LayerNorm
    layers = _ref_layers()
    reward, kl = common.weights(layers)
    assert reward is kl
    reward, kl = indep.weights(layers)
    assert reward.shape == kl.shape and not torch.equal(reward, kl)
    assert {n.split(".")[0] for n, _ in indep.named_parameters()} == {"rw_mask", "kl_mask"}


def test_sparsepo_resc_activation_and_config():
    net = SparsePOMask(3, 16, layer_activation="resc", mixer_activation="resc")
    mask = torch.ones(4, 8)
    mask[1, 5:] = 0
    m = net(_ref_layers(), mask)
    assert (m >= 0).all() and (m <= 1 + 1e-6).all()
    assert torch.allclose(m.amax(-1), torch.ones(4))
    cfg = GPT2Config(n_layer=5, n_embd=24, n_head=2, layer_norm_epsilon=1e-4)
    masks = SparsePOMasks.from_model_config(cfg, mode="independent", dropout=0.01)
    assert masks.rw_mask.n_layers == 5 and masks.rw_mask.layer_norm.eps == 1e-4
    with pytest.raises(ValueError, match="expects 5 layer states"):
        masks.rw_mask(_ref_layers(3, 24))
    with pytest.raises(ValueError, match="mode"):
        SparsePOMasks("shared", 3, 16)


def test_mask_statistics_per_row():
    weights = torch.tensor([[0.0, 0.5, 0.0, 9.0], [1.0, 0.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    sparsity, mean = mask_statistics(weights, mask)
    torch.testing.assert_close(sparsity, torch.tensor([2 / 3, 2 / 4]))
    torch.testing.assert_close(mean, torch.tensor([0.5 / 3, 3 / 4]))


# ---------------------------------------------------------------------------------------------------- SePO
def test_sepo_selection_counts_and_extremes():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 15, generator=g)
    mask = torch.zeros(3, 15, dtype=torch.long)
    mask[0, 2:12] = 1          # N = 10 -> 3
    mask[1, 5:7] = 1           # N = 2  -> int(0.6) = 0 -> raised to 1
    mask[2, :] = 1             # N = 15 -> 4
    scores[0, 0] = 100.0       # prompt token with the largest score: never selected
    for highest in (True, False):
        sel = sepo_selection(scores, mask, 0.3, highest=highest)
        assert sel.sum(-1).tolist() == [3, 1, 4]
        assert (sel[mask == 0] == 0).all()
        for row in range(3):
            on = mask[row] == 1
            picked, rest = scores[row][on & (sel[row] == 1)], scores[row][on & (sel[row] == 0)]
            if highest:
                assert picked.min() >= rest.max()
            else:
                assert picked.max() <= rest.min()
    assert sepo_selection(scores, mask, 0.3, True, min_count=0).sum(-1).tolist() == [3, 0, 4]


def test_sepo_ties_and_official_int_rounding():
    scores = torch.zeros(1, 8)
    mask = torch.ones(1, 8)
    assert sepo_selection(scores, mask, 0.5, highest=True).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert sepo_selection(scores, mask, 0.5, highest=False).tolist() == [[1, 1, 1, 1, 0, 0, 0, 0]]
    assert selection_counts(torch.ones(1, 100), 0.29).item() == int(0.29 * 100) == 28
    with pytest.raises(ValueError, match="ratio"):
        selection_counts(mask, 0.0)
    with pytest.raises(ValueError, match="row 0"):
        sepo_selection(torch.full((1, 8), float("nan")), mask, 0.3, True)


def test_oracle_scores(models, batch):
    ids, attn, comp = batch
    oracle, reference = models["gpt2"], _gpt2().eval()
    scores = oracle_scores(oracle, reference, ids, attn, comp)
    labels = ids[:, 1:]
    with torch.no_grad():
        lp_o = torch.log_softmax(oracle(ids, attention_mask=attn).logits[:, :-1], -1)
        lp_r = torch.log_softmax(reference(ids, attention_mask=attn).logits[:, :-1], -1)
    expected = (lp_o - lp_r).gather(-1, labels[..., None]).squeeze(-1) * comp[:, 1:]
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert (scores[comp[:, 1:] == 0] == 0).all()
    assert (oracle_scores(oracle, oracle, ids, attn, comp) == 0).all()


# -------------------------------------------------------------------------------------------------- random
def test_random_masks_are_seeded():
    mask = torch.ones(4, 20)
    mask[:, :5] = 0

    def gen(seed):
        return torch.Generator().manual_seed(seed)
    a, b, c = (random_mask(mask, gen(s)) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[mask == 0] == 0).all() and (a[mask == 1] > 0).all() and (a < 1).all()
    bern = random_mask(mask, gen(3), kind="bernoulli", p=0.25)
    assert set(bern.unique().tolist()) <= {0.0, 1.0} and (bern[mask == 0] == 0).all()
    s1, s2 = random_selection(mask, 0.3, gen(7)), random_selection(mask, 0.3, gen(7))
    assert torch.equal(s1, s2) and s1.sum(-1).tolist() == [4] * 4 and (s1[mask == 0] == 0).all()
    assert not torch.equal(s1, random_selection(mask, 0.3, gen(8)))
    with pytest.raises(ValueError, match="kind"):
        random_mask(mask, kind="gaussian")


# ------------------------------------------------------------------------------------------ as step providers
def _context(rows, **columns):
    """A StepContext over collated rows (per-token columns placed by the collator), with the label masks."""
    from tokenpo.data.collator import PreferenceCollator
    from tokenpo.providers import StepContext
    from tokenpo.tokens import TokenStats, completion_labels

    batch = PreferenceCollator(0)(rows)
    stats = []
    for side in ("chosen", "rejected"):
        labels = completion_labels(batch[f"{side}_input_ids"], batch[f"{side}_completion_mask"])
        mask = (labels != -100).float()
        stats.append(TokenStats(logps=columns.get(f"{side}_logps", torch.zeros_like(mask)), mask=mask))
    labels = torch.cat([completion_labels(batch[f"{s}_input_ids"], batch[f"{s}_completion_mask"])
                        for s in ("chosen", "rejected")])
    return StepContext(batch=batch, labels=labels, chosen=stats[0], rejected=stats[1], hparams={}), batch


def _selected_tokens(selection, batch, side):
    """The completion token ids a [B, T] selection marks, per row (labels: position t holds token t + 1)."""
    ids = batch[f"{side}_input_ids"][:, 1:]
    return [ids[b][selection[b] == 1].tolist() for b in range(len(ids))]


def test_sepo_provider_keeps_the_oracles_best_chosen_and_worst_rejected_tokens():
    """Known scores per completion token: the provider must pick exactly the top-k chosen and bottom-k rejected
    tokens — so a shift of the score column by one position, or the wrong direction on a side, fails here."""
    from tokenpo.providers import SePOSelections

    rows = [{"row_index": 0, "prompt_ids": [5, 6, 7], "chosen_ids": [11, 12, 13, 14, 15, 16, 17, 18, 19, 1],
             "rejected_ids": [21, 22, 23, 24, 25, 26, 27, 28, 29, 1]},
            {"row_index": 1, "prompt_ids": [5, 6], "chosen_ids": [31, 32, 33, 34, 35, 1],
             "rejected_ids": [41, 42, 43, 44, 45, 46, 47, 1]}]
    # scores per completion token, all distinct; high for the token ids listed in `best`
    best = {"chosen": [[14, 18, 1], [33]], "rejected": [[22, 27, 29], [41, 45]]}
    for i, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            row[f"{side}_token_scores"] = [(100 if t in best[side][i] else 0) + 0.01 * j
                                           for j, t in enumerate(row[f"{side}_ids"])]
    ctx, batch = _context(rows)
    out = SePOSelections(0.3, 0.3)(ctx)["selections"]
    # chosen: int(0.3·10) = 3 and int(0.3·6) = 1 tokens with the HIGHEST scores
    assert _selected_tokens(out[0], batch, "chosen") == best["chosen"]
    # rejected: 3 and 2 tokens with the LOWEST scores: the low-score tokens, lowest first in position order
    worst = [[t for t in row["rejected_ids"] if t not in best["rejected"][i]] for i, row in enumerate(rows)]
    assert _selected_tokens(out[1], batch, "rejected") == [worst[0][:3], worst[1][:2]]


def test_sepo_provider_errors_and_random_tokens():
    from tokenpo.providers import SePOSelections

    rows = [{"row_index": 3, "prompt_ids": [5, 6], "chosen_ids": [11, 12, 13, 1], "rejected_ids": [21, 22, 1]}]
    ctx, _ = _context(rows)
    with pytest.raises(ValueError, match="no column 'chosen_token_scores'.*score_pairs"):
        SePOSelections()(ctx)
    first = SePOSelections(0.5, 0.5, column=None, seed=1)(ctx)["selections"]
    again = SePOSelections(0.5, 0.5, column=None, seed=1)(ctx)["selections"]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert [int(s.sum()) for s in first] == [2, 1]
    for ratio in (0.0, 1.5, float("inf")):
        with pytest.raises(ValueError, match=r"ratio_chosen must be a share of the tokens in \(0, 1\]"):
            SePOSelections(ratio_chosen=ratio)


def test_low_confidence_tokens_are_those_below_the_mean_probability():
    from tokenpo.providers import LowConfidenceTokens

    rows = [{"row_index": 0, "prompt_ids": [5], "chosen_ids": [11, 12, 13, 1], "rejected_ids": [21, 22, 1]}]
    ctx, batch = _context(rows)
    probs = {"chosen": [0.9, 0.1, 0.6, 0.8], "rejected": [0.5, 0.2, 0.3]}      # means 0.6 and 1/3
    for side, stats in (("chosen", ctx.chosen), ("rejected", ctx.rejected)):
        on = stats.mask[0] > 0
        stats.logps[0, on] = torch.tensor(probs[side]).log()
    chosen, rejected = LowConfidenceTokens()(ctx)["selections"]
    assert _selected_tokens(chosen, batch, "chosen") == [[12]]          # 0.1 < 0.6; 0.6 is not below its mean
    assert _selected_tokens(rejected, batch, "rejected") == [[22, 1]]   # 0.2 and 0.3 < 1/3


def test_mapo_provider_equals_mapo_masks_without_a_second_forward(models, batch):
    """In a step the MaPO statistics come from hooks on the one reference forward; the masks equal the standalone
    function's, which runs a forward of its own."""
    from tokenpo.objectives import get_objective
    from tokenpo.providers import MaPOMasks
    from tokenpo.training.step import TrainablePolicy, compute_batch, make_plan

    model = models["llama"]
    ids, attn, comp = batch
    b = {"chosen_input_ids": ids, "chosen_attention_mask": attn, "chosen_completion_mask": comp,
         "rejected_input_ids": ids.flip(0), "rejected_attention_mask": attn.flip(0),
         "rejected_completion_mask": comp.flip(0), "row_index": torch.arange(3)}
    provider = MaPOMasks()
    forwards = []
    handle = model.model.register_forward_hook(lambda *a: forwards.append(1))
    try:
        plan = make_plan(get_objective("mapo"), {"beta": 0.1}, [provider])
        seen = {}
        original = provider.forward
        provider.forward = lambda ctx: seen.setdefault("out", original(ctx))
        compute_batch(plan, TrainablePolicy(_llama().eval(), [provider]), model, b)
    finally:
        handle.remove()
    assert len(forwards) == 1                                   # the reference ran once, for everything
    expected = mapo_batch_masks(model, b)
    for got, want in zip(seen["out"]["masks"], expected):
        torch.testing.assert_close(got, want)


def test_sepo_bad_input_names_the_row_and_the_tokenizer():
    from tokenpo.providers import SePOSelections
    from tokenpo.providers.sepo import check_same_vocabulary

    rows = [{"row_index": 7, "prompt_ids": [5, 6], "chosen_ids": [11, 1], "rejected_ids": [21, 22, 23, 24, 1],
             "chosen_token_scores": [0.1, 0.2], "rejected_token_scores": [0.1, 0.2, 0.3, 0.4, 0.5]}]
    ctx, _ = _context(rows)
    with pytest.raises(ValueError, match=r"no chosen token in dataset row\(s\) \[7\].*shorter than 1/0.3 tokens"):
        SePOSelections(0.3, 0.3, min_count=0)(ctx)
    assert SePOSelections(0.3, 0.3)(ctx)["selections"][0].sum() == 1          # min_count=1 keeps one token
    bad = dict(rows[0], chosen_token_scores=[0.1, 0.2, 0.3])                   # scores not aligned with the tokens
    with pytest.raises(ValueError, match=r"row 7 has 3 values in chosen_token_scores but 2 completion tokens"):
        _context([bad])
    other = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB + 5, n_positions=32))
    with pytest.raises(ValueError, match=r"oracle's vocabulary \(69 tokens\) differs from the reference's \(64\)"):
        check_same_vocabulary(other, _gpt2())
