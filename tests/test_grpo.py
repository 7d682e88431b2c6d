"""The GRPO trainer on tiny random models: log-probs, one update, mu > 1, a toy task, resume, two processes."""

import copy
import json
import math
import os
import random
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import checkpoint  # noqa: E402
import distributed  # noqa: E402
import eval as E  # noqa: E402
import grpo  # noqa: E402
import logprobs  # noqa: E402
import memory  # noqa: E402
import metrics  # noqa: E402
import model as M  # noqa: E402
import sampler  # noqa: E402
from builtin import resolve_model_path  # noqa: E402
from model import ModelConfig, Transformer  # noqa: E402
from sampler import generate  # noqa: E402

TIME_KEYS = {"tokens_per_s", "sample_time", "train_time", "step_time"}


def tiny_model(vocab=64, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=2,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0, 0.3)  # tied head: keeps initial logits soft (std ~ 1.7)
    return model


def toy_rollout(prompts, comp_ids, comp_mask):
    """A grpo.Rollout of given tokens, for the update alone: no records, texts or rewards."""
    R = comp_ids.shape[0]
    return grpo.Rollout(
        records=[None] * len(prompts),
        prompts=prompts,
        prefills=[""] * len(prompts),
        comp_ids=comp_ids,
        comp_mask=comp_mask,
        sampler_logp=None,
        texts=[""] * R,
        rewards=torch.zeros(R, dtype=torch.float64),
        components=[{}] * R,
        truncated=torch.zeros(R, dtype=torch.bool),
    )


def toy_batch(model, prompts, G, M, temperature, seed=0):
    ids, mask, sampling_logp = generate(
        model, prompts, group_size=G, max_new_tokens=M, temperature=temperature, eos_token_ids=(2,), seed=seed
    )
    # generate runs under inference_mode: copies are ordinary tensors, as in grpo.sample_rollout
    return toy_rollout(prompts, ids.clone(), mask.clone()), sampling_logp.clone()


def full_sequence_logprobs(model, prompts, comp_ids, comp_mask, rows_prompt, temperature):
    """The plain reference of logprobs.completion_logprobs: the R full (prompt + completion) sequences, left-padded,
    G times the prompt compute; log-softmax of the full logits in float32 (float64 for a float64 model)."""
    p_ids, p_mask = sampler.left_pad(prompts, 0, "cpu")  # (P, L)
    L = p_ids.shape[1]
    attn = torch.cat([p_mask[rows_prompt], comp_mask.to(p_mask.dtype)], 1)  # (R, L + M)
    ids = torch.cat([p_ids[rows_prompt], comp_ids], 1)[:, :-1]  # (R, L + M - 1)
    logits = model(ids, attention_mask=attn[:, :-1])[:, L - 1 :]  # (R, M, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # float32 at least
    logp = torch.log_softmax(logits, -1).gather(-1, comp_ids[..., None])[..., 0]  # (R, M)
    return logp * comp_mask


def cfg_for(**kw):
    base = grpo.Config(
        temperature=0.8, group_size=4, micro_batch=3, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0
    )
    return replace(base, **kw)


PROMPTS = [[1, 5, 9, 12, 7], [1, 30], [1, 4, 4, 8, 15, 16, 23, 42]]  # different lengths: left padding matters


def test_completion_logprobs_match_sampler_and_full_sequence():
    model = tiny_model()
    batch, sampling_logp = toy_batch(model, PROMPTS, G=3, M=10, temperature=0.7, seed=3)
    rows = list(range(9))
    rows_prompt = torch.tensor([r // 3 for r in rows])
    outs, grads = [], []
    # the packed path in float32 against the plain full-sequence path on a float64 copy of the model
    for scorer, m in (
        (logprobs.completion_logprobs, model),
        (full_sequence_logprobs, copy.deepcopy(model).double()),
    ):
        logp = scorer(m, PROMPTS, batch.comp_ids, batch.comp_mask, rows_prompt, 0.7)
        (logp * batch.comp_mask).sum().backward()
        outs.append(logp.detach())
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]))
    mask = batch.comp_mask.bool()
    # float32 rounding of sums over the hidden size and the vocabulary: 1e-5 absolute on log-probs of order 1-5,
    # and 1e-5 of the largest gradient entry (measured 2.6e-6); the embedding rows sum many positions' terms
    assert torch.allclose(outs[0][mask].double(), outs[1][mask], atol=1e-5)
    assert (grads[0].double() - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()
    # the sampler's log-probs came from softmax(logits / T) one token at a time: the recomputation must agree,
    # otherwise the ratio would not be 1 at the first step (the classic "forgot the temperature" bug)
    assert torch.allclose(outs[0][mask], sampling_logp[mask], atol=1e-4)
    assert (outs[0][~mask] == 0).all()
    # extra padding columns (masked) are cut before the forward pass and come back as zeros
    wide_ids = torch.nn.functional.pad(batch.comp_ids, (0, 5), value=2)
    wide_mask = torch.nn.functional.pad(batch.comp_mask, (0, 5))
    with torch.no_grad():
        wide = logprobs.completion_logprobs(model, PROMPTS, wide_ids, wide_mask, rows_prompt, 0.7)
    assert wide.shape == (9, 15) and (wide[:, 10:] == 0).all()
    assert torch.allclose(wide[:, :10], outs[0], atol=1e-6)


def test_pack_groups_hand_example():
    """Two prompts, three rows (lengths 3, 2, 2; rows 0 and 2 share prompt 0), packed by hand."""
    prompts = [[11, 12, 13], [21, 22]]
    comp = torch.tensor([[31, 32, 2, 0], [41, 2, 0, 0], [51, 2, 0, 0]])
    ids, pos, seg, index = logprobs.pack_groups(
        prompts, comp, torch.tensor([3, 2, 2]), torch.tensor([0, 1, 0])
    )
    # the last token of each row is never an input; pack 1 is padded to the length of pack 0
    assert ids.tolist() == [[11, 12, 13, 31, 32, 51], [21, 22, 41, 0, 0, 0]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 0, 0, 0]]
    assert seg.tolist() == [[0, 0, 0, 1, 1, 3], [0, 0, 2, -1, -1, -1]]  # 0 prompt, r + 1 row r, -1 padding
    mask = M.packed_attention_mask(seg)  # what the model builds from them, on their device
    # row 0: o_0 from the last prompt token (2), o_1 from 31 (3), o_2 from 32 (4); row 1 lives in pack 1 (+6)
    assert index.tolist() == [[2, 3, 4, 0], [7, 8, 0, 0], [2, 5, 0, 0]]
    assert mask.shape == (2, 1, 6, 6)
    assert mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 0, 0, 1],
    ]  # row 2's token sees the prompt, not row 0
    assert mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]  # padding sees only itself


