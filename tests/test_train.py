"""The preference trainer: multi-process equivalence, kill/resume, learning, hand-checked metrics, LoRA + SparsePO
masks, NaN handling, parameter groups, the chunked path, extra inputs, and SFT.

Runs use tiny GPT-2 models built from a config (see `_train_script.py`); subprocess tests are real processes
(`torchrun`, SIGKILL)."""
from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _train_script as helper  # noqa: E402

from tokenpo.providers import Columns, MaPOMasks, Needs, Provider, SePOSelections, SparsePOMasks  # noqa: E402
from tokenpo.training import NonFiniteLossError, TrainConfig, evaluate_pairs, train  # noqa: E402
from tokenpo.training.checkpoint import EpochSampler, list_checkpoints, read_metrics  # noqa: E402
from tokenpo.training.optim import parameter_groups  # noqa: E402
from tokenpo.training.step import TrainablePolicy  # noqa: E402

SCRIPT = Path(__file__).parent / "_train_script.py"
METRIC_KEYS_SKIPPED = ("step", "epoch", "lr", "lr_providers")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent), os.environ.get("PYTHONPATH", "")])}


def _assert_rows_close(rows_a, rows_b, tol=1e-5, skip_prefixes=()):
    assert len(rows_a) == len(rows_b) > 0
    for a, b in zip(rows_a, rows_b):
        assert a["step"] == b["step"]
        assert set(a) == set(b)
        for key in a:
            if key not in METRIC_KEYS_SKIPPED and not key.startswith(tuple(skip_prefixes)):
                assert a[key] == pytest.approx(b[key], rel=tol, abs=tol), (a["step"], key)


# ------------------------------------------------------------------------------------------- distributed
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    """torchrun, 2 processes x 1 pair x 2 accumulation steps == 1 process x 4 pairs == 1 process x 2 x 2."""
    common = dict(method="sparsepo", max_steps=4, hparams={"beta": 0.5})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--out-dir", str(tmp_path / "ddp"), "--batch-size", "1", "--grad-accum", "2", "--max-steps", "4",
           "--method", "sparsepo", "--hparams", json.dumps(common["hparams"])]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = read_metrics(tmp_path / "ddp")
    config = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert config["num_processes"] == 2

    single = helper.run(tmp_path / "single", batch_size=4, **common).history
    accumulated = helper.run(tmp_path / "accum", batch_size=2, grad_accum=2, **common).history
    # mask/* metrics pool tokens within a micro-batch (losses._mask_metrics), so they depend on how the global batch
    # is split; everything else is a mean over pairs. The loss and rewards depend on the masks, so masks still match.
    _assert_rows_close(ddp, single, skip_prefixes=("mask/",))
    _assert_rows_close(accumulated, single, skip_prefixes=("mask/",))
    assert single[-1]["loss"] != single[0]["loss"]  # it trained


