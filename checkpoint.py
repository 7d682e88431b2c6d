"""The run directory: which weights a stage starts from, checkpoints and resume, and the run's log files.

    <out>/config.json                 the flags of the run, the weights it started from, the world size
    <out>/metrics.jsonl, samples.jsonl one line per step; a resumed run keeps the lines before its checkpoint
    <out>/checkpoint/                 config.json + model.safetensors (+ tokenizer): the Hugging Face layout, LoRA
                                      merged; trainer_state.pt (step, data position, RNG, adapters; plain tensors
                                      and lists, read with weights_only=True); optimizer-R-of-N.safetensors, each
                                      rank's dim-0 shard of the AdamW state

A checkpoint is written atomically (a temporary directory, then renamed) and resumes on any number of processes.
How the weights are laid out over ranks, and written from them, is distributed.py's business.
"""

import json
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from distributed import adapter_weights, barrier, distributed, named_trained_parameters, save_weights
from model import ModelError

# ----------------------------------------------------------------------------------------------------------------
# Where a stage starts


def find_checkpoint(path) -> Path | None:
    """A run directory holds its weights in checkpoint/ (checkpoint.old/ only during the swap of a save)."""
    p = Path(path)
    for cand in (p, p / "checkpoint", p / "checkpoint.old"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    return None


def previous_stage_dir(out, stage) -> Path | None:
    """runs/stage2 -> runs/stage1, runs/expA-stage1 -> runs/expA-stage0: --out's name with its stage number
    lowered; None when the name does not end in stage<N> (then nothing is guessed)."""
    out = Path(out)
    match = re.fullmatch(rf"(.*)stage{stage}", out.name)
    return out.with_name(f"{match.group(1)}stage{stage - 1}") if match and stage > 0 else None


def resolve_init(cfg, resuming, log=print) -> str:
    """The weights a stage starts from: --init, else the previous stage's checkpoint beside --out (stage 1 after
    the warm-up, stage 2 after stage 1), else --model. A resumed run starts from what it started from: the
    init_resolved its config.json recorded."""
    recorded = None
    if resuming and (Path(cfg.out) / "config.json").is_file():
        recorded = json.loads((Path(cfg.out) / "config.json").read_text()).get("init_resolved")
    if recorded is not None:
        if cfg.init is not None and cfg.init != recorded:
            raise ModelError(
                f"{cfg.out} was started from {recorded}, not --init {cfg.init}: resume without --init"
            )
        log(f"[init] resuming a run that started from {recorded}")
        return recorded
    if cfg.init is not None:
        log(f"[init] starting from --init {cfg.init}")
        return cfg.init
    before = previous_stage_dir(cfg.out, cfg.stage)
    found = find_checkpoint(before) if before is not None else None
    if found is not None:
        log(f"[init] stage {cfg.stage} starts from the stage-{cfg.stage - 1} checkpoint {found}")
        return str(found)
    if cfg.stage > 0:
        where = f"under {before}" if before is not None else f"guessed from --out {cfg.out}"
        log(
            f"[init] no checkpoint {where}: stage {cfg.stage} starts from --model {cfg.model} (or pass --init)"
        )
    else:
        log(f"[init] starting from --model {cfg.model}")
    return cfg.model


def checkpoint_to_resume(cfg, log=print):
    """The checkpoint in --out to continue from, or None. One there without --resume is an error: a finished or
    interrupted run is never overwritten silently."""
    ckpt = find_checkpoint(cfg.out)
    if ckpt is not None and not cfg.resume:
        raise FileExistsError(
            f"{ckpt} holds an earlier run: pass --resume to continue it, or choose another --out "
            "(or delete it) to start over"
        )
    if cfg.resume and ckpt is None:
        log(f"[resume] no checkpoint in {cfg.out}: starting from the beginning")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# Saving


def save_checkpoint(out, model, tokenizer, optimizer, step, opt_step, data_pos, cfg):
    """Write <out>/checkpoint atomically: into a temporary directory, then renamed. A crash mid-save leaves the
    previous checkpoint (as checkpoint/ or, between the two renames, checkpoint.old/) intact. Every rank calls it:
    under FSDP each rank writes its own part of the weights (distributed.save_weights) and of the optimizer state."""
    out = Path(out)
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    shard_file = tmp / f"optimizer-{rank:05d}-of-{world:05d}.safetensors"
    save_file(optimizer_shards(model, optimizer), str(shard_file))
    save_weights(model, tmp, tokenizer)
    adapters = adapter_weights(model)  # unmerged, to resume from
    barrier()
    if rank != 0:
        return final
    state = {
        "step": step,
        "opt_step": opt_step,
        "data_pos": list(data_pos),
        "rng_torch": torch.get_rng_state(),
        "rng_python": random.getstate(),
        "lora": adapters,
        "config": asdict(cfg),
    }
    torch.save(state, tmp / "trainer_state.pt")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def optimizer_shards(model, optimizer):
    """{"<parameter>.<exp_avg|exp_avg_sq|step>": this rank's part}: under FSDP its dim-0 shard, so no rank ever
    holds the whole optimizer state (a full gather would put 8 bytes per parameter on rank 0: 64 GB for 8B)."""
    shards = {}
    for n, p in named_trained_parameters(model):
        for k, v in optimizer.state[p].items():
            local = v.to_local() if isinstance(v, DTensor) else v
            shards[f"{n}.{k}"] = local.detach().cpu().contiguous()
    return shards


# ----------------------------------------------------------------------------------------------------------------
# Resuming


def load_trainer_state(ckpt):
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True, map_location="cpu")


