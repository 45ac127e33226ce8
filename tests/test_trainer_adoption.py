"""The trainer as a TRL user meets it, and under bad input: several processes (the README's `accelerate launch` and
`torchrun` commands), checkpoints that `from_pretrained` loads and that are verified on resume, bit-exact resume
with dropout, config changes refused unless allowed, TRL argument names, hyper-parameter and model-path errors, a
full disk, failed runs that leave nothing behind, typed and documented config fields, TensorBoard and TRL metric
names, transformers' schedules, and the README's training snippets run verbatim.

Everything runs on tiny GPT-2 models (`_train_script.py`, or a tiny model folder with a trained tokenizer)."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _train_script as helper  # noqa: E402

from tokenpo.training import TrainConfig, train  # noqa: E402
from tokenpo.training.checkpoint import EpochSampler, list_checkpoints, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SECTION = "## Train any method on your own TRL-format dataset"


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]), **extra}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name, value in sa.items():
        assert torch.equal(value, sb[name]), name


# ------------------------------------------------------------------------------------------- README snippets
def readme_blocks(language: str) -> list[str]:
    """The fenced blocks of `language` in the README's training section, in order."""
    text = README.read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end > 0 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    """A tiny 🤗 model folder (trained tokenizer + 2-layer GPT-2) and a TRL-format pairs file of 32 text rows."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tokenpo.models import train_tokenizer

    root = tmp_path_factory.mktemp("hub")
    adjectives = ("old", "new", "long", "short", "odd", "first", "last", "other")
    things = ("film", "book", "show", "play")
    texts = [f"review: the {a} {t} was {w}" for a in adjectives for t in things for w in ("great", "awful")]
    model_dir = root / "tiny-model"
    tokenizer = train_tokenizer(texts * 3, vocab_size=300, out_dir=model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(model_dir)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"review: the {a} {t} was", "chosen": " great",
                                         "rejected": " awful"}) + "\n" for a in adjectives for t in things))
    return {"model": model_dir, "pairs": pairs}


def _substitute(code: str, hub) -> str:
    assert '"path/or/hub-id"' in code or "path/or/hub-id" not in code
    return code.replace('"path/or/hub-id"', repr(str(hub["model"]))).replace('"pairs.jsonl"', repr(str(hub["pairs"])))


def test_readme_training_loading_and_resume_snippets_run_verbatim(tiny_hub, tmp_path, monkeypatch):
    """The section's python blocks, in order, in one namespace (only the model path and the data file replaced)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    blocks = readme_blocks("python")
    assert len(blocks) == 3, "training, loading, resume"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    with pytest.warns(UserWarning, match="already finished"):
        for code in blocks:
            exec(compile(_substitute(code, tiny_hub), "README.md", "exec"), namespace)
    run = tmp_path / "runs" / "sparsepo"
    first_epoch = [r for r in read_metrics(run) if r["epoch"] <= 1]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 2 * len(first_epoch) + 1))  # two epochs
    config = json.loads((run / "config.json").read_text())
    assert config["config"]["epochs"] == 2 and config["changes"][0]["fields"] == {"epochs": [1, 2]}
    checkpoint = list_checkpoints(run)[-1]
    assert checkpoint.name == f"checkpoint-{2 * len(first_epoch)}"
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    _assert_same_weights(loaded, namespace["result"].policy)
    assert AutoTokenizer.from_pretrained(checkpoint).get_vocab() == namespace["tok"].get_vocab()
    assert list((run / "tensorboard").rglob("events.out.tfevents.*"))
    assert namespace["masks"].mode == "common"


def _readme_command(name: str) -> list[str]:
    (commands,) = readme_blocks("bash")
    (line,) = [line for line in commands.splitlines() if line.startswith(name + " ")]
    words = line.split()
    assert words[-1] == "train_script.py" and "2" in words
    launcher = {"accelerate": [str(Path(sys.executable).parent / "accelerate")],
                "torchrun": [sys.executable, "-m", "torch.distributed.run"]}[name]
    return launcher + words[1:]


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_readme_launch_commands_train_with_two_cpu_processes(tiny_hub, tmp_path, launcher):
    """No `cpu=True` in the script: without a GPU the trainer picks the CPU (gloo) itself. Before, each process
    trained alone into the same folder and rank 0 crashed on the other's temporary checkpoint."""
    (tmp_path / "train_script.py").write_text(_substitute(readme_blocks("python")[0], tiny_hub))
    proc = subprocess.run(_readme_command(launcher), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "runs" / "sparsepo"
    assert json.loads((run / "config.json").read_text())["num_processes"] == 2
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]  # 32 pairs / (8 per device x 2 processes): once each, no duplicates
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")


