"""Which models fit on 1, 2, 4, 8 GPUs of 80 GB, full fine-tune or LoRA, by memory.memory_plan (the start-up check).

    python bench/memory_table.py [--gb 80] [--max-new-tokens 512] [--grad-checkpoint]

Configurations written here from the models' published config.json files (no download). Other flags at the
stage-2 defaults (2 prompts x 16 completions per rank, micro-batch 16, bf16, beta 0, prompts of 1024 tokens).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import grpo  # noqa: E402
import memory  # noqa: E402

MODELS = {
    "Qwen2.5-0.5B": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen2.5-1.5B": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Qwen3-4B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "Qwen3-8B": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "Llama-3.1-8B": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=80.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--grad-checkpoint", action="store_true")
    a = p.parse_args()
    worlds = (1, 2, 4, 8)
    print(
        f"peak GB per rank (memory plan; a fit: under {a.gb:g} GB), bf16, max-new-tokens {a.max_new_tokens}"
        f"{', grad checkpointing' if a.grad_checkpoint else ''}"
    )
    print(
        "| model | parameters | "
        + " | ".join(f"full x{w}" for w in worlds)
        + " | "
        + " | ".join(f"LoRA {a.lora_rank} x{w}" for w in worlds)
        + " |"
    )
    print("|---|---|" + "---|" * (2 * len(worlds)))
    for name, hf in MODELS.items():
        cells = []
        for lora in (0, a.lora_rank):
            cfg = grpo.Config(
                stage=2,
                dtype="bfloat16",
                batch_prompts=2,
                group_size=16,
                lora_rank=lora,
                max_new_tokens=a.max_new_tokens,
                grad_checkpoint=a.grad_checkpoint,
            )
            for w in worlds:
                peak = memory.memory_plan(hf, cfg, w)["peak"] / 1e9
                cells.append(f"{peak:.0f} {'fits' if peak < a.gb else 'no'}")
        P = memory.model_numels(hf)[0]
        print(f"| {name} | {P / 1e9:.2f}B | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
