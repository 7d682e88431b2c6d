"""One GRPO step of this project's trainer (grpo.py) against TRL's GRPOTrainer, on CPU, same work.

Both trainers get the same model (the built-in SmolLM2-135M-Instruct, float32, from builtin.builtin_model_dir()), the
same prompts in the same order (the synthetic stage-1 task, data.training_prompt; TRL gets that prompt as text, and we
check it tokenizes back to the same ids), the same reward (rewards.stage_reward on prefill + completion), the same
G, max new tokens, temperature, top-p, beta > 0 (so both hold a frozen reference model and run it every step),
k3 KL, clip range, learning rate (constant), AdamW betas, gradient clipping, reward scaling and loss aggregation:

    --loss-agg token-mean              <-> TRL loss_type="dapo"
    --loss-agg seq-mean-token-mean     <-> TRL loss_type="grpo"
    --loss-agg seq-mean-token-sum-norm <-> TRL loss_type="dr_grpo"

One step = sample B*G completions, score them, advantages, reference log-probs, policy log-probs, loss, backward,
clip, AdamW. Ours is grpo.py's own functions (sample_rollout, group_advantages, policy_update: what grpo.main runs
per step, minus logging and checkpoints); TRL's is one iteration of Trainer.train(), timed from on_step_begin to
on_step_end (generation, rewards, reference, loss, backward, optimizer step all fall between the two).

Time: the two trainers live in two worker processes that stay loaded; this process tells them to take one step each,
alternating (ours-TRL, then TRL-ours, ...), so load from other people on this shared machine hits both alike. The
first --warmup steps of each are not counted; the median of the rest is reported.
Memory: each worker reports its own resident-memory high-water mark (VmHWM from /proc/self/status), so the two
peaks are separate; also RSS after the imports, so library overhead can be told apart from training memory.
Loss check (first, in its own process; --no-parity skips it): one batch of completions sampled by our sampler, with the same
advantages, old log-probs and reference log-probs (perturbed so ratios clip and KL != 0), goes through grpo_loss
(log-probs from our model) and through TRL's GRPOTrainer._compute_loss (log-probs from transformers' model); we
compare the losses, the per-token log-probs and the gradient norms, for all three aggregations.

Workers run torch with --threads 1 by default (see its help: on this shared machine two threads per process were
an order of magnitude slower on small ops); both trainers always get the same thread count.

Run (sets up .venv-bench itself):  make bench-trl     (15 minutes on the shared 2-core machine, loss check included)
or:  .venv-bench/bin/python bench/vs_trl.py [--steps 3 --warmup 1 --prompts 2 --group-size 4 --max-new-tokens 64]
Results: bench/README-vs-trl.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

AGG_TO_TRL = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}
MSG = "@@bench "  # prefix of the lines a worker sends back; everything else on its stdout is ignored


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--prompts", type=int, default=2, help="prompts per step (B)")
    p.add_argument("--group-size", type=int, default=4, help="completions per prompt (G)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--beta", type=float, default=0.04, help="KL weight (> 0: both keep a reference model)")
    p.add_argument("--lr", type=float, default=4e-5, help="constant learning rate (AdamW, betas 0.9 / 0.99)")
    p.add_argument("--loss-agg", default="token-mean", choices=list(AGG_TO_TRL))
    p.add_argument("--steps", type=int, default=3, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per trainer before them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ours-stop",
        choices=["on", "off"],
        default="off",
        help="our sampler's stop string </answer> (TRL's transformers sampler has none): 'off' makes both "
        "sample until EOS or --max-new-tokens, the same work; 'on' is our trainer as shipped",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (0 = torch's default, one per core). 1 by default: on a shared, "
        "oversubscribed machine every multi-threaded op waits for its descheduled partner thread "
        "(a 8x576x1536 matmul measured 10 ms with 2 threads vs 1.3 ms with 1 under load)",
    )
    p.add_argument(
        "--phases",
        action="store_true",
        help="also report, for every step, RSS at the end of each phase (generation, old/ref log-probs, "
        "forward, backward, optimizer) and the peak within it: where the peak is. Resets the "
        "kernel's high-water mark at each phase end; the overall peak is the max over the phases",
    )
    p.add_argument("--no-parity", action="store_true", help="skip the loss check")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--worker", choices=["ours", "trl", "parity"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.beta <= 0:
        p.error("--beta must be > 0 (the comparison includes the reference model)")
    return args


# ----------------------------------------------------------------------------------------------------------------
# Shared by the workers: memory readings, the message channel, the settings, the prompts


def rss_mb():
    """(current RSS, peak RSS) of this process in MB, from /proc/self/status (kB)."""
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


class Phases:
    """--phases: (phase, RSS at its end, peak RSS within it) for every phase of a step. Writing 5 to
    /proc/self/clear_refs resets VmHWM to the current RSS, so VmHWM read at the end of a phase is the peak within
    that phase alone; `peak` keeps the max over all phases (the process's peak, which VmHWM no longer holds)."""

    def __init__(self, enabled):
        self.enabled, self.rows, self.peak = enabled, [], 0.0

    def mark(self, name):
        if not self.enabled:
            return
        rss, hwm = rss_mb()
        self.rows.append((name, rss, hwm))
        self.peak = max(self.peak, hwm)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def take(self):
        rows, self.rows = self.rows, []
        return rows

    def overall_peak(self):
        return max(self.peak, rss_mb()[1])


def set_threads(args):
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return torch.get_num_threads()


def send(**msg):
    print(MSG + json.dumps(msg), flush=True)


def wait_go():
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(0)  # the parent closed stdin or said stop


def our_config(args):
    """grpo.Config with the comparison's settings; the rest are the trainer's defaults."""
    import grpo

    B, G = args.prompts, args.group_size
    return grpo.Config(
        stage=1,
        group_size=G,
        batch_prompts=B,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        lr=args.lr,
        warmup_steps=0,
        min_lr_ratio=1.0,
        weight_decay=0.0,
        beta=args.beta,
        kl="k3",
        eps_low=0.2,
        eps_high=0.28,
        loss_agg=args.loss_agg,
        scale_rewards="group",
        mu=1,
        micro_batch=B * G,
        grad_clip=1.0,
        dtype="float32",
        seed=args.seed,
    )


def trl_config(args, out_dir, max_steps):
    """GRPOConfig with the same settings. One step = one generation batch of B prompts x G completions = one
    optimizer step (per_device_train_batch_size = B*G, no accumulation, steps_per_generation 1, mu = 1)."""
    from trl import GRPOConfig

    B, G = args.prompts, args.group_size
    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
        max_steps=max_steps,
        per_device_train_batch_size=B * G,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=G,
        num_iterations=1,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        top_p=1.0,
        top_k=0,
        beta=args.beta,
        epsilon=0.2,
        epsilon_high=0.28,
        loss_type=AGG_TO_TRL[args.loss_agg],
        scale_rewards="group",
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.99,
        max_grad_norm=1.0,
        gradient_checkpointing=False,  # TRL's default is True; ours is off by default: the same for both
        model_init_kwargs={"dtype": "float32"},
        log_completions=False,
        # TRL 1.13 multiplies the KL term by the importance ratio by default (use_bias_correction_kl=True), which
        # changes the KL gradient even on-policy. Off here so both optimize the same objective (plain k3 KL);
        # the loss check below reports TRL's default too.
        use_bias_correction_kl=False,
    )


