"""bf16 with fp32 master weights, seeds per global row, FSDP2 under torchrun, the memory plan, the GPU check."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_grpo import PROMPTS, read_metrics, run_args, tiny_model, toy_reward  # noqa: E402

import builtin  # noqa: E402
import checkpoint  # noqa: E402
import distributed  # noqa: E402
import grpo  # noqa: E402
import memory  # noqa: E402
from model import ModelError, Transformer  # noqa: E402
from sampler import KVCache, generate  # noqa: E402


def mean_abs_change(start, end):
    return torch.cat([(end[k].double() - start[k].double()).abs().flatten() for k in start]).mean().item()


# ----------------------------------------------------------------------------------------------------------------
# 1. bf16 that learns


def test_bf16_master_weights_move_like_fp32_and_are_saved(tiny_dir, tmp_path, monkeypatch):
    start = load_file(str(tiny_dir / "model.safetensors"))
    moved = {}
    for dtype in ("float32", "bfloat16"):
        grpo.main(
            run_args(tiny_dir, tmp_path / dtype, "--steps", "3", "--dtype", dtype, "--lr", "1e-5"),
            reward_fn=toy_reward,
        )
        saved = load_file(str(tmp_path / dtype / "checkpoint" / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in saved.values()), dtype  # the masters, not their rounding
        moved[dtype] = mean_abs_change(start, saved)
    # AdamW's first steps move every weight by ~lr whatever the gradient's scale, so both runs move ~3 lr on
    # average; plain bf16 AdamW instead loses the update to rounding (weights ~0.1: steps of 2^-8 relative,
    # ~4e-4) and its checkpoint differs from the start by the cast alone (measured 6x the fp32 change). A factor
    # of 2 either way is "the same order" and separates the two.
    assert 0.5 < moved["bfloat16"] / moved["float32"] < 2.0, moved
    # the masters are not bf16 values: most entries change when rounded to bf16
    w = saved["model.layers.0.mlp.up_proj.weight"]
    assert (w.to(torch.bfloat16).float() != w).float().mean() > 0.9


def test_bf16_resume_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    args = ("--steps", "3", "--dtype", "bfloat16", "--lr", "1e-4")
    grpo.main(run_args(tiny_dir, tmp_path / "full", *args), reward_fn=toy_reward)
    grpo.main(run_args(tiny_dir, tmp_path / "cut", *args, "--stop-after", "1"), reward_fn=toy_reward)
    grpo.main(run_args(tiny_dir, tmp_path / "cut", *args, "--resume"), reward_fn=toy_reward)
    assert read_metrics(tmp_path / "cut" / "metrics.jsonl") == read_metrics(
        tmp_path / "full" / "metrics.jsonl"
    )
    a = load_file(str(tmp_path / "full" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same fp32 masters, bit for bit (CPU, same seeds)


def test_bf16_lora_keeps_the_base_in_bf16_and_fp32_adapter_masters(tiny_dir):
    cfg = grpo.Config(dtype="bfloat16", lora_rank=4)
    policy, _ = distributed.load_models(cfg, str(tiny_dir), str(tiny_dir), torch.device("cpu"), cfg.dtype)
    assert policy.model.layers[0].self_attn.q_proj.base.weight.dtype == torch.bfloat16
    assert policy.masters and all(
        "lora_" in n and m.dtype == torch.float32 for n, m in policy.masters.items()
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. seeds per global row


def test_rows_sampled_by_their_place_in_the_global_batch():
    model = tiny_model(seed=3)
    both, _, _ = generate(
        model, PROMPTS[:2], group_size=3, max_new_tokens=8, temperature=1.0, seed=5, eos_token_ids=(2,)
    )
    second, _, _ = generate(
        model,
        PROMPTS[1:2],
        group_size=3,
        max_new_tokens=8,
        temperature=1.0,
        seed=5,
        first_row=3,
        eos_token_ids=(2,),
    )
    first, _, _ = generate(
        model, PROMPTS[1:2], group_size=3, max_new_tokens=8, temperature=1.0, seed=5, eos_token_ids=(2,)
    )
    assert torch.equal(second, both[3:])
    assert not torch.equal(first, both[3:])  # without the offset: other draws


# ----------------------------------------------------------------------------------------------------------------
# 3. FSDP2: two gloo processes running the real loop against one process on the same global batch

WORKER = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import grpo
    from test_grpo import toy_reward
    real = grpo.sample_rollout

    def recording(*args, **kw):   # this rank's samples and rewards of every step, for the comparison
        batch = real(*args, **kw)
        with open(os.path.join(sys.argv[1], "samples-rank" + os.environ.get("RANK", "0") + ".jsonl"), "a") as f:
            f.write(json.dumps(dict(ids=batch.comp_ids.tolist(), rewards=batch.rewards.tolist())) + "\\n")
        return batch

    grpo.sample_rollout = recording
    grpo.main(sys.argv[2:], reward_fn=toy_reward)
""")


