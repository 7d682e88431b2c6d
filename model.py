"""A decoder-only transformer written from scratch, in the Hugging Face layout, with LoRA. Top to bottom:

  1. ModelConfig  - the fields read from a Hugging Face config.json (Llama, Qwen2, Qwen3 families)
  2. the blocks   - RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP
  3. Transformer  - the model; from_pretrained / save_pretrained a Hugging Face model directory
  4. LoRA         - adapters on the blocks' linear layers; adapters off = the frozen reference policy

Module and tensor names follow the Hugging Face checkpoints (model.layers.0.self_attn.q_proj.weight, ...), so a
state dict loads and saves without any renaming table. Left to other modules: sampling with a KV cache
(sampler.py), the trainer's packed log-probs (logprobs.py), the built-in model and its GGUF conversion
(builtin.py: from_pretrained takes a directory, builtin.resolve_model_path turns "builtin" into one).
"""

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from kernels import block_autograd as lean
from kernels import decode

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


class ModelError(ValueError):
    """A one-line error about a checkpoint (missing file, unsupported config, wrong tensor), or about a model that
    cannot run as asked (no fused attention kernel on CUDA)."""


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
        if cache is not None and T == 1:  # decode: one query, no K/V repeated, no fused kernel needed
            # float32 scores on CUDA for 16-bit models, as the fused kernels keep them
            fp32_scores = x.device.type == "cuda" and x.dtype != torch.float32
            y = decode.single_query_attention(q, k, v, mask, fp32_scores=fp32_scores)  # (B, nh, 1, hd)
        elif fused_kernels_only(x.device):
            y = fused_attention(q, k, v, mask, is_causal=mask is None and T > 1)  # (B, nh, T, hd)
        else:  # grouped-query attention: each group of n_head / n_kv query heads shares one key/value head
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_head
            )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


# Which CUDA SDPA kernels take what (torch 2.13, aten/src/ATen/native/transformers/cuda/sdp_utils.cpp and the
# scaled_dot_product_attention docs): flash takes no mask; cuDNN and memory-efficient take an additive
# (B or 1, 1, T, S) mask; grouped K/V heads (enable_gqa) are documented for flash only, so whether another kernel
# takes them is asked of torch (takes_grouped_kv) and K/V are repeated when none does. The math backend is never
# allowed: it holds fp32 scores (B, heads, T, S) per layer.
MASKED_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
UNMASKED_BACKENDS = [SDPBackend.FLASH_ATTENTION, *MASKED_BACKENDS]
CAN_USE = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.can_use_flash_attention,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.can_use_efficient_attention,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.can_use_cudnn_attention,
}
# the memory-efficient kernel copies (per call, kept for backward) a mask whose row stride is not a multiple of 8
MASK_ALIGN = 16


def fused_kernels_only(device) -> bool:
    """CUDA: attention by a fused SDPA kernel or an error. The CPU keeps SDPA's own choice (math is fine there)."""
    return device.type == "cuda"


def fused_backends(masked: bool) -> list:
    """The SDPA kernels allowed on CUDA: the fused ones that take an attention mask when there is one."""
    return MASKED_BACKENDS if masked else UNMASKED_BACKENDS


def takes_grouped_kv(q, k, v, mask, is_causal, backends) -> bool:
    """Whether one of `backends` runs these tensors with K/V heads shared by groups of query heads (enable_gqa)."""
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, is_causal, True)
    return any(CAN_USE[b](params, False) for b in backends)


def repeat_kv(k, groups):
    """(B, n_kv, S, hd) -> (B, n_kv * groups, S, hd): key/value head h // groups for query head h, as enable_gqa."""
    B, n_kv, S, hd = k.shape
    return k[:, :, None].expand(B, n_kv, groups, S, hd).reshape(B, n_kv * groups, S, hd)