def test_accelerate_launch_that_starts_one_of_several_processes_is_an_error(tiny_hub, tmp_path):
    """Without a GPU and without --multi_gpu, `accelerate launch --num_processes 2` starts one process (its simple
    launcher); before, that process trained alone without a word."""
    (tmp_path / "train_script.py").write_text(_substitute(readme_blocks("python")[0], tiny_hub))
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "train_script.py"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "started only this one" in proc.stderr and "--multi_gpu" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "runs" / "sparsepo").exists()


def test_world_size_that_disagrees_with_the_processes_is_an_error(tmp_path, monkeypatch):
    """A launcher says WORLD_SIZE=2 but the accelerator sees one process (before: each rank trained alone)."""
    import tokenpo.training.trainer as trainer

    monkeypatch.setattr(trainer, "_has_distributed_device", lambda: True, raising=False)  # as if a GPU were there
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2 .* 1 process"):
        train(helper.tiny_model(0), None, helper.make_pairs(8), TrainConfig(
            max_steps=1, batch_size=4, out_dir=str(tmp_path / "run"), progress=False), collator=helper.collate)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_are_on_by_default_and_load_with_from_pretrained(tiny_hub, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenpo.data.preference import load_preference_dataset, tokenize_pairs
    from tokenpo.models import load_model, load_tokenizer
    from tokenpo.providers import SparsePOMasks

    assert (TrainConfig().save_every, TrainConfig().keep_last) == (500, 2)
    tok = load_tokenizer(tiny_hub["model"])
    pairs = tokenize_pairs(load_preference_dataset(str(tiny_hub["pairs"])), tok)
    full = train(load_model(tiny_hub["model"]), None, pairs, TrainConfig(
        method="sparsepo", batch_size=8, learning_rate=1e-3, out_dir=str(tmp_path / "full"), progress=False), tok)
    checkpoint = tmp_path / "full" / "checkpoint-4"  # 32 pairs / 8: one epoch, saved at the end
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == [checkpoint.name] == [full.last_checkpoint.name]
    assert (checkpoint / "config.json").exists()
    _assert_same_weights(AutoModelForCausalLM.from_pretrained(checkpoint), full.policy)
    assert AutoTokenizer.from_pretrained(checkpoint).get_vocab() == tok.get_vocab()
    masks = SparsePOMasks.from_pretrained(checkpoint / "providers" / "0-SparsePOMasks")
    _assert_same_weights(masks, full.providers[0])
    listed = dict(line.split("  ", 1)[::-1] for line in (checkpoint / "checksums.sha256").read_text().splitlines())
    on_disk = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {"checksums.sha256"}
    assert {"optimizer.bin", "scheduler.bin", "trainer_state.json"} <= on_disk

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["c_attn"], "fan_in_fan_out": True}
    adapters = train(load_model(tiny_hub["model"]), None, pairs, TrainConfig(
        method="dpo", lora=lora, batch_size=16, learning_rate=1e-2, out_dir=str(tmp_path / "lora"), progress=False),
        tok)
    peft_model = PeftModel.from_pretrained(load_model(tiny_hub["model"]), tmp_path / "lora" / "checkpoint-2")
    _assert_same_weights(peft_model, adapters.policy)