# ------------------------------------------------------------------------------------------- resume
def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    run_dir = tmp_path / "killed"
    # 16 pairs, 2 per micro-batch, 2 micro-batches per step: 4 steps an epoch; checkpoint-5 is mid-epoch 1.
    cmd = [sys.executable, str(SCRIPT), "--out-dir", str(run_dir), "--max-steps", "8", "--save-every", "5",
           "--batch-size", "2", "--grad-accum", "2", "--sleep-after-step", "6", "--method", "sparsepo"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (run_dir / "sleeping").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run never reached step 6"
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-5"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]  # step 6 was logged after it
    state = json.loads((run_dir / "checkpoint-5" / "trainer_state.json").read_text())
    assert (state["epoch"], state["micro_batches"]) == (1, 2)

    settings = dict(method="sparsepo", max_steps=8, save_every=5, batch_size=2, grad_accum=2)
    resumed = helper.run(run_dir, resume=True, **settings)
    first = helper.run(tmp_path / "a", **settings)
    second = helper.run(tmp_path / "b", **settings)

    assert first.history == second.history  # same seed, same numbers
    assert resumed.history == first.history
    assert read_metrics(run_dir) == first.history
    assert [p.name for p in list_checkpoints(run_dir)] == ["checkpoint-5", "checkpoint-8"]  # and the final step
    for name, value in first.policy.state_dict().items():
        assert torch.equal(value, resumed.policy.state_dict()[name]), name
    for name, value in first.providers[0].state_dict().items():
        assert torch.equal(value, resumed.providers[0].state_dict()[name]), name


def test_checkpoint_rotation_and_a_fresh_run_refuses_a_folder_that_holds_a_run(tmp_path):
    helper.run(tmp_path, max_steps=4, save_every=1, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    with pytest.raises(ValueError, match="already holds a run"):
        helper.run(tmp_path, max_steps=1)


# ------------------------------------------------------------------------------------------- learning
class _Snapshot:
    """Keeps the policy weights as they were after step `step` (the weights step+1 is computed with)."""

    def __init__(self, step):
        self.step, self.state = step, None

    def on_step_end(self, step, metrics, policy, providers):
        if step == self.step:
            self.state = copy.deepcopy(policy.state_dict())


def _sequence_stats(model, ids, attention, completion):
    """Per-row Σ log π(y_t) and the full per-position log-probs, computed directly from the model's logits."""
    logp = F.log_softmax(model(input_ids=ids, attention_mask=attention).logits[:, :-1].float(), -1)
    mask = completion[:, 1:].float()
    token = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token * mask).sum(-1), logp, mask


def test_dpo_learns_and_logged_metrics_match_a_hand_computation(tmp_path):
    n_pairs, batch_size, beta, checked_step = 16, 4, 0.1, 5
    pairs = helper.make_pairs(n_pairs, seed=0)
    snapshot = _Snapshot(checked_step - 1)
    result = helper.run(tmp_path, n_pairs=n_pairs, batch_size=batch_size, max_steps=24, method="dpo",
                        hparams={"beta": beta}, eval_dataset=pairs, eval_every=12, callbacks=[snapshot], log_kl=True)
    before, after = result.eval_history[0], result.eval_history[-1]
    assert [r["step"] for r in result.eval_history] == [0, 12, 24]
    assert before["rewards/accuracies"] == 0.0 and before["rewards/margins"] == 0.0  # policy == reference
    assert after["rewards/accuracies"] >= 0.9
    assert after["rewards/margins"] > 0.5
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert evaluate_pairs(result.policy, helper.tiny_model(0), pairs,
                          TrainConfig(method="dpo", hparams={"beta": beta}, log_kl=True), collator=helper.collate) == \
        pytest.approx({k: v for k, v in after.items() if k != "step"}, rel=1e-5, abs=1e-6)

    # Step 5 is the first batch of epoch 1: its rows follow from (seed, epoch) alone.
    sampler = EpochSampler(n_pairs, seed=0)
    sampler.set_epoch(1)
    rows = list(sampler)[:batch_size]
    batch = helper.collate([pairs[i] for i in rows])
    policy, reference = helper.tiny_model(0), helper.tiny_model(0)
    policy.load_state_dict(snapshot.state)
    policy.eval(), reference.eval()  # the trainer disables dropout
    with torch.no_grad():
        sides = {}
        for side in ("chosen", "rejected"):
            ids, att, comp = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "completion_mask"))
            logps, logp_all, mask = _sequence_stats(policy, ids, att, comp)
            ref_logps, ref_all, _ = _sequence_stats(reference, ids, att, comp)
            kl = ((ref_all.exp() * (ref_all - logp_all)).sum(-1) * mask).sum(-1)
            sides[side] = (logps, beta * (logps - ref_logps), kl)
    reward_w, reward_l = sides["chosen"][1], sides["rejected"][1]
    expected = {
        "loss": -F.logsigmoid(reward_w - reward_l).mean(),
        "rewards/chosen": reward_w.mean(), "rewards/rejected": reward_l.mean(),
        "rewards/margins": (reward_w - reward_l).mean(),
        "rewards/accuracies": (reward_w > reward_l).float().mean(),
        "logps/chosen": sides["chosen"][0].mean(), "logps/rejected": sides["rejected"][0].mean(),
        "kl/chosen": sides["chosen"][2].mean(), "kl/rejected": sides["rejected"][2].mean(),
    }
    logged = result.history[checked_step - 1]
    assert logged["step"] == checked_step and logged["epoch"] == 1.25
    for key, value in expected.items():
        assert logged[key] == pytest.approx(float(value), rel=1e-5, abs=1e-6), key