def test_gradient_checkpointing_gives_the_same_gradient():
    model = tiny_model(seed=7)
    batch, _ = toy_batch(model, PROMPTS, G=2, M=6, temperature=1.0, seed=2)
    rows_prompt = torch.tensor([r // 2 for r in range(6)])
    grads = []
    for ckpt in (False, True):
        model.gradient_checkpointing = ckpt
        model.train()
        model.zero_grad()
        lp = logprobs.completion_logprobs(model, PROMPTS, batch.comp_ids, batch.comp_mask, rows_prompt, 1.0)
        (lp * batch.comp_mask).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)  # recomputation repeats the same float32 ops


def test_make_optimizer_is_adamw():
    """grpo.make_optimizer (fused AdamW) against AdamW written out in float64: 5 steps with weight decay."""
    cfg = cfg_for(lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()]
    opt = grpo.make_optimizer(params, cfg)
    assert opt.defaults["fused"]  # the memory-lean path, not silently the default
    ref = [p.detach().double().clone() for p in params]
    m = [torch.zeros_like(r) for r in ref]
    v = [torch.zeros_like(r) for r in ref]
    b1, b2, eps = 0.9, 0.99, 1e-8
    for t in range(1, 6):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
        for i, gr in enumerate(grads):
            gr = gr.double()
            ref[i] *= 1 - cfg.lr * cfg.weight_decay  # decoupled weight decay
            m[i] = b1 * m[i] + (1 - b1) * gr
            v[i] = b2 * v[i] + (1 - b2) * gr * gr
            m_hat, v_hat = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
            ref[i] -= cfg.lr * m_hat / (v_hat.sqrt() + eps)
    for p, r in zip(params, ref):
        assert (p.detach().double() - r).abs().max().item() < 1e-5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim; a no-op elsewhere")
def test_release_freed_memory_returns_held_heap_to_the_os():
    """glibc keeps freed blocks below its mmap threshold in the heap (RSS stays up); release_freed_memory hands them
    back. In a fresh process: 800 blocks of 1 MiB, every other one freed, so that the freed ones are holes between
    live ones (the heap top cannot shrink on its own)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import torch, memory
        def rss():
            return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
        t = torch.ones(4 * 2**20); del t        # a freed 16 MiB mmap raises glibc's mmap threshold to 16 MiB
        base = rss()
        blocks = [torch.ones(256 * 1024) for _ in range(800)]      # 1 MiB each: heap blocks now
        live = blocks[1::2]
        del blocks                                                 # frees the other 400
        held = rss() - base - 400
        memory.release_freed_memory()
        print(held, rss() - base - 400)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    held, after = map(float, out.split())
    assert held > 300  # the premise: free() alone kept the ~400 MB freed
    assert after < 100  # released (the live 400 MB stay)


def test_release_freed_memory_without_glibc_is_a_no_op(monkeypatch):
    def no_libc(name):
        raise OSError(f"{name}: not found")

    monkeypatch.setattr(memory, "_libc", None)
    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    memory.release_freed_memory()  # no error
    memory.keep_large_blocks_mapped()
    assert memory._libc is False


def test_non_finite_loss_skips_the_step():
    model = tiny_model(seed=8)
    batch, _ = toy_batch(model, PROMPTS[:1], G=2, M=5, temperature=1.0, seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    cfg = cfg_for(group_size=2, grad_clip=1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    hist = grpo.policy_update(
        model, None, opt, batch, torch.tensor([float("nan"), 1.0]), [0, 1], cfg, 0, 1, log=lambda *a: None
    )
    assert hist[0]["skipped"] == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # weights untouched
    assert not opt.state  # no Adam moments from NaNs


def test_one_step_raises_positive_and_lowers_negative_completion():
    model = tiny_model(seed=1)
    batch, _ = toy_batch(model, [PROMPTS[0]], G=2, M=8, temperature=1.0, seed=5)
    rows_prompt = torch.tensor([0, 0])

    def seq_logp():
        with torch.no_grad():
            lp = logprobs.completion_logprobs(
                model, batch.prompts, batch.comp_ids, batch.comp_mask, rows_prompt, 1.0
            )
        return (lp * batch.comp_mask).sum(1)  # (2,)

    before = seq_logp()
    cfg = cfg_for(group_size=2, lr=1e-3, micro_batch=2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    grpo.policy_update(model, None, opt, batch, torch.tensor([1.0, -1.0]), [0, 1], cfg, 0, 1)
    after = seq_logp()
    assert after[0] > before[0] + 1e-3  # positive advantage: more likely
    assert after[1] < before[1] - 1e-3  # negative advantage: less likely


def test_mu2_uses_stored_old_logprobs():
    model = tiny_model(seed=2)
    batch, _ = toy_batch(model, PROMPTS, G=4, M=8, temperature=0.8, seed=7)
    adv = torch.randn(12, generator=torch.Generator().manual_seed(0))
    cfg = cfg_for(mu=2, lr=3e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    hist = grpo.policy_update(model, None, opt, batch, adv, list(range(12)), cfg, 0, 2)
    assert len(hist) == 2
    # first inner iteration: old log-probs were computed by the same weights, ratio 1 up to float32 noise
    assert hist[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    # second: the weights moved but old log-probs did not, so the ratio departs from 1 (and the clip can act)
    assert abs(hist[1]["ratio_mean"] - 1.0) > 1e-3
    # mu = 1 on the same batch for contrast: old = logp.detach(), ratio exactly 1
    hist1 = grpo.policy_update(model, None, opt, batch, adv, list(range(12)), cfg_for(mu=1, lr=3e-2), 0, 1)
    assert hist1[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-12)


def test_lora_reference_is_base_and_only_adapters_train():
    model = tiny_model(seed=3)
    batch, _ = toy_batch(model, PROMPTS, G=2, M=6, temperature=1.0, seed=1)
    rows_prompt = torch.tensor([r // 2 for r in range(6)])
    with torch.no_grad():
        base_lp = logprobs.completion_logprobs(
            model, PROMPTS, batch.comp_ids, batch.comp_mask, rows_prompt, 1.0
        )
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    M.add_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    cfg = cfg_for(group_size=2, lora_rank=4, beta=0.1, lr=1e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    adv = torch.tensor([1.0, -1.0] * 3)
    for _ in range(3):
        hist = grpo.policy_update(model, None, opt, batch, adv, list(range(6)), cfg, 0, 3)
    assert hist[0]["kl"] > 0  # the policy moved away from the adapters-off reference
    with torch.no_grad(), M.adapters_off(model):
        ref_lp = logprobs.completion_logprobs(
            model, PROMPTS, batch.comp_ids, batch.comp_mask, rows_prompt, 1.0
        )
    assert torch.allclose(ref_lp, base_lp, atol=1e-6)  # adapters off == the untouched base weights
    # the merged layers hold W + scale * B A under the Hugging Face names
    merged = M.merge_lora(model, model.state_dict())
    assert set(merged) == set(base_state)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"], base_state["model.layers.0.self_attn.q_proj.weight"]
    )


def test_toy_task_reward_rises():
    # Toy task: the reward is the share of completion tokens below 16 (a quarter of the vocabulary at the start).
    # 30 seeded steps of 3 prompts x 8 completions must raise it well above the start.
    model = tiny_model(seed=4)
    cfg = cfg_for(group_size=8, micro_batch=12, lr=1e-2, max_new_tokens=8)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    means = []
    for step in range(30):
        batch, _ = toy_batch(model, PROMPTS, G=8, M=8, temperature=1.0, seed=step)
        m = batch.comp_mask
        reward = ((batch.comp_ids < 16).float() * m).sum(1) / m.sum(1)  # (24,)
        means.append(reward.mean().item())
        adv = grpo.group_advantages(reward, 8)
        grpo.policy_update(model, None, opt, batch, adv, list(range(24)), cfg, step, 30)
    first, last = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert last > first + 0.25, (first, last)


# ----------------------------------------------------------------------------------------------------------------
# main(): the whole loop on a tiny random model with the built-in tokenizer and the built-in data


def toy_reward(completion, record):
    """A reward_fn that gives a random model a signal: the share of ASCII letters among the characters (random
    tokens of a 49k vocabulary give anything from 0 to 1)."""
    letters = sum(c.isascii() and c.isalpha() for c in completion)
    return letters / max(1, len(completion)), {"letters": float(letters), "format": 0.0}


def run_args(model_dir, out, *extra):
    return [
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--batch-prompts",
        "2",
        "--group-size",
        "3",
        "--max-new-tokens",
        "6",
        "--max-prompt-tokens",
        "640",
        "--micro-batch",
        "4",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "1",
        "--no-progress",
        "--save-every",
        "100",
        *extra,
    ]


def read_metrics(path):
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
        for line in Path(path).read_text().splitlines()
    ]


def test_resume_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    grpo.main(
        run_args(tiny_dir, tmp_path / "full", "--steps", "4", "--mu", "2", "--beta", "0.05"),
        reward_fn=toy_reward,
    )
    grpo.main(
        run_args(
            tiny_dir, tmp_path / "cut", "--steps", "4", "--mu", "2", "--beta", "0.05", "--stop-after", "2"
        ),
        reward_fn=toy_reward,
    )
    assert len(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == 2
    grpo.main(
        run_args(tiny_dir, tmp_path / "cut", "--steps", "4", "--mu", "2", "--beta", "0.05", "--resume"),
        reward_fn=toy_reward,
    )
    full = read_metrics(tmp_path / "full" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert len(full) == 4 and resumed == full  # CPU, same seeds: bit-identical metrics
    assert full[-1]["grad_norm"] > 0  # the run really trained
    # the checkpoint is a Hugging Face directory our loader (and transformers) can read, state loads weights_only
    assert (tmp_path / "cut" / "checkpoint" / "model.safetensors").is_file()
    state = checkpoint.load_trainer_state(tmp_path / "cut" / "checkpoint")
    assert state["step"] == 4 and state["opt_step"] == 8
    m1 = Transformer.from_pretrained(tmp_path / "full" / "checkpoint")
    m2 = Transformer.from_pretrained(tmp_path / "cut" / "checkpoint")
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n


WORKER = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    sys.path.insert(0, {root!r})
    import distributed, grpo
    sys.path.insert(0, {tests!r})
    from test_grpo import tiny_model, toy_batch, toy_rollout, cfg_for, PROMPTS, toy_reward
    rank, world, _ = distributed.setup_distributed()
    # 1. the same fixed batch, split by groups over the ranks: loss and update equal the single process's.
    #    SGD, so the update is lr * gradient (Adam's first step, lr * sign(g), would magnify float noise).
    results = {{}}
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        model = tiny_model(seed=6)
        batch, _ = toy_batch(model, PROMPTS[:2], G=4, M=8, temperature=0.9, seed=11)
        adv = torch.randn(8, generator=torch.Generator().manual_seed(1))
        cfg = cfg_for(micro_batch=3, beta=0.0, loss_agg=agg, lr=0.1)
        if world > 1:
            sl = slice(rank * 4, rank * 4 + 4)
            batch = toy_rollout([PROMPTS[rank]], batch.comp_ids[sl], batch.comp_mask[sl])
            adv = adv[sl]
            distributed.shard(model, torch.float32)  # as grpo.main does under torchrun: FSDP2 sums the gradients
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        hist = grpo.policy_update(model, None, opt, batch, adv, list(range(len(adv))), cfg, 0, 1)
        full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in model.parameters()]
        flat = torch.cat([p.detach().reshape(-1) for p in full])
        results[agg] = {{"loss": hist[0]["loss"], "grad_norm": hist[0]["grad_norm"], "params": flat.tolist()}}
    if rank == 0:
        json.dump(results, open({result!r}, "w"))
    # 2. the whole loop under torchrun completes
    grpo.main(sys.argv[1:], reward_fn=toy_reward)
""")