def step_records(args, tokenizer):
    """The records of every step, in the order our trainer takes them (data.next_records), with their prompts.
    -> (records, prompt_ids, prefills), flat: step k uses entries [k*B:(k+1)*B]."""
    from data import load_data, next_records, stage_records, training_prompt

    pool = stage_records(load_data("builtin", split="train", seed=args.seed), 1, args.seed)
    records, _ = next_records(pool, [0, 0], (args.warmup + args.steps) * args.prompts, args.seed)
    built = [
        training_prompt(r, tokenizer, our_config(args).max_prompt_tokens) for r in records
    ]  # as grpo.main
    return records, [ids for ids, _ in built], [pre for _, pre in built]


def set_stop(args):
    """--ours-stop off: a stop string that never occurs. Our sampler still pays for checking it every token."""
    import data

    if args.ours_stop == "off":
        data.STOP_STRINGS[:] = ["\x00never\x00"]


# ----------------------------------------------------------------------------------------------------------------
# Worker: our trainer. The minimal glue around grpo.py's functions (what grpo.main does each step).


def worker_ours(args):
    import torch

    rss_imports = rss_mb()[0]
    import grpo
    from builtin import builtin_model_dir
    from model import load_tokenizer

    threads = set_threads(args)
    set_stop(args)
    path = builtin_model_dir()
    cfg = our_config(args)
    import distributed

    model, reference = distributed.load_models(cfg, path, path, torch.device("cpu"), "float32")
    tokenizer = load_tokenizer(path)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = grpo.make_optimizer(params, cfg)  # as main()
    records, _, _ = step_records(args, tokenizer)
    B, G = args.prompts, args.group_size
    total = args.warmup + args.steps
    phases = Phases(args.phases)
    if args.phases:
        hook_phases_ours(grpo, optimizer, phases)
    send(
        kind="ready", rss_imports=rss_imports, rss_setup=rss_mb()[0], torch=torch.__version__, threads=threads
    )
    for step in range(total):
        wait_go()
        phases.mark("between steps")
        t0 = time.perf_counter()
        batch = grpo.sample_rollout(
            model, tokenizer, records[step * B : (step + 1) * B], cfg, grpo.stage_reward_fn(1), seed=step
        )
        t_sample = time.perf_counter() - t0
        phases.mark("generation + reward")
        advantages = grpo.group_advantages(batch.rewards, G, cfg.scale_rewards)
        hist = grpo.policy_update(
            model,
            reference,
            optimizer,
            batch,
            advantages,
            list(range(B * G)),
            cfg,
            step,
            total,
            log=lambda *a, **k: None,
        )
        dt = time.perf_counter() - t0
        phases.mark("end of step (grads freed)")
        send(
            kind="step",
            step=step,
            time=dt,
            sample_time=t_sample,
            tokens=batch.comp_mask.sum().item(),
            reward=batch.rewards.mean().item(),
            loss=hist[-1]["loss"],
            kl=hist[-1]["kl"],
            phases=phases.take(),
        )
    rss, peak = rss_mb()
    send(kind="done", rss_end=rss, peak=phases.overall_peak() if args.phases else peak)