def test_chunked_path_gives_the_plain_path_numbers(tmp_path):
    plain = helper.run(tmp_path / "plain", method="tdpo2", max_steps=4).history
    chunked = helper.run(tmp_path / "chunked", method="tdpo2", max_steps=4, chunk_size=7).history
    _assert_rows_close(plain, chunked)


def test_bf16_run_in_the_same_process_as_fp32_runs(tmp_path):
    """Accelerate's process-wide state would refuse a second precision; the trainer resets it between runs."""
    fp32 = helper.run(tmp_path / "a", method="sparsepo", max_steps=2).history
    bf16 = helper.run(tmp_path / "b", method="sparsepo", max_steps=2, mixed_precision="bf16", chunk_size=8).history
    again = helper.run(tmp_path / "c", method="sparsepo", max_steps=2).history
    assert again == fp32
    assert all(math.isfinite(r["loss"]) for r in bf16) and bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], abs=0.02)


# ------------------------------------------------------------------------------------------- masks, LoRA
class _InitialState:
    def on_train_begin(self, policy, providers):
        self.policy = copy.deepcopy(policy.state_dict())
        self.masks = copy.deepcopy(providers[0].state_dict())


def test_sparsepo_with_lora_trains_masks_and_adapters_but_not_base_weights(tmp_path):
    policy = helper.tiny_model(0)
    base_before = {k: v.clone() for k, v in policy.state_dict().items()}
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    initial = _InitialState()
    config = TrainConfig(method="sparsepo", lora=lora, learning_rate=1e-2, batch_size=4, max_steps=6,
                         out_dir=str(tmp_path), cpu=True, progress=False, schedule="constant", seed=0,
                         providers=[SparsePOMasks(mixer_init=0.5)], log_kl=True)
    result = train(policy, None, helper.make_pairs(16), config, collator=helper.collate, callbacks=[initial])

    assert hasattr(result.policy, "peft_config")  # reference = the same model with adapters disabled
    trained = result.policy.state_dict()
    for name, value in base_before.items():  # PEFT names: base_model.model.<name>; LoRA'd layers: .base_layer.
        peft_name = "base_model.model." + name.replace("c_attn.", "c_attn.base_layer.")
        assert torch.equal(trained[peft_name], value), name
    lora_b = [k for k in trained if "lora_B" in k]
    assert lora_b and all(not torch.equal(trained[k], initial.policy[k]) for k in lora_b)
    masks = result.providers[0]
    changed = [k for k, v in masks.state_dict().items() if not torch.equal(v, initial.masks[k])]
    assert sorted(changed) == sorted(initial.masks)  # every mask parameter moved
    assert result.history[-1]["mask/sparsity_reward_chosen"] >= 0.0
    assert result.history[-1]["kl/chosen"] > 0.0  # the adapters moved the policy away from the reference

    assert (result.final_dir / "adapter_config.json").exists()
    saved = SparsePOMasks.from_pretrained(result.final_dir / "providers" / "0-SparsePOMasks")   # mode, sizes and all
    assert saved.mode == masks.mode and saved.mask_kwargs["mixer_init"] == 0.5
    assert all(torch.equal(saved.state_dict()[k], v) for k, v in masks.state_dict().items())


