"""Per-token activation statistics of a stock 🤗 causal LM, read with forward hooks (no vendored modeling files).

Two uses: MaPO (SparsePO paper, `src/trainers/mapo_trainer.py`) builds its token masks from the *reference* model's
internal activations (`record_statistics`), and FPO's sparse autoencoders read the residual stream at one site
(`capture_sites`). Both only register hooks: they run inside the trainer's single reference / policy forward.

MaPO's statistics: The official code gets them from patched copies of the HF modeling files that expose OpenAI-TDB-style
hook points. Here the same tensors are read from the stock modules with `register_forward_hook` /
`register_forward_pre_hook`. Every hook reduces its tensor at once to one number per token (the mean over the
hidden dimension, or the mean sigmoid), so nothing of size [B, L, d] is kept; all handles are removed in a
`finally`, even when the forward raises.

Hook points, per decoder layer, and the stock module each one is read from
(`q/k/v` means are over all heads; "pre" = forward pre-hook input, "out" = forward hook output):

| type   | name (official)            | GPT-2 (`transformer.h[i]`)      | GPT-NeoX (`gpt_neox.layers[i]`)           | Llama family (`model.layers[i]`)         |
|--------|----------------------------|---------------------------------|-------------------------------------------|------------------------------------------|
| attn   | q, k, v                    | `attn.c_attn` out, split in 3   | `attention.query_key_value` out, per-head split | `self_attn.{q,k,v}_proj` out         |
| attn   | post_rota_emb_q / _k       | — (no rotary)                   | q, k rotated with the stock `apply_rotary_pos_emb` and the `position_embeddings` the layer passes to `attention` | same, `self_attn` |
| attn   | v_out (heads merged)       | `attn.c_proj` pre               | `attention.dense` pre                     | `self_attn.o_proj` pre                   |
| mlp    | post_act                   | `mlp.c_proj` pre (= act(c_fc x))| `mlp.dense_4h_to_h` pre                   | `mlp.down_proj` pre (= act(gate)·up)     |
| resid  | input_ln_attn (ln1 output) | `ln_1` out                      | `input_layernorm` out                     | `input_layernorm` out                    |
| resid  | delta_attn (attn output)   | — (see note 2)                  | `attention` out[0]                        | `self_attn` out[0]                       |
| resid  | post_attn (x + attn)       | `ln_2` pre                      | `post_attention_layernorm` pre, only if `use_parallel_residual=False` | `post_attention_layernorm` pre |
| resid  | post_ln_attn (ln2 output)  | `ln_2` out                      | `post_attention_layernorm` out            | `post_attention_layernorm` out           |
| resid  | delta_mlp                  | `mlp` out                       | `mlp` out                                 | `mlp` out                                |
| resid  | post_mlp (block output)    | `h[i]` out                      | `layers[i]` out                           | `layers[i]` out                          |
| resid  | post_emb (once)            | `h[0].ln_1` pre                 | `layers[0].input_layernorm` pre           | `layers[0].input_layernorm` pre          |
| resid  | post_ln_f (once)           | `ln_f` out                      | `final_layer_norm` out                    | `norm` out                               |
| logits | logits (once)              | `lm_head(ln_f out)`, computed in position chunks after the body forward (never [B, L, V] at once) |

Where this differs from the official code:
1. GPT-2: the official `modeling_gpt2.py` calls `self.mlp(hidden_states)` without passing its hooks, so
   `mlp.post_act` never fires and `hook=all` there silently means {attn, resid, logits}. Here `mlp` is hooked;
   pass `hook=("attn", "resid", "logits")` to reproduce the official GPT-2 behaviour. Its SDPA/flash attention
   classes hook q/k/v/v_out (used here); its eager class only v_out.
2. GPT-2: the official block stores `attn_output + residual` under the name `delta_attn`; here that tensor is
   listed as `post_attn` (`ln_2` input) — the same tensor, so the set of GPT-2 resid tensors is the official one.
3. Llama family: no official file exists; the NeoX set (sequential-residual variant) is used by analogy.
4. Outputs are reduced in float32; the official code keeps the model dtype (fp16 in its configs).
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from tokenpo.tokens import align_to_labels
from tokenpo.utils import unwrap_model

HOOK_TYPES = ("resid", "attn", "mlp", "logits")
LLAMA_FAMILY = ("llama", "mistral", "qwen2")


@dataclass
class _Block:
    block: nn.Module
    ln_attn: nn.Module
    attn: nn.Module
    attn_out_proj: nn.Module
    qkv: dict[str, nn.Module]           # {"fused": m} (GPT-2, NeoX) or {"q": m, "k": m, "v": m} (Llama)
    ln_mlp: nn.Module
    mlp: nn.Module
    mlp_out_proj: nn.Module
    sequential_residual: bool           # ln_mlp input == x + attn(x)
    hook_attn_output: bool              # official NeoX stores the attention output (delta_attn)


@dataclass
class ModelLayout:
    """Where the hook points of one supported architecture live."""
    family: str                         # "gpt2" | "gpt_neox" | "llama"
    body: nn.Module                     # transformer without the LM head
    blocks: list[_Block]
    final_norm: nn.Module
    head: nn.Module                     # output embeddings (LM head)
    head_dim: int
    rotary: bool
    rotary_fn: Callable | None = field(default=None, repr=False)


def model_layout(model: nn.Module) -> ModelLayout:
    """Resolve the modules of a GPT-2, GPT-NeoX or Llama-family causal LM; `ValueError` for anything else."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    body = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"model {type(model).__name__} has no output embeddings (LM head); pass a *ForCausalLM model")
    blocks: list[_Block] = []
    if model_type == "gpt2":
        for layer in body.h:
            blocks.append(_Block(layer, layer.ln_1, layer.attn, layer.attn.c_proj, {"fused": layer.attn.c_attn},
                                 layer.ln_2, layer.mlp, layer.mlp.c_proj, True, False))
        return ModelLayout("gpt2", body, blocks, body.ln_f, head, config.n_embd // config.n_head, False)
    if model_type == "gpt_neox":
        for layer in body.layers:
            blocks.append(_Block(layer, layer.input_layernorm, layer.attention, layer.attention.dense,
                                 {"fused": layer.attention.query_key_value}, layer.post_attention_layernorm,
                                 layer.mlp, layer.mlp.dense_4h_to_h, not config.use_parallel_residual, True))
        attn_module = importlib.import_module(type(body.layers[0].attention).__module__)
        return ModelLayout("gpt_neox", body, blocks, body.final_layer_norm, head,
                           config.hidden_size // config.num_attention_heads, True,
                           getattr(attn_module, "apply_rotary_pos_emb", None))
    if model_type in LLAMA_FAMILY:
        for layer in body.layers:
            attn = layer.self_attn
            blocks.append(_Block(layer, layer.input_layernorm, attn, attn.o_proj,
                                 {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj},
                                 layer.post_attention_layernorm, layer.mlp, layer.mlp.down_proj, True, True))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attn_module = importlib.import_module(type(body.layers[0].self_attn).__module__)
        return ModelLayout("llama", body, blocks, body.norm, head, head_dim, True,
                           getattr(attn_module, "apply_rotary_pos_emb", None))
    raise ValueError(f"activation hooks support model_type gpt2, gpt_neox and {', '.join(LLAMA_FAMILY)}; "
                     f"got {model_type!r} ({type(model).__name__})")


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _flat_tokens(t: torch.Tensor) -> torch.Tensor:
    """[B, L, ...] -> [B, L, n] (heads merged)."""
    return t.reshape(t.shape[0], t.shape[1], -1)


def reducer(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """[B, L, n] float32 -> [B, L]: "mean" over n, or "sigmoid" (mean of the sigmoid)."""
    if kind == "mean":
        return lambda a: a.mean(-1)
    if kind == "sigmoid":
        return lambda a: torch.sigmoid(a).mean(-1)
    raise ValueError(f"activation reduce={kind!r}: choose 'mean' or 'sigmoid'")


@contextmanager
def record_statistics(model: nn.Module, types: tuple[str, ...], reduce: str = "mean"):
    """Record per-token statistics of the hook points of `types` during the forward passes run inside the block.

    Yields a dict type -> list of [B, L-1] tensors, one per hooked tensor, aligned with the labels (position t is the
    statistic of the state that predicts token t + 1). The "logits" type has no hook: add it after the forward with
    :func:`head_statistic`. Hooks are always removed; nothing of size [B, L, d] is kept.
    """
    unknown = set(types) - set(HOOK_TYPES)
    if unknown:
        raise ValueError(f"unknown hook type(s) {sorted(unknown)}; choose from {HOOK_TYPES}")
    layout = model_layout(model)
    reduce_fn = reducer(reduce)
    stats: dict[str, list[torch.Tensor]] = {t: [] for t in types}
    handles = []

    def record(kind: str, tensor: torch.Tensor) -> None:
        stats[kind].append(reduce_fn(_flat_tokens(align_to_labels(tensor.detach()).float())))

    def out_hook(kind, pick=_first):
        return lambda module, args, output: record(kind, pick(output))

    def pre_hook(kind):
        return lambda module, args: record(kind, args[0])

    def on(module, hook, pre=False, with_kwargs=False):
        if pre:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))
        else:
            handles.append(module.register_forward_hook(hook))

    try:
        for index, b in enumerate(layout.blocks):
            if "resid" in types:
                if index == 0:
                    on(b.ln_attn, pre_hook("resid"), pre=True)                  # post_emb
                on(b.ln_attn, out_hook("resid"))                                # input_ln_attn
                if b.hook_attn_output:
                    on(b.attn, out_hook("resid"))                               # delta_attn
                if b.sequential_residual:
                    on(b.ln_mlp, pre_hook("resid"), pre=True)                   # post_attn
                on(b.ln_mlp, out_hook("resid"))                                 # post_ln_attn
                on(b.mlp, out_hook("resid"))                                    # delta_mlp
                on(b.block, out_hook("resid"))                                  # post_mlp
            if "mlp" in types:
                on(b.mlp_out_proj, pre_hook("mlp"), pre=True)                   # post_act
            if "attn" in types:
                _hook_attention(layout, b, record, on)
        if "resid" in types:
            on(layout.final_norm, out_hook("resid"))                            # post_ln_f
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def head_statistic(model: nn.Module, hidden: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                   reduce: str = "mean", max_elements: int = 1 << 25) -> torch.Tensor:
    """The "logits" statistic [B, T]: `reduce` over the vocabulary of the aligned logits [B, T, V], or of the LM head
    applied to aligned final hidden states [B, T, H] in position chunks (never more than ~max_elements logits)."""
    reduce_fn = reducer(reduce)
    with torch.no_grad():
        if logits is not None:
            return reduce_fn(logits.detach().float())
        head = model_layout(model).head
        batch, length = hidden.shape[:2]
        chunk = max(1, max_elements // max(1, batch * head.weight.shape[0]))
        return torch.cat([reduce_fn(head(hidden[:, i:i + chunk]).float()) for i in range(0, length, chunk)], dim=1)


def token_statistics(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     types: tuple[str, ...], reduce: str = "mean") -> dict[str, list[torch.Tensor]]:
    """Run the body of `model` once (no gradient) and return the statistics of `record_statistics` for `types`,
    "logits" included, each [B, L-1]. The caller sets eval mode."""
    layout = model_layout(model)
    with torch.no_grad(), record_statistics(model, tuple(t for t in types if t != "logits"), reduce) as stats:
        out = layout.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    if "logits" in types:
        last = out.last_hidden_state if hasattr(out, "last_hidden_state") else _first(out)
        stats["logits"] = [head_statistic(model, hidden=align_to_labels(last), reduce=reduce)]
    return {t: stats[t] for t in types}


# ------------------------------------------------------------------------------------------------- residual sites
SITES = ("block_out", "mlp_out", "final_norm")


def _site_module(model: nn.Module, layer: int, site: str) -> nn.Module:
    layout = model_layout(model)
    if site == "final_norm":
        return layout.final_norm
    if site not in SITES:
        raise ValueError(f"site={site!r}: choose from {SITES}")
    n = len(layout.blocks)
    if not -n <= layer < n:
        raise ValueError(f"layer={layer} out of range for a {n}-layer model")
    block = layout.blocks[layer]
    return block.block if site == "block_out" else block.mlp


@contextmanager
def capture_sites(model: nn.Module, sites):
    """Record the residual stream at each (layer, site) during the forward passes inside the block (gradients flow
    when the forward has them). Yields a dict (layer, site) -> [B, L, d].

    "block_out": output of decoder block `layer` (before the final norm; what Gemma Scope residual SAEs read, HF
    ``hidden_states[layer + 1]`` except for the last block); "mlp_out": the output of block `layer`'s MLP (what an MLP
    SAE reads); "final_norm": output of the final norm (HF ``hidden_states[-1]``, what the official FPO code feeds
    its SAE; `layer` ignored)."""
    store: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    try:
        for layer, site in sites:
            key = (layer, site)
            handles.append(_site_module(model, layer, site).register_forward_hook(
                lambda module, args, output, key=key: store.__setitem__(key, _first(output))))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def _hook_attention(layout: ModelLayout, b: _Block, record, on) -> None:
    head_dim = layout.head_dim
    rotary: dict[str, tuple] = {}

    def grab_rotary(module, args, kwargs):
        rotary["cos_sin"] = kwargs.get("position_embeddings")

    def rotated(t: torch.Tensor) -> torch.Tensor | None:    # t [B, L, H*dh] -> rotated [B, H, L, dh]
        cos_sin = rotary.get("cos_sin")
        if layout.rotary_fn is None or cos_sin is None:
            return None
        heads = t.view(t.shape[0], t.shape[1], -1, head_dim).transpose(1, 2)
        return layout.rotary_fn(heads, heads, *cos_sin)[0]

    def record_qk(name: str, t: torch.Tensor) -> None:
        record("attn", t)
        if layout.rotary and name in ("q", "k"):
            r = rotated(t)
            if r is not None:
                record("attn", r.transpose(1, 2))

    if layout.rotary:
        on(b.attn, grab_rotary, pre=True, with_kwargs=True)
    if "fused" in b.qkv:
        def fused(module, args, output):
            qkv = output.detach()
            if layout.family == "gpt2":
                parts = qkv.split(qkv.shape[-1] // 3, dim=-1)
            else:                                                  # NeoX: [B, L, H, 3*dh], per-head q|k|v
                per_head = qkv.view(qkv.shape[0], qkv.shape[1], -1, 3 * head_dim)
                parts = [p.reshape(qkv.shape[0], qkv.shape[1], -1) for p in per_head.chunk(3, dim=-1)]
            for name, part in zip("qkv", parts):
                record_qk(name, part)
        on(b.qkv["fused"], fused)
    else:
        for name, module in b.qkv.items():
            on(module, lambda m, a, o, name=name: record_qk(name, o.detach()))
    on(b.attn_out_proj, lambda m, args: record("attn", args[0]), pre=True)   # v_out