def _damage_newest_and_resume(tmp_path, damage) -> tuple:
    settings = dict(max_steps=4, save_every=2, method="sparsepo", disable_dropout=False)
    reference = helper.run(tmp_path / "reference", **settings)
    helper.run(tmp_path / "run", **settings)
    damage(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    with pytest.warns(UserWarning) as warned:
        resumed = helper.run(tmp_path / "run", resume=True, **settings)
    return reference, resumed, " ".join(str(w.message) for w in warned)


def test_truncated_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    def truncate(path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    reference, resumed, warned = _damage_newest_and_resume(tmp_path, truncate)
    assert "checkpoint-4" in warned and "checkpoint-2" in warned and "model.safetensors" in warned
    assert resumed.history == reference.history
    _assert_same_weights(resumed.policy, reference.policy)
    assert (tmp_path / "run" / "checkpoint-4.damaged").is_dir()
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-2", "checkpoint-4"]


def test_flipped_bytes_in_a_weight_file_are_detected(tmp_path):
    """Before, the run resumed silently from the damaged weights (a garbage loss)."""
    def flip(path):
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
        path.write_bytes(bytes(data))

    reference, resumed, warned = _damage_newest_and_resume(tmp_path, flip)
    assert "checkpoint-4" in warned and "checksum" in warned
    assert resumed.history == reference.history


def test_resume_of_a_finished_run_without_checkpoints_refuses_and_changes_nothing(tmp_path):
    """Before, resume=True found no checkpoint and retrained from step 0 over the finished run."""
    helper.run(tmp_path, max_steps=3, save_every=None, save_final=True)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"no checkpoint.*3 steps"):
        helper.run(tmp_path, max_steps=3, save_every=None, save_final=True, resume=True)
    assert _files(tmp_path) == before


def test_checkpoint_files_and_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst, **kw):
        renamed.append((str(src), str(dst), len(synced)))
        real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    helper.run(tmp_path, max_steps=2, save_every=2)
    (src, dst, n_synced) = next(r for r in renamed if r[1].endswith("checkpoint-2"))
    before = set(synced[:n_synced])
    files = {str(p).replace(dst, src) for p in Path(dst).rglob("*")}
    assert files and files <= before  # every file and sub-folder
    assert src in before               # the folder itself
    assert str(tmp_path) in synced[n_synced:]  # then the run folder, so that the rename is durable


# ------------------------------------------------------------------------------------------- resume
class _Stop(Exception):
    pass


class _StopAfter:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, metrics, policy, providers):
        if step == self.step:
            raise _Stop(step)


@pytest.mark.parametrize("stop_after", [3, 5])  # resume from checkpoint-2 (mid-epoch) or checkpoint-4 (epoch end)
def test_resume_is_bit_exact_with_dropout(tmp_path, stop_after):
    """Before, the resumed run drew the data iterator's seed after the random states were restored, so every
    dropout mask after a mid-epoch resume differed."""
    settings = dict(max_steps=6, save_every=2, method="sparsepo", disable_dropout=False)
    reference = helper.run(tmp_path / "reference", **settings)
    with pytest.raises(_Stop):
        helper.run(tmp_path / "run", callbacks=[_StopAfter(stop_after)], **settings)
    resumed = helper.run(tmp_path / "run", resume=True, **settings)
    assert resumed.history == reference.history
    assert read_metrics(tmp_path / "run") == reference.history
    _assert_same_weights(resumed.policy, reference.policy)
    _assert_same_weights(resumed.providers[0], reference.providers[0])


def test_config_change_on_resume_is_refused_with_the_fields_named(tmp_path):
    """Before, a changed batch size or seed only warned, and the run mixed old and new settings."""
    helper.run(tmp_path, max_steps=4, save_every=2)
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"batch_size: 4 -> 2.*seed: 0 -> 1.*allow_config_changes"):
        helper.run(tmp_path, max_steps=4, save_every=2, batch_size=2, seed=1, resume=True)
    with pytest.raises(ValueError, match=r"disable_dropout: True -> False"):
        helper.run(tmp_path, max_steps=4, save_every=2, disable_dropout=False, resume=True)
    assert _files(tmp_path) == before