def test_provider_parameters_get_their_own_learning_rate_weight_decay_and_freeze(tmp_path):
    policy = helper.tiny_model(0)
    masks = SparsePOMasks.from_model_config(policy.config, mode="independent")
    module = TrainablePolicy(policy, [masks])
    groups = {g["name"]: g for g in parameter_groups(module, lr=1e-3, weight_decay=0.1, provider_lr=5e-3,
                                                     provider_weight_decay=0.01)}
    assert set(groups) == {"decay", "no_decay", "providers"}
    assert (groups["decay"]["lr"], groups["decay"]["weight_decay"]) == (1e-3, 0.1)
    assert (groups["no_decay"]["lr"], groups["no_decay"]["weight_decay"]) == (1e-3, 0.0)
    assert (groups["providers"]["lr"], groups["providers"]["weight_decay"]) == (5e-3, 0.01)
    assert {id(p) for p in groups["providers"]["params"]} == {id(p) for p in masks.parameters()}
    assert all(p.dim() >= 2 for p in groups["decay"]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(module.parameters()))

    seen = {}

    class MaskWatcher(_InitialState):
        def on_step_end(self, step, metrics, policy, providers):
            seen[step] = (metrics["lr"], metrics["lr_providers"], copy.deepcopy(providers[0].state_dict()))

    watcher = MaskWatcher()
    helper.run(tmp_path, method="sparsepo", max_steps=4, lr=1e-3, provider_learning_rate=5e-3,
               provider_freeze_steps=2, hparams={"common": False}, callbacks=[watcher])
    assert [seen[s][:2] for s in (1, 2, 3, 4)] == [(1e-3, 0.0), (1e-3, 0.0), (1e-3, 5e-3), (1e-3, 5e-3)]
    frozen, thawed = seen[2][2], seen[4][2]
    assert all(torch.equal(frozen[k], v) for k, v in watcher.masks.items())  # lr 0: no update, no decay
    assert any(not torch.equal(thawed[k], v) for k, v in watcher.masks.items())
    assert any(k.startswith("rw_mask") for k in thawed) and any(k.startswith("kl_mask") for k in thawed)


# ------------------------------------------------------------------------------------------- failures
def test_nan_loss_stops_with_the_step_and_the_dataset_rows(tmp_path):
    n_pairs, batch_size, step = 16, 4, 2
    order = list(EpochSampler(n_pairs, seed=0))
    poison_row = order[(step - 1) * batch_size + 1]  # a row of the second batch
    policy = helper.tiny_model(0, tie=False)
    with torch.no_grad():
        policy.transformer.wte.weight[helper.POISON] = float("nan")  # only the poisoned row contains this token
    # checkpoint-1 exists when step 2 fails, so the run folder stays (a run that fails before its first checkpoint
    # removes what it wrote: tests/test_trainer_adoption.py)
    config = TrainConfig(method="dpo", batch_size=batch_size, max_steps=4, out_dir=str(tmp_path), cpu=True,
                         progress=False, seed=0, learning_rate=1e-3, save_every=1)
    with pytest.raises(NonFiniteLossError, match=rf"at step {step}: dataset rows \[{poison_row}\]") as info:
        train(policy, None, helper.make_pairs(n_pairs, poison_row=poison_row), config, collator=helper.collate)
    assert info.value.step == step and info.value.rows == [poison_row]
    assert sorted(info.value.batch_rows) == sorted(order[(step - 1) * batch_size: step * batch_size])
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]  # step 1 was logged; nothing of step 2