def hook_phases_ours(grpo, optimizer, phases):
    """Phase ends inside grpo.policy_update, without changing it: its module-level helpers are wrapped, and the
    optimizer's step hooks mark the end of backward (+ clipping) and of the AdamW step."""
    import torch

    completion_logprobs, grpo_loss = grpo.completion_logprobs, grpo.grpo_loss

    def marked_completion_logprobs(*a, **k):
        out = completion_logprobs(*a, **k)
        if not torch.is_grad_enabled():  # the reference's (or old policy's) pass, not the policy's forward
            phases.mark("old/ref log-probs (no grad)")
        return out

    def marked_grpo_loss(*a, **k):
        out = grpo_loss(*a, **k)
        phases.mark("forward + loss")
        return out

    grpo.completion_logprobs, grpo.grpo_loss = marked_completion_logprobs, marked_grpo_loss
    optimizer.register_step_pre_hook(lambda *a: phases.mark("backward + grad clip"))
    optimizer.register_step_post_hook(lambda *a: phases.mark("optimizer step"))


# ----------------------------------------------------------------------------------------------------------------
# Worker: TRL. Same prompts as text, same reward; a callback holds each step until the parent says go.


def worker_trl(args):
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    rss_imports = rss_mb()[0]
    from builtin import builtin_model_dir
    from model import load_tokenizer
    from rewards import stage_reward

    threads = set_threads(args)
    path = builtin_model_dir()
    tokenizer = load_tokenizer(path)
    records, prompt_ids, prefills = step_records(args, tokenizer)
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    same = all(
        tokenizer(t)["input_ids"] == ids for t, ids in zip(texts, prompt_ids)
    )  # how TRL tokenizes text
    dataset = Dataset.from_list([{"prompt": t, "idx": i} for i, t in enumerate(texts)])

    def reward(prompts, completions, idx, **kwargs):
        return [stage_reward(prefills[i] + c, records[i], 1)[0] for c, i in zip(completions, idx)]

    class StepClock(TrainerCallback):
        t0 = dt = None

        def on_step_begin(self, a, state, control, **kw):
            wait_go()
            phases.mark("between steps")
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, a, state, control, **kw):
            phases.mark("backward + grad clip")

        def on_optimizer_step(self, a, state, control, **kw):
            phases.mark("optimizer step")

        def on_step_end(self, a, state, control, **kw):
            self.dt = time.perf_counter() - self.t0
            phases.mark("end of step")

        def on_log(self, a, state, control, logs=None, **kw):
            if self.dt is None or logs is None or "loss" not in logs:
                return
            n = args.prompts * args.group_size
            send(
                kind="step",
                step=state.global_step - 1,
                time=self.dt,
                sample_time=gen_time.pop(),
                reward=logs.get("reward"),
                tokens=logs.get("completions/mean_length", float("nan")) * n,
                loss=logs.get("loss"),
                kl=logs.get("kl"),
                phases=phases.take(),
            )
            self.dt = None

    import tempfile

    phases = Phases(args.phases)
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.GRPOTrainer(
            model=path,
            reward_funcs=reward,
            args=trl_config(args, out, args.warmup + args.steps),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[StepClock()],
        )
        gen_time = []  # TRL's sampling (tokenize + generate) time, for the breakdown only
        generate = trainer._generate

        def timed_generate(*a, **k):
            t = time.perf_counter()
            result = generate(*a, **k)
            gen_time.append(time.perf_counter() - t)
            phases.mark("generation")
            return result

        trainer._generate = timed_generate
        if args.phases:
            hook_phases_trl(trainer, phases)
        send(
            kind="ready",
            rss_imports=rss_imports,
            rss_setup=rss_mb()[0],
            trl=trl.__version__,
            transformers=transformers.__version__,
            torch=torch.__version__,
            same_prompt_ids=same,
            prompt_tokens=[len(ids) for ids in prompt_ids],
            threads=threads,
        )
        trainer.train()
    rss, peak = rss_mb()
    send(kind="done", rss_end=rss, peak=phases.overall_peak() if args.phases else peak)