def fused_attention(q, k, v, mask=None, is_causal=False, backends=None):
    """softmax(q k^T / sqrt(hd) + mask) v by a fused SDPA kernel only: q (B, nh, T, hd), k, v (B, n_kv, S, hd), mask
    additive (B or 1, 1, T, S) or None -> (B, nh, T, hd). When no kernel can run, a one-line ModelError instead of
    the math backend's silent fallback. backends: the kernels allowed (default fused_backends)."""
    backends = backends or fused_backends(mask is not None)
    nh, n_kv = q.shape[1], k.shape[1]
    gqa = nh != n_kv
    if gqa and not takes_grouped_kv(q, k, v, mask, is_causal, backends):
        # transient (B, nh, S, hd) copies, kept for backward in place of k and v: nh / n_kv x their size
        k, v, gqa = repeat_kv(k, nh // n_kv), repeat_kv(v, nh // n_kv), False
    try:
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
            )
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):
            raise
        names = "/".join(b.name.lower() for b in backends)
        shown = f"a {tuple(mask.shape)} mask" if mask is not None else "no mask"
        raise ModelError(
            f"attention: no fused kernel ({names}) runs q {tuple(q.shape)} {str(q.dtype).removeprefix('torch.')}"
            f" with {shown}, and the math fallback would hold fp32 scores of every head: use --dtype bfloat16,"
            f" a smaller --micro-batch or fewer --max-new-tokens"
        ) from None


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

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts buffers too: the rotary frequencies stay fp32 (rounded, every position's
        # phase shifts, by ~1 radian at 1k tokens), however the model is cast or moved
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        return self

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """(V, H) output projection: the input embedding when tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, cache=None, head=None, segment_ids=None
    ):
        """input_ids (B, T); attention_mask (B, T) or, with a cache, (B, S) over cache + new tokens: 1 = real
        token, 0 = left padding; or a ready (B, 1, T, T) boolean mask (True = may attend). Packed sequences:
        segment_ids (B, T) with position_ids (packed_attention_mask says what they mean), the mask built from them
        on their device. Returns logits (B, T, V), or head(final-norm hidden states (B, T, H), lm_head_weight):
        run inside forward, where a sharded (FSDP) model holds its gathered output weight."""
        B, T = input_ids.shape
        x = self.model.embed_tokens(input_ids)  # (B, T, H)
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, past, T, input_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, x.dtype)
        mask = attention_mask
        if segment_ids is not None:
            mask = packed_attention_mask(segment_ids)  # (B, 1, T, T)
        elif attention_mask is not None and attention_mask.dim() == 2:
            mask = attention_mask_4d(attention_mask, past, T)
        if mask is None and cache is not None and past > 0:
            mask = torch.ones(1, 1, T, past + T, dtype=torch.bool, device=x.device).tril(past)
        if mask is not None:
            # additive form once here (what SDPA would build from a boolean mask in every layer): all layers then
            # share one mask tensor, also the one that backward keeps
            mask = additive_mask(mask, x.dtype, MASK_ALIGN if fused_kernels_only(x.device) else 1)
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
        return F.linear(x, self.lm_head_weight)  # (B, T, V)

    # ---- loading and saving in the Hugging Face layout ----

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"{path}: model directory not found")
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):
            model = cls(cfg)
        state = load_safetensors_dir(path)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        check_tensors(path, expected, {k: v.shape for k, v in state.items()}, cfg.tie_word_embeddings)
        state = {k: state[k].to(dtype) for k in expected}
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(cfg)
        return model.to(device)

    @classmethod
    def on_meta(cls, path, dtype=torch.float32) -> "Transformer":
        """The model of a Hugging Face directory without its weights: parameters on the meta device in dtype
        (the rotary frequencies fp32), to be sharded, materialized (to_empty) and then loaded."""
        path = Path(path)
        if not path.is_dir():
            raise ModelError(f"{path}: model directory not found")
        cfg = ModelConfig.from_hf(read_json(path / "config.json"), str(path / "config.json"))
        with torch.device("meta"):
            return cls(cfg).to(dtype)

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
        self.save_config(path, dtype, tokenizer)

    def save_config(self, path, dtype, tokenizer=None):
        """config.json, generation_config.json (+ the tokenizer's files): a model directory less its weights."""
        path = Path(path)
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


def additive_mask(allowed, dtype, align=1):
    """(B, 1, T, S) boolean (True = may attend) -> the same shape in dtype, 0 where allowed and -inf elsewhere; its
    rows stored a multiple of `align` elements apart (padding past S, never read), the layout fused kernels take."""
    B, _, T, S = allowed.shape
    stored = -(-S // align) * align
    bias = torch.full((B, 1, T, stored), float("-inf"), dtype=dtype, device=allowed.device)[..., :S]
    return bias.masked_fill_(allowed, 0.0)


def packed_attention_mask(segment_ids):
    """(P, S) segment ids of packed sequences -> (P, 1, S, S) boolean, True = may attend, on their device. Segment
    0 is the shared prefix (the prompt), r > 0 one row's own tokens, -1 padding: a query sees the earlier keys of
    the prefix and of its own segment; padding sees only itself (SDPA never returns NaN for it)."""
    S = segment_ids.shape[1]
    i = torch.arange(S, device=segment_ids.device)
    q_seg, k_seg = segment_ids[:, :, None], segment_ids[:, None, :]  # (P, S, 1), (P, 1, S)
    visible = (k_seg == 0) | (k_seg == q_seg)  # (P, S, S)
    visible &= (i[None, :] <= i[:, None]) & (q_seg >= 0)  # causal, and padding queries see no other key
    visible |= i[None, :] == i[:, None]
    return visible[:, None]


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


def check_tensors(path, expected: dict, found: dict, tie_word_embeddings: bool):
    """A one-line ModelError for a tensor of `expected` (name -> shape) missing from `found` (the checkpoint's
    name -> shape) or of another shape, or for a tensor the model does not have."""
    for name, shape in expected.items():
        if name not in found:
            raise ModelError(f"{path}: tensor {name!r} missing from the checkpoint")
        if tuple(found[name]) != tuple(shape):
            raise ModelError(
                f"{path}: tensor {name!r} has shape {tuple(found[name])}, expected {tuple(shape)}"
            )
    ignorable = ("lm_head.weight",) if tie_word_embeddings else ()
    extra = [
        k for k in found if k not in expected and k not in ignorable and not k.endswith("rotary_emb.inv_freq")
    ]
    if extra:
        raise ModelError(f"{path}: unexpected tensor {extra[0]!r} in the checkpoint ({len(extra)} in all)")


def safetensors_files(path: Path) -> list:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        for shard in shards:
            if not (path / shard).is_file():
                raise ModelError(f"{path / shard}: shard listed in {index.name} not found")
        return [path / shard for shard in shards]
    raise ModelError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_safetensors_dir(path: Path) -> dict:
    """Every tensor of the directory's safetensors file(s), read whole into host memory."""
    from safetensors.torch import load_file

    state = {}
    for f in safetensors_files(path):
        state.update(load_file(str(f)))
    return state


def safetensors_shapes(path: Path) -> dict:
    """{name: shape} of the directory's safetensors file(s), from their headers (no tensor is read)."""
    from safetensors import safe_open

    shapes = {}
    for f in safetensors_files(path):
        with safe_open(str(f), framework="pt") as sf:
            shapes.update({k: tuple(sf.get_slice(k).get_shape()) for k in sf.keys()})
    return shapes


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ----------------------------------------------------------------------------------------------------------------
# 4. LoRA: W x + (alpha / r) * B (A x), A (r, in), B (out, r) = 0 at start, so training starts from the base model


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


def merge_lora(model, state):
    """Hugging Face names: every adapted layer's weight as W + scale * B @ A (in fp32, stored in W's dtype). A state
    of FSDP2 shards gives shards: each rank merges its own rows (A, rank x in, gathered whole)."""
    out = {}
    for k, v in state.items():
        if ".lora_" in k:
            continue
        if ".base." in k:
            prefix, leaf = k.split(".base.")
            if leaf == "weight":
                A = state[prefix + ".lora_A"]  # (r, in)
                B = state[prefix + ".lora_B"]  # (out, r)
                scale = model.get_submodule(prefix).scale
                # FSDP2: this rank's rows of W are its rows of B (both Shard(0) over out); A is small, gathered
                if isinstance(v, DTensor):
                    rows = v.to_local().float() + scale * B.to_local().float() @ A.full_tensor().float()
                    v = DTensor.from_local(
                        rows.to(v.dtype), v.device_mesh, v.placements, shape=v.shape, stride=v.stride()
                    )
                else:
                    v = (v.float() + scale * B.float() @ A.float()).to(v.dtype)
            k = f"{prefix}.{leaf}"
        out[k] = v
    return out