def test_configuration_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="'gamma'.*does not take"):
        helper.run(tmp_path / "a", method="dpo", hparams={"gamma": 1.0}, max_steps=1)
    with pytest.raises(ValueError, match="no column 'chosen_weights'.*chosen_weights/rejected_weights"):
        helper.run(tmp_path / "b", method="tis_dpo", max_steps=1)
    with pytest.raises(ValueError, match="extra inputs \\['features', 'ref_features'\\].*FPOFeatures"):
        helper.run(tmp_path / "d", method="fpo", max_steps=1)
    with pytest.raises(ValueError, match="takes no input \\['masks'\\]"):
        helper.run(tmp_path / "e", method="dpo", providers=[MaPOMasks()], max_steps=1)
    with pytest.raises(ValueError, match="unknown objective 'dpoo'"):
        helper.run(tmp_path / "c", method="dpoo", max_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


# ------------------------------------------------------------------------------------------- extra inputs
class UnitWeights(Provider):
    """A provider written in a test, as a user would: TIS-DPO weights 1 on every completion token. It asks for both
    models' per-layer states only to check that the trainer hands them over."""

    provides = ("weights",)

    def __init__(self):
        super().__init__()
        self.seen = []

    def needs(self):
        return Needs(policy_layers=True, reference_layers=True)

    def forward(self, ctx):
        self.seen.append((ctx.step, ctx.policy_layers is not None, ctx.reference_layers is not None))
        return {"weights": (ctx.chosen.mask, ctx.rejected.mask)}


def test_extra_inputs_from_a_user_provider_and_from_dataset_columns(tmp_path):
    """Plumbing checks through known equivalences: TIS-DPO with unit weights (a provider, or dataset columns) and
    MaPO with uniform masks are TDPO-1; SePO selecting every completion token is SimPO with β=1, γ=0."""
    tdpo1 = helper.run(tmp_path / "tdpo1", method="tdpo1", max_steps=3).history
    unit = UnitWeights()
    tis = helper.run(tmp_path / "tis", method="tis_dpo", max_steps=3, providers=[unit]).history
    pairs = helper.make_pairs(16)
    for row in pairs:
        for side in ("chosen", "rejected"):
            row[f"{side}_weights"] = [1.0] * len(row[f"{side}_ids"])
    common = dict(learning_rate=1e-3, batch_size=4, max_steps=3, cpu=True, progress=False, seed=0,
                  schedule="constant")
    tis_columns = train(helper.tiny_model(0), None, pairs, TrainConfig(                  # default provider: Columns
        method="tis_dpo", out_dir=str(tmp_path / "tis_columns"), **common), collator=helper.collate).history
    mapo = helper.run(tmp_path / "mapo", method="mapo", max_steps=3, providers=[MaPOMasks(hook="uniform")]).history
    same = ("step", "loss", "grad_norm", "logps/chosen", "logps/rejected", "kl/chosen", "kl/rejected")
    for rows in (tis, tis_columns, mapo):  # (each logs its official code's rewards, so those differ)
        _assert_rows_close([{k: r[k] for k in same} for r in rows], [{k: r[k] for k in same} for r in tdpo1])
    assert unit.seen == [(1, True, True), (2, True, True), (3, True, True)]

    for row in pairs:
        row["chosen_selections"] = [1.0] * len(row["chosen_ids"])
        row["rejected_selections"] = [1.0] * len(row["rejected_ids"])
    sepo = train(helper.tiny_model(0), None, pairs, TrainConfig(method="sepo", out_dir=str(tmp_path / "sepo"),
                                                                 providers=[Columns("selections")], **common),
                 collator=helper.collate).history
    simpo = train(helper.tiny_model(0), None, helper.make_pairs(16),
                  TrainConfig(method="simpo", hparams={"beta": 1.0, "gamma": 0.0}, out_dir=str(tmp_path / "simpo"),
                              **common), collator=helper.collate).history
    keep = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "grad_norm")
    _assert_rows_close([{k: r[k] for k in ("step", *keep)} for r in sepo],
                       [{k: r[k] for k in ("step", *keep)} for r in simpo])