def test_two_processes_match_single_process(tiny_dir, tmp_path):
    results = {}
    for nproc in (1, 2):
        result = tmp_path / f"result{nproc}.json"
        script = tmp_path / f"worker{nproc}.py"
        script.write_text(WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), result=str(result)))
        out = tmp_path / f"run{nproc}"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(nproc),
            str(script),
            *run_args(tiny_dir, out, "--steps", "2", "--batch-prompts", str(2 // nproc)),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[nproc] = json.loads(result.read_text())
        assert len(read_metrics(out / "metrics.jsonl")) == 2
        assert (out / "checkpoint" / "model.safetensors").is_file()
    for agg in results[1]:
        one, two = results[1][agg], results[2][agg]
        # same math, different summation order (gloo adds the ranks' partial gradients): float32 tolerances
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5, abs=1e-7), agg
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4), agg
        # SGD lr 0.1: a parameter moves by 0.1 * grad, so 1e-6 allows 1e-5 of gradient noise
        assert torch.allclose(torch.tensor(two["params"]), torch.tensor(one["params"]), atol=1e-6), agg


def test_sampler_mismatch_metrics_every_step_and_a_perturbation_shows(
    tiny_dir, tmp_path, monkeypatch, capsys
):
    """Every step logs how far the sampler's log-probs are from the trainer's recomputation: float32 round-off on
    CPU (the same model, two code paths), and 0.3 when the sampler's log-probs are shifted by 0.3 on purpose."""
    grpo.main(run_args(tiny_dir, tmp_path / "exact", "--steps", "2"), reward_fn=toy_reward)
    rows = read_metrics(tmp_path / "exact" / "metrics.jsonl")
    assert all(0 <= r["sampling/sampling_logp_difference/max"] < 1e-4 for r in rows)  # fp32 round-off only
    assert all(
        abs(r["sampling/importance_sampling_ratio/" + k] - 1) < 1e-4 for r in rows for k in ("min", "max")
    )
    assert (
        "sampler vs trainer log-probs: largest |difference|" in capsys.readouterr().out
    )  # end-of-run summary
    real_generate = grpo.generate

    def shifted(*args, **kw):
        ids, mask, logp = real_generate(*args, **kw)
        return ids, mask, logp + 0.3 * mask

    monkeypatch.setattr(grpo, "generate", shifted)
    grpo.main(
        run_args(tiny_dir, tmp_path / "shifted", "--steps", "1", "--tis-cap", "0.9"), reward_fn=toy_reward
    )
    row = read_metrics(tmp_path / "shifted" / "metrics.jsonl")[0]
    assert row["sampling/sampling_logp_difference/mean"] == pytest.approx(0.3, abs=1e-4)
    # trainer / sampler = exp(-0.3) = 0.741 on every token, under the 0.9 cap
    assert row["sampling/importance_sampling_ratio/mean"] == pytest.approx(math.exp(-0.3), rel=1e-4)