def test_allowed_config_change_applies_and_is_recorded(tmp_path):
    """Before, a changed learning rate was silently ignored (the optimizer and scheduler states kept the old one)."""
    helper.run(tmp_path, max_steps=4, save_every=2, lr=1e-3)
    result = helper.run(tmp_path, max_steps=6, save_every=2, lr=5e-4, resume=True,
                        allow_config_changes=("learning_rate", "max_steps"))
    assert [r["lr"] for r in result.history] == [1e-3] * 4 + [5e-4] * 2
    assert [r["learning_rate"] for r in result.history] == [r["lr"] for r in result.history]
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["config"]["learning_rate"] == 5e-4
    assert record["changes"] == [{"step": 4, "allowed": ["learning_rate", "max_steps"],
                                  "fields": {"learning_rate": [1e-3, 5e-4], "max_steps": [4, 6]}}]
    with pytest.raises(ValueError, match="'learnig_rate' is not a TrainConfig field"):
        helper.run(tmp_path, max_steps=6, save_every=2, lr=5e-4, resume=True, allow_config_changes=("learnig_rate",))


# ------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("name, value, hint", [
    ("beta", 0.1, r'hparams=\{"beta": 0.1\}'),
    ("loss_type", "sigmoid", r"method="),
    ("per_device_train_batch_size", 4, r"batch_size=4"),
    ("gradient_accumulation_steps", 2, r"grad_accum=2"),
    ("num_train_epochs", 3, r"epochs=3"),
    ("lr_scheduler_type", "cosine", r"schedule='cosine'"),
    ("output_dir", "runs/x", r"out_dir='runs/x'"),
    ("save_steps", 100, r"save_every=100"),
    ("save_total_limit", 3, r"keep_last=3"),
    ("adam_beta1", 0.9, r"adam_betas="),
    ("bf16", True, r"mixed_precision='bf16'"),
    ("peft_config", None, r"lora="),
    ("max_length", 512, r"tokenize_pairs"),
    ("learnig_rate", 1e-6, r"did you mean 'learning_rate'"),
])
def test_trl_argument_names_point_to_ours(name, value, hint):
    with pytest.raises(TypeError, match=rf"TrainConfig has no field '{name}'.*{hint}"):
        TrainConfig(**{name: value})
    assert TrainConfig(warmup_ratio=0.1, report_to="none").warmup_ratio == 0.1  # names shared with TRL stay


def test_hyperparameter_errors_surface_when_the_config_is_made():
    """Before, hparams={"beta": "0.1"} passed TrainConfig and failed deep in the first step with a comparison error."""
    with pytest.raises(TypeError, match=r"hparams\['beta'\].*beta must be a finite number > 0, got '0.1'"):
        TrainConfig(method="dpo", hparams={"beta": "0.1"})
    with pytest.raises(ValueError, match=r"hparams\['beta'\].*beta must be a finite number > 0, got -1"):
        TrainConfig(method="sparsepo", hparams={"beta": -1})
    with pytest.raises(TypeError, match=r"hparams\['common'\] must be a bool.*'yes'"):
        TrainConfig(method="sparsepo", hparams={"common": "yes"})
    with pytest.raises(ValueError, match="'gamma'.*does not take"):
        TrainConfig(method="dpo", hparams={"gamma": 1.0})


def test_model_loading_errors_name_the_path(tmp_path):
    """Before: 'Unrecognized model in …', 'Repo id must be in the form …', and ~50 s of retries for a hub id."""
    from tokenpo.models import load_model, load_tokenizer

    empty = tmp_path / "empty-model"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))} has no config.json"):
        load_model(empty)
    with pytest.raises(ValueError, match=rf"{re.escape(str(empty))} has no tokenizer"):
        load_tokenizer(empty)
    missing = tmp_path / "no" / "such" / "folder"
    for load in (load_model, load_tokenizer):
        with pytest.raises(FileNotFoundError, match=rf"{re.escape(str(missing))} does not exist"):
            load(missing)
    with pytest.raises(OSError, match=r"'someone/tokenpo-no-such-model' is not a local folder"):
        load_model("someone/tokenpo-no-such-model")