def test_sepo_selects_from_score_columns_and_random_tokens(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pairs = helper.make_pairs(16)
    for row in pairs:  # oracle scores, one per completion token
        for side in ("chosen", "rejected"):
            row[f"{side}_token_scores"] = torch.randn(len(row[f"{side}_ids"]), generator=gen).tolist()
    common = dict(learning_rate=1e-3, batch_size=4, max_steps=3, cpu=True, progress=False, seed=0,
                  schedule="constant")

    def run(name, method, providers=None, data=pairs, **extra):
        config = TrainConfig(method=method, out_dir=str(tmp_path / name), providers=providers, **common, **extra)
        return train(helper.tiny_model(0), None, data, config, collator=helper.collate).history

    everything = run("all", "sepo", [SePOSelections(1.0, 1.0)])
    simpo = run("simpo", "simpo", hparams={"beta": 1.0, "gamma": 0.0}, data=helper.make_pairs(16))
    keep = ("step", "loss", "rewards/margins", "grad_norm")
    _assert_rows_close([{k: r[k] for k in keep} for r in everything], [{k: r[k] for k in keep} for r in simpo])

    top = run("top", "sepo")                                     # the registry default: SePOSelections(0.3, 0.3)
    rand = run("rand", "sepo", [SePOSelections(0.3, 0.3, column=None, seed=1)])
    for rows in (top, rand):
        assert "kl/chosen" not in rows[0]  # reference-free: no reference model ran
        assert 0.45 < rows[0]["mask/sparsity_reward_chosen"] < 0.85  # ~30% of tokens selected (at least one)
    assert top[0]["loss"] != rand[0]["loss"]


def test_fpo_with_offline_cache_matches_the_live_reference(tmp_path):
    from tokenpo.providers import FPOFeatures, FPOReferenceCache
    from tokenpo.providers.sae import SAEConfig, SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, width=48, layer=0, site="block_out"))
    with torch.no_grad():
        sae.threshold.fill_(0.0)  # random weights: let most features fire
    pairs = helper.make_pairs(16)
    reference = helper.tiny_model(0).eval()
    batches = [helper.collate(pairs[i:i + 4]) for i in range(0, 16, 4)]
    cache = FPOReferenceCache.build(reference, sae, batches, k=48, layer=0, pooling="paper", progress=False)
    common = dict(learning_rate=1e-3, batch_size=4, max_steps=3, cpu=True, progress=False, seed=0,
                  schedule="constant", hparams={"k": 8})
    live = train(helper.tiny_model(0), None, pairs, TrainConfig(
        method="fpo", out_dir=str(tmp_path / "live"), providers=[FPOFeatures(sae, layer=0, pooling="paper")],
        log_kl=True, **common), collator=helper.collate).history
    cached = train(helper.tiny_model(0), None, pairs, TrainConfig(
        method="fpo", out_dir=str(tmp_path / "cached"),
        providers=[FPOFeatures(sae, layer=0, pooling="paper", cache=cache)], log_kl=True, **common),
        collator=helper.collate).history
    assert "kl/chosen" in live[0] and "kl/chosen" not in cached[0]  # the cached run has no reference model
    keep = ("step", "loss", "rewards/margins", "features/mse_chosen", "features/mse_rejected", "grad_norm")
    _assert_rows_close([{k: r[k] for k in keep} for r in cached], [{k: r[k] for k in keep} for r in live])
    assert live[-1]["features/mse_rejected"] > 0.0
    with pytest.raises(ValueError, match="pooling 'paper' \\(cache\\) vs 'official'"):
        FPOFeatures(sae, layer=0, pooling="official", cache=cache)


# ------------------------------------------------------------------------------------------- real tokenizer, SFT
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from tokenpo.models import train_tokenizer

    texts = [f"the {a} film was {b} and the {c} was {b}" for a in ("old", "new", "long", "short")
             for b in ("great", "awful", "fine", "dull") for c in ("plot", "cast", "music")]
    return train_tokenizer(texts * 3, vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def _text_model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                      pad_token_id=tokenizer.pad_token_id))