def restore_trainer_state(ckpt, model, optimizer, log=print):
    """Optimizer, RNG and (LoRA) adapters from a checkpoint -> (step, opt_step, data_pos) to continue from."""
    state = load_trainer_state(ckpt)
    if "optimizer" in state:  # the layout before the optimizer state was written in per-rank shards
        raise ModelError(
            f"{ckpt}: an older checkpoint (its optimizer state inside trainer_state.pt) cannot be resumed; "
            f"start a new run from its weights with --init {ckpt}"
        )
    torch.set_rng_state(state["rng_torch"])
    random.setstate(state["rng_python"])
    named, masters = dict(model.named_parameters()), getattr(model, "masters", {})
    with torch.no_grad():
        for n, t in state["lora"].items():  # empty for a full fine-tune: its weights came with the checkpoint
            if isinstance(named[n], DTensor):  # this rank's shard of the full tensor
                t = distribute_tensor(t.to(named[n].dtype), named[n].device_mesh, named[n].placements)
            named[n].copy_(t)
            if n in masters:
                masters[n].copy_(t)
    restore_optimizer(ckpt, model, optimizer)
    log(
        f"[resume] {ckpt}: continuing at step {state['step']} (optimizer step {state['opt_step']}, "
        f"data position {state['data_pos']})"
    )
    return state["step"], state["opt_step"], list(state["data_pos"])


def restore_optimizer(ckpt, model, optimizer):
    """The AdamW state from the optimizer-*-of-N files of a run over N ranks, onto this run's ranks (any number):
    each tensor put together from its N dim-0 shards, then cut to this rank's shard, one tensor at a time."""
    paths = sorted(Path(ckpt).glob("optimizer-*-of-*.safetensors"))
    if not paths or len(paths) != int(paths[0].stem.rsplit("-", 1)[1]):
        raise ModelError(
            f"{ckpt}: {len(paths)} optimizer-R-of-N.safetensors files, not N: an incomplete checkpoint"
        )
    files = [safe_open(str(f), framework="pt") for f in paths]
    for n, p in named_trained_parameters(model):
        state = {}
        for k in [key[len(n) + 1 :] for key in files[0].keys() if key.rsplit(".", 1)[0] == n]:
            parts = [f.get_tensor(f"{n}.{k}") for f in files]
            full = (
                parts[0] if parts[0].dim() == 0 else torch.cat(parts)
            )  # a step count: the same on every rank
            if isinstance(p, DTensor) and full.dim() > 0:
                full = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            state[k] = full.to(p.device)
        optimizer.state[p] = state


# ----------------------------------------------------------------------------------------------------------------
# The run's log files


def read_jsonl_upto(path, step):
    """Lines of a previous run with "step" < step (a resumed run rewrites what came after its checkpoint)."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text().splitlines()
    return [line for line in lines if line and json.loads(line)["step"] < step]


def open_run_logs(out, step, config):
    """Write config.json; keep the lines of metrics.jsonl and samples.jsonl before `step` (all of them when fresh:
    none). -> the kept metrics, the start of the run's history."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    kept = {}
    for name in ("metrics.jsonl", "samples.jsonl"):
        kept[name] = read_jsonl_upto(out / name, step)
        (out / name).write_text("".join(line + "\n" for line in kept[name]))
    (out / "config.json").write_text(json.dumps(dict(config, torch=torch.__version__), indent=2))
    return [json.loads(line) for line in kept["metrics.jsonl"]]


def append_jsonl(path, rows):
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def log_samples(path, step, rollout, advantages, n):
    """n completions of this step (grpo.Rollout), spread over the groups, with their rewards, to samples.jsonl."""
    R, G = len(rollout.texts), rollout.group_size
    lines = []
    for row in [r * max(1, R // max(1, n)) % R for r in range(min(n, R))]:
        line = dict(step=step, record=rollout.records[row // G].id)
        line.update(
            completion=rollout.prefills[row // G] + rollout.texts[row],
            reward=rollout.rewards[row].item(),
            advantage=advantages[row].item(),
            components=rollout.components[row],
        )
        lines.append(line)
    append_jsonl(path, lines)