def hook_phases_trl(trainer, phases):
    """Phase ends inside TRL's step besides the callbacks: after generation, rewards and the no-grad old /
    reference log-probs (_generate_and_score_completions), and after the loss forward (compute_loss)."""
    score, compute_loss = trainer._generate_and_score_completions, trainer.compute_loss

    def marked_score(*a, **k):
        out = score(*a, **k)
        phases.mark("rewards + old/ref log-probs (no grad)")
        return out

    def marked_compute_loss(*a, **k):
        out = compute_loss(*a, **k)
        phases.mark("forward + loss")
        return out

    trainer._generate_and_score_completions, trainer.compute_loss = marked_score, marked_compute_loss


# ----------------------------------------------------------------------------------------------------------------
# Worker: the loss check. One batch, identical inputs, both loss computations.


def worker_parity(args):
    import tempfile

    import torch
    import trl

    import grpo
    import logprobs as model_lib
    from builtin import builtin_model_dir
    from model import load_tokenizer
    from sampler import left_pad

    set_threads(args)
    set_stop(args)
    path = builtin_model_dir()
    cfg = our_config(args)
    B, G = args.prompts, args.group_size
    import distributed

    model, _ = distributed.load_models(cfg, path, path, torch.device("cpu"), "float32")
    tokenizer = load_tokenizer(path)
    records, prompt_ids, _ = step_records(args, tokenizer)
    # the inputs: completions from our sampler for the first step's prompts
    batch = grpo.sample_rollout(model, tokenizer, records[:B], cfg, grpo.stage_reward_fn(1), seed=0)
    R, M = batch.comp_ids.shape
    mask = batch.comp_mask  # (R, M) float
    adv = grpo.group_advantages(batch.rewards, G, "group")  # (R,)
    adv_source = "group advantages of the sampled rewards"
    if not adv.abs().sum() > 0:  # every group had equal rewards: A = 0 makes every loss 0, a useless check
        adv = torch.randn(R, generator=torch.Generator().manual_seed(1))
        adv_source = "seeded N(0,1) (all sampled groups had equal rewards)"
    rows_prompt = torch.arange(B).repeat_interleave(G)
    prompts = batch.prompts
    with torch.no_grad():
        logp0 = model_lib.completion_logprobs(
            model, prompts, batch.comp_ids, mask, rows_prompt, cfg.temperature
        )
    # old and reference log-probs: the policy's, moved by seeded noise so that ratios leave the clip range and KL > 0
    g = torch.Generator().manual_seed(2)
    old = (logp0 + 0.25 * torch.randn(R, M, generator=g)) * mask
    ref = (logp0 + 0.5 * torch.randn(R, M, generator=g)) * mask

    # TRL's inputs: left-padded prompt per row, completions cut to the longest one (TRL's own layout)
    Mx = int(mask.sum(1).max())
    p_ids, p_mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
    inputs = {
        "prompt_ids": p_ids[rows_prompt],
        "prompt_mask": p_mask[rows_prompt].long(),
        "completion_ids": batch.comp_ids[:, :Mx],
        "completion_mask": mask[:, :Mx].long(),
        "advantages": adv,
        "num_items_in_batch": mask.sum(),
        "old_per_token_logps": old[:, :Mx],
        "ref_per_token_logps": ref[:, :Mx],
    }
    results = []
    with tempfile.TemporaryDirectory() as out:
        trainer = trl.GRPOTrainer(
            model=path,
            reward_funcs=lambda completions, **k: [0.0] * len(completions),
            args=trl_config(args, out, 1),
            train_dataset=_dummy_dataset(),
            processing_class=tokenizer,
        )
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); read by _compute_loss
        hf = trainer.model
        hf.train()
        with torch.no_grad():
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            att = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            trl_logp, _, _ = trainer._get_per_token_logps_and_entropies(hf, ids, att, Mx)
        trl_logp_full = torch.zeros(R, M)
        trl_logp_full[:, :Mx] = trl_logp * mask[:, :Mx]
        logp_diff = ((trl_logp - logp0[:, :Mx]).abs() * mask[:, :Mx]).max().item()
        prompt_same = all(trainer._tokenize_prompts([tokenizer.decode(p)])[0][0] == p for p in prompts)
        for agg, loss_type in AGG_TO_TRL.items():
            model.zero_grad(set_to_none=True)
            logp = model_lib.completion_logprobs(
                model, prompts, batch.comp_ids, mask, rows_prompt, cfg.temperature
            )
            ours, m = grpo.grpo_loss(
                logp, old, ref, adv, mask, eps_low=0.2, eps_high=0.28, beta=args.beta, kl="k3", agg=agg
            )
            ours.backward()
            # our loss formula on TRL's log-probs: separates the formula from the two models' numerics
            ours_on_trl, _ = grpo.grpo_loss(
                trl_logp_full,
                old,
                ref,
                adv,
                mask,
                eps_low=0.2,
                eps_high=0.28,
                beta=args.beta,
                kl="k3",
                agg=agg,
            )
            g_ours = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item()
            trainer.loss_type = loss_type
            trl_loss, trl_grad = {}, {}
            for bias_correction in (False, True):  # False: the setting timed below; True: TRL's default
                trainer.args.use_bias_correction_kl = bias_correction
                hf.zero_grad(set_to_none=True)
                theirs = trainer._compute_loss(hf, inputs)
                theirs.backward()
                trl_loss[bias_correction] = theirs.item()
                trl_grad[bias_correction] = torch.nn.utils.clip_grad_norm_(
                    hf.parameters(), float("inf")
                ).item()
            trainer.args.use_bias_correction_kl = False
            results.append(
                dict(
                    agg=agg,
                    trl_loss_type=loss_type,
                    ours=ours.item(),
                    trl=trl_loss[False],
                    trl_default_bias_corr_kl=trl_loss[True],
                    ours_formula_on_trl_logp=ours_on_trl.item(),
                    grad_norm_ours=g_ours,
                    grad_norm_trl=trl_grad[False],
                    grad_norm_trl_default=trl_grad[True],
                    clip_frac=m["clip_frac"].item(),
                    kl=m["kl"].item(),
                )
            )
    send(
        kind="parity",
        rows=R,
        max_new_tokens=M,
        completion_tokens=mask.sum().item(),
        adv_source=adv_source,
        logp_max_abs_diff=logp_diff,
        prompt_ids_same=prompt_same,
        results=results,
    )