def test_full_disk_is_reported_with_the_run_folder_and_leaves_nothing(tmp_path):
    """A 160 KiB tmpfs in a private mount namespace: the first checkpoint does not fit. Before: 'enforce fail at
    inline_container.cc' (or a safetensors I/O error) and the folder stayed."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare (a private mount namespace) for a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    code = (f"import _train_script as h; h.run({str(mount / 'run')!r}, max_steps=2, save_every=1)")
    script = (f"mount -t tmpfs -o size=160k tmpfs {mount} && {sys.executable} -c {code!r}; "
              f"echo rc=$?; echo left:; ls -A {mount}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert "rc=1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert f"no space left on the device of run folder {mount / 'run'}" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.split("left:")[1].strip() == ""  # the run folder it created is gone


def test_a_run_that_fails_before_its_first_checkpoint_removes_what_it_wrote(tmp_path):
    policy = helper.tiny_model(0, tie=False)
    with torch.no_grad():
        policy.transformer.wte.weight[helper.POISON] = float("nan")
    order = list(EpochSampler(16, seed=0))
    pairs = helper.make_pairs(16, poison_row=order[5])  # a row of the second batch
    for out_dir in (tmp_path / "new", tmp_path):        # a folder it made, and one that was there
        config = TrainConfig(method="dpo", batch_size=4, max_steps=4, out_dir=str(out_dir), cpu=True,
                             progress=False, seed=0, report_to="tensorboard")
        with pytest.raises(FloatingPointError, match="at step 2"):
            train(policy, None, pairs, config, collator=helper.collate)
    assert not (tmp_path / "new").exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- config fields
EXISTING_DEFAULTS = dict(
    method="dpo", hparams={}, providers=None, use_reference=None, log_kl=False, learning_rate=1e-6, weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-8, provider_learning_rate=None, provider_weight_decay=0.01,
    provider_freeze_steps=0, provider_warmup_steps=0, schedule="cosine", warmup_steps=0, warmup_ratio=0.0,
    max_steps=None, epochs=1, batch_size=8, grad_accum=1, max_grad_norm=1.0, shuffle=True, drop_last=False,
    chunk_size=None, lora=None, disable_dropout=True, gradient_checkpointing=False, out_dir=None, save_every=500,
    keep_last=2, eval_every=None, seed=42, deterministic=True, mixed_precision="no", cpu=False, progress=True,
    save_final=True)


def test_config_fields_are_typed_and_documented_next_to_their_values():
    config = TrainConfig()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name, default in EXISTING_DEFAULTS.items():
        assert getattr(config, name) == default, name
    for name, f in fields.items():
        assert f.type and f.type != "Any" or name in ("lora",), name
        assert len(f.metadata.get("help", "")) > 20, f"{name} has no help"
        assert f.metadata.get("group"), f"{name} has no group"
    assert {"report_to", "log_logit_metrics"} <= set(fields)
    assert "learning_rate" in (TrainConfig.__doc__ or "") or "help(" in (TrainConfig.__doc__ or "")


def test_report_to_tensorboard_writes_an_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = helper.run(tmp_path, max_steps=3, report_to="tensorboard")
    readers = [EventAccumulator(str(p)).Reload() for p in (tmp_path / "tensorboard").rglob("events.out.tfevents.*")]
    (reader,) = [r for r in readers if "loss" in r.Tags()["scalars"]]
    for tag in ("loss", "learning_rate", "rewards/accuracies", "num_tokens"):
        logged = [(e.step, e.value) for e in reader.Scalars(tag)]
        assert logged == [(r["step"], pytest.approx(r[tag], rel=1e-6)) for r in result.history], tag


def _hand_token_metrics(model, batch):
    """TRL's entropy (completion tokens of both sides), logits/* (mean logit over completion tokens of a side) and
    mean_token_accuracy (chosen completion tokens whose label is the arg-max)."""
    out, tokens = {}, {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            ids, att, comp = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "completion_mask"))
            logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            mask = comp[:, 1:].bool()
            logp = F.log_softmax(logits, -1)
            tokens[side] = ((-(logp.exp() * logp).sum(-1))[mask], logits.mean(-1)[mask],
                            (logits.argmax(-1) == ids[:, 1:])[mask])
    out["entropy"] = float(torch.cat([tokens[s][0] for s in tokens]).mean())
    out["logits/chosen"], out["logits/rejected"] = (float(tokens[s][1].mean()) for s in ("chosen", "rejected"))
    out["mean_token_accuracy"] = float(tokens["chosen"][2].float().mean())
    return out


def test_trl_metric_names_are_logged(tmp_path):
    pairs = helper.make_pairs(16)
    plain = helper.run(tmp_path / "plain", max_steps=2, log_logit_metrics=True, schedule="cosine", warmup_steps=1)
    rows = plain.history
    assert [r["learning_rate"] for r in rows] == [r["lr"] for r in rows] == [0.0, 1e-3]
    batches = [helper.collate([pairs[i] for i in list(EpochSampler(16, seed=0))[k * 4:(k + 1) * 4]]) for k in (0, 1)]
    tokens = [int(b["chosen_attention_mask"].sum() + b["rejected_attention_mask"].sum()) for b in batches]
    assert [r["num_tokens"] for r in rows] == [tokens[0], tokens[0] + tokens[1]]
    model = helper.tiny_model(0).eval()  # step 1 is computed with the initial weights (dropout disabled)
    for key, value in _hand_token_metrics(model, batches[0]).items():
        assert rows[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    chunked = helper.run(tmp_path / "chunked", max_steps=2, log_logit_metrics=True, schedule="cosine",
                         warmup_steps=1, chunk_size=5).history
    for a, b in zip(rows, chunked):
        for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    default = helper.run(tmp_path / "default", max_steps=1).history[0]
    assert "num_tokens" in default and "learning_rate" in default and "entropy" not in default  # opt-in


# ------------------------------------------------------------------------------------------- maintained functions
def test_schedules_are_transformers_schedules_step_by_step(tmp_path):
    from transformers import get_scheduler

    from tokenpo.training.optim import delayed_factor, schedule_factor

    def transformers_lrs(name, warmup, total, lr=1e-3):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return lrs

    for ours, theirs in (("cosine", "cosine"), ("linear", "linear"), ("constant", "constant_with_warmup"),
                         ("polynomial", "polynomial"), ("cosine_with_restarts", "cosine_with_restarts")):
        expected = transformers_lrs(theirs, 2, 7)
        factor = schedule_factor(ours, 7, 2, lr=1e-3)
        assert [1e-3 * factor(s) for s in range(7)] == pytest.approx(expected, rel=1e-12, abs=0), ours
        rows = helper.run(tmp_path / ours, max_steps=7, schedule=ours, warmup_steps=2).history
        assert [r["lr"] for r in rows] == pytest.approx(expected, rel=1e-12, abs=0), ours
    delayed = delayed_factor(schedule_factor("cosine", 7, 2), freeze_steps=2, warmup_steps=2)
    expected = transformers_lrs("cosine", 2, 7)
    assert [1e-3 * delayed(s) for s in range(7)] == pytest.approx(
        [0.0, 0.0, 0.5 * expected[2], expected[3], expected[4], expected[5], expected[6]], rel=1e-12, abs=0)


def test_dropout_is_disabled_in_the_reference_too_as_trl_does(tmp_path):
    reference = helper.tiny_model(0)
    train(helper.tiny_model(0), reference, helper.make_pairs(8), TrainConfig(
        max_steps=1, batch_size=4, out_dir=str(tmp_path), cpu=True, progress=False, save_every=None),
        collator=helper.collate)
    assert all(m.p == 0 for m in reference.modules() if isinstance(m, torch.nn.Dropout))


# ------------------------------------------------------------------------------------------- notebooks
def test_progress_bars_and_tensorboard_are_project_dependencies():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[=<>!~\[ ]", d, maxsplit=1)[0].lower() for d in dependencies}
    assert {"ipywidgets", "tensorboard"} <= names
    import ipywidgets  # noqa: F401  (tqdm.auto's notebook bars need it)
    import tensorboard  # noqa: F401
    assert "run-names" in (ROOT / "tests" / "nbval_sanitize.cfg").read_text()


def test_readme_section_shows_no_stale_options():
    text = "\n".join(readme_blocks("python"))
    assert textwrap.dedent(text).count("TrainConfig(") == 2
    for name in re.findall(r"(\w+)=", " ".join(re.findall(r"TrainConfig\((.*?)\)", text, flags=re.S))):
        assert name in {f.name for f in dataclasses.fields(TrainConfig)}, name