def torchrun(tmp_path, nproc, out, *args):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    Path(out).mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        str(out),
        *args,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def samples(out, rank, step):
    return [json.loads(line) for line in (Path(out) / f"samples-rank{rank}.jsonl").read_text().splitlines()][
        step
    ]


def test_fsdp_two_processes_equal_one_process(tiny_dir, tmp_path):
    flags = ("--steps", "2", "--beta", "0.05", "--log-samples", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(tmp_path, 1, one, *run_args(tiny_dir, one, *flags))
    proc = torchrun(tmp_path, 2, two, *run_args(tiny_dir, two, *flags, "--batch-prompts", "1"))
    assert "FSDP2" in proc.stdout
    # step 0: the same completions and rewards, row for row (rank r holds global rows r*B*G ..)
    s1, s2 = samples(one, 0, 0), [samples(two, r, 0) for r in (0, 1)]
    assert s1["ids"] == s2[0]["ids"] + s2[1]["ids"]
    assert s1["rewards"] == s2[0]["rewards"] + s2[1]["rewards"]
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    # the same math, summed in another order (reduce-scatter of two ranks' partial gradients): float32 rounding
    assert m2[0]["grad_norm"] == pytest.approx(m1[0]["grad_norm"], rel=1e-4)
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-4, abs=1e-6)
    a = load_file(str(one / "checkpoint" / "model.safetensors"))
    b = load_file(str(two / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys()
    # two AdamW steps at lr 3e-3 move weights by ~6e-3; float noise in the gradient changes an update by far less
    # unless the gradient entry is itself ~0 (there Adam's g / sqrt(v) is noise / noise): 1e-4 bounds the rest
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-4).float().mean() > 0.999 and diff.max() < 2 * 2 * 3e-3, diff.max()


def test_fsdp_resume_equals_uninterrupted_and_checkpoint_loads_in_transformers(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    flags = ("--steps", "3", "--beta", "0.05", "--mu", "2", "--batch-prompts", "1")
    full, cut = tmp_path / "full", tmp_path / "cut"
    torchrun(tmp_path, 2, full, *run_args(tiny_dir, full, *flags))
    torchrun(tmp_path, 2, cut, *run_args(tiny_dir, cut, *flags, "--stop-after", "2"))
    torchrun(tmp_path, 2, cut, *run_args(tiny_dir, cut, *flags, "--resume"))
    assert read_metrics(cut / "metrics.jsonl") == read_metrics(full / "metrics.jsonl")  # CPU, gloo: bitwise
    a = load_file(str(full / "checkpoint" / "model.safetensors"))
    b = load_file(str(cut / "checkpoint" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.tensor([PROMPTS[2]])
    ours = Transformer.from_pretrained(cut / "checkpoint")(ids)
    hf = AutoModelForCausalLM.from_pretrained(cut / "checkpoint", dtype=torch.float32)(ids).logits
    # fp32, the same weights: only the order of float32 sums differs (test_model.py's parity tolerance)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


def test_resume_on_another_number_of_processes(tiny_dir, tmp_path):
    """Each rank saves its shard of the AdamW state; a resume on 1 process puts the 2 shards together, a resume on
    2 cuts a 1-process state in two. 2 ranks for step 0, 1 process for step 1, 2 ranks for step 2 against 1 process
    for all 3: the same updates (a wrong or lost moment changes Adam's update by ~lr = 3e-3, not 1e-4)."""
    flags = ("--steps", "3", "--beta", "0.05", "--log-samples", "0")
    one, mixed = tmp_path / "one", tmp_path / "mixed"
    torchrun(tmp_path, 1, one, *run_args(tiny_dir, one, *flags))
    torchrun(
        tmp_path, 2, mixed, *run_args(tiny_dir, mixed, *flags, "--batch-prompts", "1", "--stop-after", "1")
    )
    assert len(list((mixed / "checkpoint").glob("optimizer-*-of-00002.safetensors"))) == 2
    torchrun(tmp_path, 1, mixed, *run_args(tiny_dir, mixed, *flags, "--stop-after", "2", "--resume"))
    assert len(list((mixed / "checkpoint").glob("optimizer-*.safetensors"))) == 1
    torchrun(tmp_path, 2, mixed, *run_args(tiny_dir, mixed, *flags, "--batch-prompts", "1", "--resume"))
    m1, m2 = read_metrics(one / "metrics.jsonl"), read_metrics(mixed / "metrics.jsonl")
    assert [m["step"] for m in m2] == [0, 1, 2]
    for a, b in zip(
        m1, m2
    ):  # float32 rounding of sums in another order (test_fsdp_two_processes_equal_one_process)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    a = load_file(str(one / "checkpoint" / "model.safetensors"))
    b = load_file(str(mixed / "checkpoint" / "model.safetensors"))
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff < 1e-4).float().mean() > 0.999 and diff.max() < 3 * 2 * 3e-3, diff.max()


def test_fsdp_lora_bf16_runs_and_saves_merged_weights(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    torchrun(
        tmp_path,
        2,
        out,
        *run_args(
            tiny_dir,
            out,
            "--steps",
            "1",
            "--batch-prompts",
            "1",
            "--lora-rank",
            "4",
            "--dtype",
            "bfloat16",
            "--beta",
            "0.05",
        ),
    )
    state = checkpoint.load_trainer_state(out / "checkpoint")
    assert state["lora"] and all(t.dtype == torch.float32 for t in state["lora"].values())
    merged = Transformer.from_pretrained(out / "checkpoint")  # HF names: the adapters merged in
    assert merged.model.layers[0].self_attn.q_proj.weight.shape == (32, 32)


# ----------------------------------------------------------------------------------------------------------------
# 4. The memory plan


def builtin_config():
    from builtin import resolve_model_path
    from model import read_json

    try:
        return read_json(Path(resolve_model_path("builtin")) / "config.json")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"built-in model unavailable ({e}); run `make setup`")


def tensor_bytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def test_plan_terms_equal_the_tensors_of_the_built_in_model():
    hf = builtin_config()
    cfg = grpo.Config(dtype="float32", batch_prompts=2, group_size=4, max_new_tokens=32)
    plan = memory.memory_plan(hf, cfg, world=1)
    model = Transformer.from_pretrained(builtin.resolve_model_path("builtin"))
    opt = grpo.make_optimizer(list(model.parameters()), cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # AdamW allocates its two moments
    moments = [t for s in opt.state.values() for k, t in s.items() if k != "step"]
    # exact counts: the plan counts the same parameters in the same dtypes (rel 1e-9: float rounding of the sums)
    assert plan["weights"] == pytest.approx(tensor_bytes(model.parameters()), rel=1e-9)
    assert plan["gradients"] == pytest.approx(tensor_bytes(p.grad for p in model.parameters()), rel=1e-9)
    assert plan["optimizer"] == pytest.approx(tensor_bytes(moments), rel=1e-9)
    cache = KVCache(model.config, 8, cfg.max_prompt_tokens + 32, torch.float32, "cpu")
    assert plan["kv_cache"] == pytest.approx(tensor_bytes(cache.k + cache.v), rel=1e-9)
    # FSDP over 4: a quarter of the weights, gradients and moments each, plus the whole model gathered to sample
    four = memory.memory_plan(hf, cfg, world=4)
    assert (
        four["optimizer"] == pytest.approx(plan["optimizer"] / 4)
        and four["sampling_gathered"] == plan["weights"]
    )


def test_plan_bf16_and_lora_terms_equal_the_tensors(tiny_dir):
    hf = json.loads((tiny_dir / "config.json").read_text())
    for lora in (0, 4):
        cfg = grpo.Config(dtype="bfloat16", lora_rank=lora)
        plan = memory.memory_plan(hf, cfg, world=1)
        policy, _ = distributed.load_models(cfg, str(tiny_dir), str(tiny_dir), torch.device("cpu"), cfg.dtype)
        assert plan["weights"] == pytest.approx(tensor_bytes(policy.parameters()), rel=1e-9), lora
        assert plan["masters"] == pytest.approx(tensor_bytes(policy.masters.values()), rel=1e-9), lora


@pytest.mark.parametrize("world", [1, 2])
def test_plan_peak_against_the_measured_peak_of_a_run(tmp_path, world):
    """The built-in model, fp32, in fresh processes (1, or FSDP2 over 2 with the same global batch): the largest
    rank's peak resident memory against the plan's peak per rank."""
    hf = builtin_config()
    # two steps: the second runs forward and backward with AdamW's moments allocated, the plan's steady state;
    # the built-in task's prompts are 486-505 tokens, so a 512-token budget is what the plan counts
    flags = [
        "--steps",
        "2",
        "--batch-prompts",
        str(2 // world),
        "--group-size",
        "4",
        "--max-new-tokens",
        "16",
        "--max-prompt-tokens",
        "512",
        "--micro-batch",
        "4",
        "--no-progress",
        "--log-samples",
        "0",
    ]
    code = (
        "import resource, sys; sys.argv = ['grpo.py'] + sys.argv[1:]; import grpo; grpo.cli(); "
        "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)"
    )
    launch = (
        [sys.executable]
        if world == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    )
    script = tmp_path / "run_grpo.py"
    script.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code.replace("; ", "\n"))
    proc = subprocess.run(
        [*launch, str(script), *flags, "--out", str(tmp_path / "run")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [int(part.split()[0]) * 1024 for part in proc.stdout.split("MAXRSS")[1:]]  # Linux reports KiB
    assert len(ranks) == world
    plan = memory.memory_plan(hf, grpo.parse_args(flags + ["--dtype", "float32"]), world=world)
    # the plan's activation and runtime terms are rough, and it budgets --max-prompt-tokens for every prompt:
    # within 30% of the measured peak either way (docs/EXPERIMENTS.md has the measured figures)
    assert 0.7 < plan["peak"] / max(ranks) < 1.3, (plan["peak"], ranks)


def test_a_plan_that_cannot_fit_stops_before_loading(tmp_path, capsys):
    # an 8B-sized config without any weights: the error must come from the plan, before a tensor is read
    big = dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    )
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "config.json").write_text(json.dumps(big))
    plan = memory.memory_plan(big, grpo.Config(dtype="float32"), world=1)
    assert plan["parameters"] == pytest.approx(8.03e9, rel=0.01)  # Llama-3.1-8B's published count
    with pytest.raises(ModelError, match="memory plan"):
        memory.check_fit(plan, "cpu", available=80e9)  # 16 B / parameter > 80 GB
    memory.check_fit(
        memory.memory_plan(big, grpo.Config(dtype="bfloat16", lora_rank=16), world=1), "cpu", available=80e9
    )  # LoRA in bf16 fits
    with pytest.raises(SystemExit) as e:
        grpo.cli(
            [
                "--model",
                str(tmp_path / "big"),
                "--out",
                str(tmp_path / "out"),
                "--steps",
                "1",
                "--dtype",
                "float32",
                "--no-progress",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "memory plan" in err and len(err.splitlines()) == 1