def _dummy_dataset():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "x"}])


# ----------------------------------------------------------------------------------------------------------------
# The parent: start the workers, alternate their steps, summarize


class Worker:
    def __init__(self, name, args, log_dir):
        self.name = name
        self.log = open(os.path.join(log_dir, f"{name}.log"), "w")
        argv = [sys.executable, os.path.abspath(__file__), "--worker", name] + sys.argv[1:]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT
        )

    def read(self):
        for line in self.proc.stdout:
            if line.startswith(MSG):
                return json.loads(line[len(MSG) :])
        self.proc.wait()
        raise RuntimeError(f"worker {self.name} exited ({self.proc.returncode}); see {self.log.name}")

    def step(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_parity(args, log_dir):
    w = Worker("parity", args, log_dir)
    res = w.read()
    w.close()
    print(
        f"\n[loss check] {res['rows']} completions ({res['completion_tokens']:.0f} tokens) from our sampler; "
        f"advantages: {res['adv_source']}; old / reference log-probs = the policy's + seeded noise"
    )
    print(
        f"  per-token log-probs, our model vs transformers' (TRL's path): max |diff| = "
        f"{res['logp_max_abs_diff']:.2e}; TRL tokenizes the prompt text back to our ids: {res['prompt_ids_same']}"
    )
    print("  TRL = use_bias_correction_kl=False (as timed); TRL default = True (KL term times the ratio)")
    print(
        f"  {'aggregation':24s}{'TRL loss_type':>14s}{'ours':>11s}{'TRL':>11s}{'rel diff':>10s}"
        f"{'ours on TRL logp':>17s}{'TRL default':>12s}{'|grad| ours':>12s}{'|grad| TRL':>11s}{'TRL default':>12s}"
    )
    for r in res["results"]:
        rel = abs(r["ours"] - r["trl"]) / max(abs(r["trl"]), 1e-12)
        print(
            f"  {r['agg']:24s}{r['trl_loss_type']:>14s}{r['ours']:11.6f}{r['trl']:11.6f}{rel:10.2e}"
            f"{r['ours_formula_on_trl_logp']:17.6f}{r['trl_default_bias_corr_kl']:12.6f}"
            f"{r['grad_norm_ours']:12.5f}{r['grad_norm_trl']:11.5f}{r['grad_norm_trl_default']:12.5f}"
        )
    print(
        f"  (clip fraction {res['results'][0]['clip_frac']:.3f}, KL {res['results'][0]['kl']:.4f} in these inputs)"
    )
    return res


def run_timing(args, log_dir):
    workers = {}
    ready = {}
    for name in ("ours", "trl"):  # loaded one after the other; loading is not timed
        workers[name] = Worker(name, args, log_dir)
        ready[name] = workers[name].read()
        print(f"[{name}] loaded: RSS {ready[name]['rss_setup']:.0f} MB", flush=True)
    if not ready["trl"]["same_prompt_ids"]:
        print("[warn] TRL's tokenization of the prompt text differs from our prompt ids")
    steps = {"ours": [], "trl": []}
    for k in range(args.warmup + args.steps):
        order = ("ours", "trl") if k % 2 == 0 else ("trl", "ours")  # alternate who goes first
        for name in order:
            r = workers[name].step()
            steps[name].append(r)
            tag = "warm-up" if k < args.warmup else "timed"
            print(
                f"[{name}] step {k} ({tag}): {r['time']:.2f} s (sampling {r['sample_time']:.2f} s), "
                f"{r['tokens']:.0f} completion tokens, "
                f"reward {r['reward']:.3f}, loss {r['loss']:.4f}",
                flush=True,
            )
            for phase, rss, peak in r.get("phases", []):
                print(f"    {phase:40s} RSS at its end {rss:7.0f} MB, peak within it {peak:7.0f} MB")
    done = {}
    for name, w in workers.items():
        done[name] = w.read()  # after its last step each worker reports its peak and exits
        w.close()
    return ready, steps, done


def summarize(args, ready, steps, done, parity):
    med = {n: statistics.median(r["time"] for r in steps[n][args.warmup :]) for n in steps}
    med_sample = {n: statistics.median(r["sample_time"] for r in steps[n][args.warmup :]) for n in steps}
    tok = {n: statistics.mean(r["tokens"] for r in steps[n][args.warmup :]) for n in steps}
    rows = []
    for n, label in (("ours", "ours (grpo.py)"), ("trl", f"TRL {ready['trl']['trl']} GRPOTrainer")):
        times = ", ".join(f"{r['time']:.1f}" for r in steps[n][args.warmup :])
        rows.append(
            (
                label,
                med[n],
                med_sample[n],
                times,
                tok[n],
                tok[n] / med[n],
                done[n]["peak"],
                ready[n]["rss_imports"],
                done[n]["peak"] - ready[n]["rss_imports"],
            )
        )
    print("\n" + "=" * 100)
    print(
        f"settings: {args.prompts} prompts x G={args.group_size}, max new tokens {args.max_new_tokens}, "
        f"T={args.temperature}, top-p 1.0, beta={args.beta} (k3), eps 0.2/0.28, lr {args.lr} constant, "
        f"loss {args.loss_agg} (TRL {AGG_TO_TRL[args.loss_agg]}), fp32, CPU, {os.cpu_count()} cores, "
        f"our stop string {args.ours_stop}, {ready['ours']['threads']} torch thread(s) per worker; "
        f"{args.warmup} warm-up + {args.steps} timed steps each, alternating"
    )
    print(
        f"versions: torch {ready['trl']['torch']}, transformers {ready['trl']['transformers']}, "
        f"trl {ready['trl']['trl']}; prompt tokens {ready['trl']['prompt_tokens']}"
    )
    print(
        f"{'trainer':28s}{'median s/step':>14s}{'(sampling)':>11s}  {'timed steps (s)':22s}{'compl tok/step':>15s}"
        f"{'tok/s':>7s}{'peak RSS MB':>12s}{'after imports':>14s}{'peak - imports':>15s}"
    )
    for label, m, ms, times, t, tps, peak, imp, extra in rows:
        print(
            f"{label:28s}{m:14.2f}{ms:11.2f}  {times:22s}{t:15.1f}{tps:7.2f}{peak:12.0f}{imp:14.0f}{extra:15.0f}"
        )
    ratio_t = med["ours"] / med["trl"]
    ratio_m = done["ours"]["peak"] / done["trl"]["peak"]
    ratio_x = rows[0][8] / rows[1][8]
    print(
        f"ratio ours / TRL: step time {ratio_t:.3f} (TRL {1 / ratio_t:.2f}x slower), peak RSS {ratio_m:.3f}, "
        f"peak above imports {ratio_x:.3f}; completion tokens/s {rows[0][5] / rows[1][5]:.2f}x"
    )
    print(
        f"targets: step time ours >= 2x faster: {'met' if ratio_t <= 0.5 else 'NOT met'}; "
        f"peak memory <= 0.5x: {'met' if ratio_m <= 0.5 else 'NOT met'}"
    )
    print("=" * 100)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    args=vars(args),
                    ready=ready,
                    steps=steps,
                    done=done,
                    parity=parity,
                    median_step_s=med,
                    ratio_step_time=ratio_t,
                    ratio_peak_rss=ratio_m,
                ),
                f,
                indent=2,
            )


def main():
    import tempfile

    log_dir = tempfile.mkdtemp(prefix="vs_trl-")
    print(f"[bench] worker logs in {log_dir}", flush=True)
    parity = None if ARGS.no_parity else run_parity(ARGS, log_dir)
    ready, steps, done = run_timing(ARGS, log_dir)
    summarize(ARGS, ready, steps, done, parity)


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.worker == "ours":
        worker_ours(ARGS)
    elif ARGS.worker == "trl":
        worker_trl(ARGS)
    elif ARGS.worker == "parity":
        worker_parity(ARGS)
    else:
        main()