def test_mask_truncated_and_overlong_penalty(tiny_dir, tmp_path, monkeypatch):
    """--mask-truncated: only completions that ended (EOS or </answer>) enter the loss; --overlong-buffer: each
    completion's reward gains DAPO's penalty for its length, logged as the component 'overlong'."""
    from model import load_tokenizer

    real_generate = grpo.generate

    def some_end(*args, **kw):  # a random tiny model never samples EOS: make rows 0, 2, 4 end at token 3
        ids, mask, logp = (x.clone() for x in real_generate(*args, **kw))
        ids[0::2, 2], mask[0::2, 3:], logp[0::2, 3:] = kw["eos_token_ids"][0], 0.0, 0.0
        return ids, mask, logp

    monkeypatch.setattr(grpo, "generate", some_end)
    grpo.main(
        run_args(tiny_dir, tmp_path / "masked", "--steps", "2", "--mask-truncated"), reward_fn=toy_reward
    )
    for r in read_metrics(tmp_path / "masked" / "metrics.jsonl"):
        assert r["clipped_share"] == pytest.approx(0.5)  # rows 1, 3, 5 cut at 6 tokens
        assert r["kept_rows"] == 3 and r["skipped"] == 0  # of 2 prompts x 3 completions
    monkeypatch.setattr(grpo, "generate", real_generate)
    cfg = grpo.parse_args(run_args(tiny_dir, tmp_path / "x", "--overlong-buffer", "4", "--group-size", "4"))
    model, tok = Transformer.from_pretrained(tiny_dir), load_tokenizer(tiny_dir)
    import data

    records = data.synthetic_records("train", 2, seed=0)
    batch = grpo.sample_rollout(model, tok, records, cfg, toy_reward, seed=3)
    lengths = batch.comp_mask.sum(1).long().tolist()
    for r, (n, c) in enumerate(zip(lengths, batch.components)):
        penalty = max(-1.0, min(0.0, (6 - 4 - n) / 4))  # budget 6, buffer 4, by hand
        assert c["overlong"] == pytest.approx(penalty)
        base, _ = toy_reward(batch.prefills[r // 4] + batch.texts[r], records[r // 4])
        assert batch.rewards[r].item() == pytest.approx(base + penalty, abs=1e-6)
    assert any(c["overlong"] < 0 for c in batch.components)  # the penalty acted


def test_warm_up_is_the_nll_of_the_gold_completion(tiny_dir):
    """Stage 0 runs the GRPO update on one gold completion per prompt with advantage 1. Its logged nll equals the
    mean -log p of the gold tokens computed independently by transformers' own model on the full sequences (float32,
    a different summation order: 1e-5), its update is that mean's gradient (SGD, lr 1: the weights move by -grad),
    and one AdamW step raises the gold completions' log-probs."""
    from transformers import AutoModelForCausalLM

    import data
    from model import load_tokenizer

    tok = load_tokenizer(tiny_dir)
    cfg = grpo.parse_args(
        [
            "--stage",
            "0",
            "--max-prompt-tokens",
            "640",
            "--grad-clip",
            "0",
            "--micro-batch",
            "2",
            "--lr",
            "1",
            "--warmup-steps",
            "0",
            "--min-lr-ratio",
            "1",
        ]
    )  # policy_update sets the lr
    records = data.stage_records(data.synthetic_records("train", 20, seed=1), 0)[:3]
    gold = {records[0].id: "my own words</think><answer>no</answer>"}
    batch = grpo.gold_rollout(tok, records, cfg, gold, grpo.stage_reward_fn(0))
    assert batch.texts[0] == "my own words</think><answer>no</answer>"  # the file's completion wins
    assert batch.texts[1] == data.gold_completion(records[1]) and not batch.truncated.any()
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    nll_sum, n_tok = 0.0, 0
    for r in range(3):
        n = int(batch.comp_mask[r].sum())
        ids = torch.tensor([batch.prompts[r] + batch.comp_ids[r, :n].tolist()])
        logp = torch.log_softmax(hf(ids).logits[0, -n - 1 : -1].float(), -1)  # positions predicting the gold
        nll_sum = nll_sum - logp.gather(1, ids[0, -n:, None]).sum()
        n_tok += n
    nll = nll_sum / n_tok
    nll.backward()
    model = Transformer.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    hist = grpo.policy_update(model, None, opt, batch, torch.ones(3), [0, 1, 2], cfg, 0, 1)
    assert hist[0]["nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert hist[0]["ratio_mean"] == 1.0 and hist[0]["clip_frac"] == 0.0  # no clip at ratio 1
    theirs = dict(hf.named_parameters())
    pad = (
        hf.config.pad_token_id
    )  # transformers' nn.Embedding(padding_idx=pad) gives that row no input gradient,
    for name, p in model.named_parameters():  # though <|im_end|> (= pad here) is a real prompt token
        grad, ref = before[name] - p.detach(), theirs[name].grad
        if name == "model.embed_tokens.weight":
            grad, ref = torch.cat([grad[:pad], grad[pad + 1 :]]), torch.cat([ref[:pad], ref[pad + 1 :]])
        # float32 in a different order: 1e-4 of the largest entry (as the logit parity tests)
        assert (grad - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-9, name
    model = Transformer.from_pretrained(tiny_dir)
    rows_prompt = torch.arange(3)

    def gold_logp():
        with torch.no_grad():
            return (
                logprobs.completion_logprobs(
                    model, batch.prompts, batch.comp_ids, batch.comp_mask, rows_prompt, 1.0
                )
                * batch.comp_mask
            ).sum(1)  # (3,)

    start = gold_logp()
    grpo.policy_update(
        model,
        None,
        torch.optim.AdamW(model.parameters()),
        batch,
        torch.ones(3),
        [0, 1, 2],
        replace(cfg, lr=1e-3),
        0,
        1,
    )
    assert (gold_logp() > start + 1e-2).all()


def test_each_stage_starts_from_the_previous_stages_checkpoint(tmp_path):
    (tmp_path / "stage0" / "checkpoint").mkdir(parents=True)
    tiny_model().save_pretrained(tmp_path / "stage0" / "checkpoint")
    one = grpo.parse_args(["--stage", "1", "--out", str(tmp_path / "stage1")])
    two = grpo.parse_args(["--stage", "2", "--out", str(tmp_path / "stage2")])
    quiet = dict(resuming=False, log=lambda *a: None)
    assert checkpoint.resolve_init(one, **quiet) == str(tmp_path / "stage0" / "checkpoint")
    assert checkpoint.resolve_init(two, **quiet) == "builtin"  # no stage-1 checkpoint yet
    assert checkpoint.resolve_init(grpo.parse_args(["--stage", "0"]), **quiet) == "builtin"


def test_switches_run_and_checkpoint_loads_in_transformers(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "lora"
    hist = grpo.main(
        run_args(
            tiny_dir,
            out,
            "--steps",
            "2",
            "--lora-rank",
            "4",
            "--beta",
            "0.1",
            "--kl",
            "k2",
            "--grad-checkpoint",
            "--drop-zero-std-groups",
            "--loss-agg",
            "seq-mean-token-sum-norm",
            "--scale-rewards",
            "batch",
            "--dtype",
            "bfloat16",
            "--is-level",
            "sequence",
            "--clip-ratio-c",
            "3",
            "--tis-cap",
            "2",
        ),
        reward_fn=toy_reward,
    )
    assert len(hist) == 2 and all(math.isfinite(h["loss"]) for h in hist)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and {"completion", "reward", "components", "advantage"} <= set(samples[0])
    config = json.loads((out / "config.json").read_text())
    assert config["lora_rank"] == 4 and config["stage"] == 1
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out / "checkpoint")  # merged LoRA weights, HF names
    ours = Transformer.from_pretrained(out / "checkpoint", dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(hf.state_dict()[name].to(torch.bfloat16), ours.state_dict()[name])


def test_batch_metrics_hand_example():

    # 2 groups of G = 2: group 0 answerable (rewards 3, 1), group 1 unanswerable (rewards 2, 2 -> zero std).
    rewards = torch.tensor([3.0, 1.0, 2.0, 2.0])
    components = {"em": torch.tensor([0.5, 0.0, 0.0, 0.0]), "refused": torch.tensor([0.0, 1.0, 1.0, 0.0])}
    lengths = torch.tensor([10.0, 20.0, 30.0, 40.0])
    truncated = torch.tensor([False, False, False, True])
    answerable = torch.tensor([True, True, False, False])
    m = metrics.batch_metrics(lengths, rewards, components, truncated, answerable, G=2)
    assert m["reward_mean"] == pytest.approx(2.0)
    assert m["reward_std"] == pytest.approx(math.sqrt(2 / 3))  # unbiased: (1 + 1 + 0 + 0) / 3
    assert m["frac_reward_zero_std"] == pytest.approx(0.5)
    assert m["completion_len_mean"] == pytest.approx(25.0)
    assert m["clipped_share"] == pytest.approx(0.25)
    assert m["answer_right"] == pytest.approx(0.25)
    assert m["refused_answerable"] == pytest.approx(0.5)  # row 1 of rows 0, 1
    assert m["refused_unanswerable"] == pytest.approx(0.5)  # row 2 of rows 2, 3
    only_answerable = metrics.batch_metrics(
        lengths, rewards, components, truncated, torch.ones(4, dtype=torch.bool), 2
    )
    assert "refused_unanswerable" not in only_answerable and only_answerable["refused_answerable"] == 0.5


def test_stage_defaults_and_explicit_flags():
    zero = grpo.parse_args(["--stage", "0"])
    assert (zero.group_size, zero.temperature, zero.out) == (1, 1.0, "runs/stage0")  # one gold each, at T = 1
    assert zero.lr > grpo.parse_args(["--stage", "1"]).lr  # supervised: a larger lr
    for bad in (["--stage", "0", "--group-size", "4"], ["--stage", "1", "--gold", "x.jsonl"]):
        with pytest.raises(SystemExit):
            grpo.parse_args(bad)
    one, two = grpo.parse_args(["--stage", "1"]), grpo.parse_args(["--stage", "2"])
    assert (one.steps, one.batch_prompts, one.group_size, one.temperature, one.lr) == (8, 4, 8, 0.7, 1e-5)
    assert (two.steps, two.batch_prompts, two.group_size, two.temperature) == (30, 2, 16, 1.0)
    assert (
        one.batch_prompts * one.group_size == two.batch_prompts * two.group_size
    )  # same completions per step
    given = grpo.parse_args(["--stage", "2", "--group-size", "4", "--temperature", "0.5"])
    assert (given.batch_prompts, given.group_size, given.temperature) == (2, 4, 0.5)
    assert grpo.parse_args(["--stage", "1", "--steps", "3"]).steps == 3
    assert (one.out, two.out) == ("runs/stage1", "runs/stage2")


def test_training_prompt_is_the_eval_prompt_in_every_stage():
    """What grpo.py trains on (each stage, with and without --prompt-examples) is what eval.py builds for the same
    flag: the prompt without examples by default, both examples with --prompt-examples."""
    import data
    from model import ModelError, load_tokenizer

    try:
        tok = load_tokenizer(resolve_model_path("builtin"))
    except ModelError as e:
        pytest.skip(f"built-in tokenizer unavailable ({e}); run `make setup`")
    r = data.synthetic_records("train", 1, seed=0)[0]
    plain, _ = data.build_prompt(r, tok, worked_example=False)  # eval.py's prompt
    with_examples, _ = data.build_prompt(r, tok, refusal_example=True)  # eval.py --prompt-examples
    assert len(plain) < len(with_examples) / 2
    for stage in ("0", "1", "2"):
        for extra, expected in (([], plain), (["--prompt-examples"], with_examples)):
            cfg = grpo.parse_args(["--stage", stage, *extra])
            ids, prefill = data.training_prompt(r, tok, cfg.max_prompt_tokens, cfg.prompt_examples)
            assert ids == expected and prefill == "<think>"
            assert (data.REFUSAL_EXAMPLE["answer"] in tok.decode(ids)) == bool(extra)


def test_ref_flag_sets_the_kl_reference(tmp_path):
    """--ref loads the frozen reference from other weights than the policy's start (default: the start itself)."""
    start, other = tmp_path / "start", tmp_path / "other"
    tiny_model(seed=11).save_pretrained(start)
    tiny_model(seed=12).save_pretrained(other)
    device = torch.device("cpu")

    def first_weight(m):
        return m.model.embed_tokens.weight

    policy, ref = distributed.load_models(cfg_for(beta=0.1), str(start), str(start), device, "float32")
    assert torch.equal(first_weight(ref), first_weight(policy))
    policy, ref = distributed.load_models(
        cfg_for(beta=0.1, ref=str(other)), str(start), str(start), device, "float32"
    )
    assert torch.equal(first_weight(policy), first_weight(tiny_model(seed=11)))
    assert torch.equal(first_weight(ref), first_weight(tiny_model(seed=12)))
    assert not any(p.requires_grad for p in ref.parameters())
    for bad in (["--ref", str(other)], ["--ref", str(other), "--beta", "0.1", "--lora-rank", "4"]):
        with pytest.raises(SystemExit):
            grpo.parse_args(bad)


def test_bad_input_is_one_line_error(tiny_dir, tmp_path, capsys):
    """A wrong path, a reference with another vocabulary, a prompt over --max-prompt-tokens, or an --out holding a
    run (without --resume) ends the run with one line naming it, exit status 2, before any step."""
    small = tmp_path / "small_vocab"
    tiny_model(vocab=64).save_pretrained(small)
    done = tmp_path / "done"
    (done / "checkpoint").mkdir(parents=True)
    tiny_model().save_pretrained(done / "checkpoint")
    cut = tmp_path / "cut"  # a checkpoint whose optimizer files are missing
    shutil.copytree(tiny_dir, cut / "checkpoint")
    torch.save(
        dict(
            step=1,
            opt_step=1,
            data_pos=[0, 2],
            rng_torch=torch.get_rng_state(),
            rng_python=random.getstate(),
            lora={},
            config={},
        ),
        cut / "checkpoint" / "trainer_state.pt",
    )
    cases = [
        (
            tmp_path / "out",
            ["--ref", str(tmp_path / "nope"), "--beta", "0.1"],
            "nope: model directory not found",
        ),
        (tmp_path / "out", ["--data", str(tmp_path / "nope.json")], "nope.json: no such file"),
        (tmp_path / "out", ["--ref", str(small), "--beta", "0.1"], "its vocabulary has 64 tokens"),
        (tmp_path / "out", ["--max-prompt-tokens", "100"], "more than max_prompt_tokens=100"),
        (done, [], "holds an earlier run: pass --resume"),
        (cut, ["--resume"], "0 optimizer-R-of-N.safetensors files, not N"),
    ]
    for out, extra, expected in cases:
        with pytest.raises(SystemExit) as exc:
            grpo.cli(run_args(tiny_dir, out, "--steps", "1", *extra))
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2
        assert err[-1].startswith("grpo.py: error: ") and expected in err[-1], err
        assert not any("Traceback" in line for line in err)
        assert not (out / "metrics.jsonl").exists()  # stopped before the first step
    assert checkpoint.find_checkpoint(done) == done / "checkpoint"  # the earlier run is still there


@pytest.mark.parametrize(
    "flags, key",
    [
        (["--objective", "cispo"], "cispo_clip_ratio"),
        (["--objective", "sapo"], "sapo/gate_mean"),
        (["--tis-cap", "2", "--tis-min", "0.5", "--tis-mode", "mask", "--tis-level", "sequence"],
         "rollout_corr/rollout_rs_masked_fraction"),
        (["--off-policy-mask", "0.1"], "off_policy_mask/masked_fraction"),
    ],
)  # fmt: skip
def test_loss_options_from_the_command_line(tiny_dir, tmp_path, flags, key):
    """Each loss option reaches grpo_loss from its flag: its metric is logged, and the step trains."""
    hist = grpo.main(run_args(tiny_dir, tmp_path / "run", "--steps", "1", *flags), reward_fn=toy_reward)
    assert key in hist[0] and math.isfinite(hist[0][key]), hist[0]
    assert hist[0]["grad_norm"] > 0 and hist[0]["skipped"] == 0


def test_config_built_in_code_is_checked_and_resolved_like_the_command_line():
    """A Config built in code gets its stage's defaults and the same checks as the command line; "off" is None."""
    two = grpo.Config(stage=2)
    assert (two.steps, two.batch_prompts, two.group_size, two.temperature, two.lr) == (30, 2, 16, 1.0, 2e-5)
    assert two == grpo.parse_args(["--stage", "2"]) and two.out == "runs/stage2"
    assert grpo.Config(stage=2, group_size=4).group_size == 4  # given values win
    assert grpo.Config().tis_cap is None and grpo.Config().clip_ratio_c is None
    for bad in (dict(tis_cap=0.0), dict(tis_cap=-1.0), dict(clip_ratio_c=1.0), dict(stage=0, group_size=4),
                dict(kl="k4"), dict(tis_min=0.5), dict(objective="ppo"), dict(stage=0, tis_cap=2.0)):  # fmt: skip
        with pytest.raises(ValueError):
            grpo.Config(**bad)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in bad.items()]
        with pytest.raises(SystemExit):
            grpo.parse_args(flags)


def test_where_a_stage_starts_follows_its_own_run_name(tmp_path):
    """--out runs/expA-stage1 starts from runs/expA-stage0 (not from another experiment's runs/stage0); a name
    without stage<N> guesses nothing; a resume starts from what its config.json recorded, and a different --init
    then is an error."""
    for name in ("stage0", "expB-stage0"):
        (tmp_path / name / "checkpoint").mkdir(parents=True)
        tiny_model().save_pretrained(tmp_path / name / "checkpoint")
    quiet = dict(resuming=False, log=lambda *a: None)
    a = grpo.Config(stage=1, out=str(tmp_path / "expA-stage1"))
    assert checkpoint.resolve_init(a, **quiet) == "builtin"  # no expA-stage0: not stage0's weights
    b = grpo.Config(stage=1, out=str(tmp_path / "expB-stage1"))
    assert checkpoint.resolve_init(b, **quiet) == str(tmp_path / "expB-stage0" / "checkpoint")
    assert checkpoint.resolve_init(grpo.Config(stage=1, out=str(tmp_path / "mine")), **quiet) == "builtin"
    run = tmp_path / "expB-stage1"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"init_resolved": "/where/it/started"}))
    resumed = dict(resuming=True, log=lambda *a: None)
    assert checkpoint.resolve_init(b, **resumed) == "/where/it/started"
    with pytest.raises(M.ModelError, match="resume without --init"):
        checkpoint.resolve_init(replace(b, init="/somewhere/else"), **resumed)


def test_a_checkpoint_of_the_older_layout_is_a_one_line_error(tmp_path):
    """trainer_state.pt holding the whole optimizer state (before the per-rank shards) is refused in one line that
    says how to go on, not half-restored."""
    (tmp_path / "checkpoint").mkdir()
    torch.save({"step": 1, "optimizer": {}}, tmp_path / "checkpoint" / "trainer_state.pt")
    model = tiny_model()
    with pytest.raises(M.ModelError, match="--init") as e:
        checkpoint.restore_trainer_state(
            tmp_path / "checkpoint", model, torch.optim.AdamW(model.parameters())
        )
    assert "\n" not in str(e.value)


def test_gathered_reward_components_are_the_union_over_rows():
    """A reward function may give some rows a component others lack: every name is gathered, missing ones as 0."""
    rollout = toy_rollout([[1, 2]], torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
    rollout = replace(rollout, records=[data_record()], components=[{"a": 1.0}, {"b": 2.0}])
    gathered = grpo.gather_rollout(rollout)
    assert gathered["components"]["a"].tolist() == [1.0, 0.0] and gathered["components"]["b"].tolist() == [
        0.0,
        2.0,
    ]


def data_record():
    import data

    return data.synthetic_records("train", 1, seed=0)[0]


def test_training_and_eval_holdout_take_complementary_parts(tiny_dir, tmp_path, capsys):
    """grpo.py --holdout trains on what eval.py --holdout does not score, and nothing of it; stage 1 keeps the
    answerable part of the training side only; --mix natural takes all of that side, its own share unanswerable."""
    import data

    rows = []
    for i in range(20):
        found = int(i % 4 != 0)  # 15 answerable, 5 not
        doc = {"title": "t", "text": f"a{i} here", "answers_found": [found]}
        rows.append({"id": f"q{i}", "question": f"q{i}?", "answers": [[f"a{i}"]], "docs": [doc]})
    path = tmp_path / "qampari_like.json"
    path.write_text(json.dumps(rows))
    held = {r.id for r in E.load_eval_records(str(path), holdout=0.4)}
    assert len(held) == round(0.4 * 15) + round(0.4 * 5)
    for stage in (0, 1, 2):
        train = {r.id for r in data.training_records(str(path), 0.4, stage, 0, "balanced")}
        assert train and not train & held
    assert len(data.training_records(str(path), 0.4, 1, 0, "balanced")) == 15 - 6
    assert {r.id for r in data.training_records(str(path), 0.0, 1, 0, "balanced")} == {
        f"q{i}" for i in range(20) if i % 4
    }
    for stage in (0, 2):
        natural = data.training_records(str(path), 0.4, stage, 0, "natural")
        assert len(natural) == 20 - len(held) and sum(not r.answerable for r in natural) == 5 - 2
    # the flags reach the selection: stage 2 on the 12 records of the training side, not the balanced 6
    flags = ("--stage", "2", "--data", str(path), "--holdout", "0.4", "--mix", "natural", "--steps", "1")
    grpo.main(run_args(tiny_dir, tmp_path / "run", *flags), reward_fn=toy_reward)
    assert f"[data] {path}: 12 records" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mix"):
        grpo.Config(stage=1, mix="natural")
    for bad in (dict(holdout=0.5), dict(data=str(path), holdout=1.0), dict(data=str(path), holdout=-0.1)):
        with pytest.raises(ValueError, match="holdout"):
            grpo.Config(**bad)
    for spec, share in (("builtin", 0.5), (str(path), 1.0)):  # eval.py: one line, no traceback
        with pytest.raises(SystemExit, match="holdout"):
            E.load_eval_records(spec, holdout=share)