def test_sft_lowers_the_heldout_loss_and_text_pairs_train_end_to_end(tokenizer, tmp_path):
    from tokenpo.data.preference import tokenize_pairs
    from tokenpo.training.sft import SFTConfig, heldout_loss, sft

    texts = [f"review: the {a} film was great, the {c} was great" for a in ("old", "new", "long", "short", "odd")
             for c in ("plot", "cast", "music", "ending")]
    model = _text_model(tokenizer)
    history = []
    config = SFTConfig(learning_rate=3e-3, batch_size=4, epochs=6, heldout_fraction=0.2, eval_every=10,
                       progress=False, seed=0)
    returned = sft(model, tokenizer, texts, config, history=history)
    assert returned is model and not model.training
    heldout = [r for r in history if "heldout_loss" in r]
    steps = [r for r in history if "loss" in r]
    assert len(steps) == 6 * 4  # 16 training texts / batch 4, 6 epochs
    assert heldout[0]["step"] == 0 and heldout[-1]["step"] == 24 and len(heldout) == 4
    assert heldout[-1]["heldout_loss"] < 0.7 * heldout[0]["heldout_loss"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    held_texts = [texts[i] for i in range(len(texts))]
    assert heldout_loss(model, tokenizer, held_texts) < heldout[0]["heldout_loss"]

    rows = [{"prompt": f"review: the {a} film was", "chosen": " great", "rejected": " awful"}
            for a in ("old", "new", "long", "short", "odd", "first", "last", "other")]
    pairs = tokenize_pairs(rows, tokenizer, max_length=32)
    result = train(model, None, pairs, TrainConfig(method="dpo", learning_rate=1e-2, batch_size=4, max_steps=4,
                                                   out_dir=str(tmp_path / "dpo"), cpu=True, progress=False),
                   tokenizer=tokenizer)  # default collator: PreferenceCollator(tokenizer.pad_token_id)
    assert result.history[-1]["rewards/margins"] > 0
    assert (result.final_dir / "tokenizer.json").exists() and (result.final_dir / "config.json").exists()


def test_confpo_trains_through_the_registry_alone(tmp_path):
    """ConfPO was added as an objective, a registry entry and a provider, with no trainer change: it trains, uses
    no reference model, and selects a strict subset of the tokens."""
    rows = helper.run(tmp_path, method="confpo", max_steps=4).history
    assert all(math.isfinite(r["loss"]) for r in rows) and "kl/chosen" not in rows[0]
    assert 0.0 < rows[0]["mask/sparsity_reward_chosen"] < 1.0
    assert rows[-1]["rewards/margins"] > rows[0]["rewards/margins"]


@pytest.mark.parametrize("hparams", [{"common": False, "mask_on_reward": False}, {"common": False, "mask_on_kl": False},
                                     {"common": True, "mask_on_kl": False}])
def test_sparsepo_with_one_masked_term_trains_one_network(tmp_path, hparams):
    result = helper.run(tmp_path, method="sparsepo", max_steps=2, hparams=hparams)
    masks = result.providers[0]
    assert masks.mode == "common"                       # a second network would get no gradient
    kind = "reward" if hparams.get("mask_on_reward", True) else "kl"
    other = "kl" if kind == "reward" else "reward"
    assert f"mask/mean_{kind}_chosen" in result.history[-1] and f"mask/mean_{other}_chosen" not in result.history[-1]


def test_sepo_paper_normalisation_must_use_the_selected_share(tmp_path):
    with pytest.raises(ValueError, match="set both to the same k"):
        helper.run(tmp_path, method="sepo", max_steps=1, hparams={"normalization": "length", "ratios": (0.5, 0.5)},
                   providers=[SePOSelections(0.3, 0.3, column=None)])
