"""The device check (tests/device_check.py): its rules on hand-written snippets, then the real loop under it."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from device_check import DEVICE, DeviceCheck  # noqa: E402


def rules(fn):
    with DeviceCheck() as check:
        fn()
    return [v.rule for v in check.violations]


# ----------------------------------------------------------------------------------------------------------------
# 1. The rules on snippets: each fires where CUDA would refuse, and stays quiet on legal code


def test_mixed_device_and_host_tensors():
    assert rules(lambda: torch.ones(3, device=DEVICE) * torch.ones(3)) == ["mixed"]
    assert rules(lambda: torch.ones(3).to(DEVICE) + torch.ones(3)) == ["mixed"]
    assert rules(lambda: torch.ones((), device=DEVICE) * torch.ones(3)) == ["mixed"]  # a device scalar too
    # the result of an op with a device input is on the device
    assert rules(lambda: (torch.ones(3, device=DEVICE) * 2).exp() - torch.zeros(3)) == ["mixed"]


def test_in_place_writes_across_devices():
    def device_into_host():
        total = torch.zeros((), dtype=torch.float64)  # host_total += device_loss
        total += torch.ones((), device=DEVICE).double()

    def host_into_device():
        torch.zeros(3, device=DEVICE).add_(torch.ones(3))

    def out_on_host():
        torch.add(torch.ones(3, device=DEVICE), 1.0, out=torch.empty(3))

    assert rules(device_into_host) == ["device->host"]
    assert rules(host_into_device) == ["host->device"]
    assert rules(out_on_host) == ["device->host"]


def test_cpu_and_to_cpu_give_host_tensors():
    def f():
        x = torch.ones(3, device=DEVICE)
        y, z = x.cpu(), x.to("cpu")
        assert (
            y is not x and z is not x and y.tolist() == z.tolist() == [1.0] * 3
        )  # copies, as CUDA makes them
        x + y
        x + z

    assert rules(f) == ["mixed", "mixed"]


def test_device_attribute_carries_the_tag():
    def f():
        x = torch.ones(3, device=DEVICE)
        assert x.device == DEVICE and torch.ones(3).device == torch.device("cpu")
        return x + torch.arange(3, device=x.device)

    assert rules(f) == []


def test_legal_code_is_quiet():
    def f():
        d = torch.ones(3, device=DEVICE)
        host = torch.arange(3.0)
        d * torch.tensor(2.0)  # a 0-dim host tensor beside device tensors
        d.copy_(host)  # copy_ moves data both ways
        host.copy_(d)
        e = host.to(DEVICE) * d  # moved, then used
        (e.sum().item(), e.tolist(), e.cpu().numpy())
        z = torch.zeros(2, 3, device=DEVICE)
        z[torch.tensor([0, 1])] = torch.ones(3, device=DEVICE)  # host indices into a device tensor
        z[z > 0].sum() + d[[0, 2]].sum() + torch.as_tensor([1.0, 2.0], device=DEVICE).sum()
        torch.nn.Linear(3, 2).to(DEVICE)(d)  # a module moved with Module.to
        host.sum() + host.cpu()  # host with host

    assert rules(f) == []


def test_violations_name_the_place_and_are_deduplicated():
    with DeviceCheck() as check:
        for _ in range(3):
            torch.ones(3, device=DEVICE) * torch.ones(3)
    (v,) = check.violations
    assert (
        v.rule == "mixed" and v.op == "aten.mul.Tensor" and v.where.startswith("tests/test_device_check.py:")
    )


@pytest.fixture
def one_rank_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517")
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_collectives_take_device_tensors_only(one_rank_group):
    def f():
        d, h = torch.ones(3, device=DEVICE), torch.ones(3)
        dist.all_reduce(d)
        dist.all_gather([torch.empty_like(d)], d)
        dist.barrier()
        dist.all_reduce(h)  # NCCL refuses a host tensor
        dist.all_gather([torch.empty_like(d)], h)

    assert rules(f) == ["nccl-host", "nccl-host"]
    with DeviceCheck(collectives="gloo") as check:
        dist.all_reduce(torch.ones(3))
    assert check.violations == []


# ----------------------------------------------------------------------------------------------------------------
# 2. The real loop under the check: the training code is handed DEVICE as its GPU. These fail on the code as it
# was when they were written (the issue "the first GPU run works"), listing what CUDA and NCCL would refuse.


def on_device(monkeypatch):
    """distributed.setup_distributed picks cuda when there is one, else cpu: here it picks DEVICE."""
    import distributed

    real = distributed.setup_distributed
    monkeypatch.setattr(distributed, "setup_distributed", lambda seed=0: (*real(seed)[:2], DEVICE))


def checked_run(monkeypatch, *argv):
    from test_grpo import toy_reward

    import grpo

    on_device(monkeypatch)
    with DeviceCheck() as check:
        grpo.main(list(argv), reward_fn=toy_reward)
    return check


CONFIGS = [
    ("--stage", "1"),
    ("--stage", "0", "--group-size", "1"),  # the warm-up: one gold completion each
    ("--stage", "2"),
    ("--lora-rank", "4"),
    ("--beta", "0.05"),  # a separate frozen reference
    ("--beta", "0.05", "--lora-rank", "4"),  # the reference is the policy with its adapters off
    ("--mu", "2"),
    ("--drop-zero-std-groups",),
    ("--tis-cap", "2"),
]


@pytest.mark.parametrize("flags", CONFIGS, ids=lambda f: " ".join(f))
def test_training_loop_runs_on_the_device(tiny_dir, tmp_path, monkeypatch, flags):
    from test_grpo import run_args

    check = checked_run(monkeypatch, *run_args(tiny_dir, tmp_path / "run", "--steps", "2", *flags))
    assert check.violations == [], check.report()


def test_resumed_run_runs_on_the_device(tiny_dir, tmp_path, monkeypatch):
    from test_grpo import run_args

    args = run_args(tiny_dir, tmp_path / "run", "--steps", "2", "--beta", "0.05")
    checked_run(monkeypatch, *args, "--stop-after", "1")
    check = checked_run(monkeypatch, *args, "--resume")  # the checkpoint's weights and optimizer state loaded
    assert check.violations == [], check.report()


FSDP_WORKER = """
import json, sys
from dataclasses import asdict
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import distributed, grpo
from device_check import DEVICE, DeviceCheck
from test_grpo import toy_reward
real = distributed.setup_distributed
distributed.setup_distributed = lambda seed=0: (*real(seed)[:2], DEVICE)   # gloo, standing in for nccl
with DeviceCheck(collectives={collectives!r}) as check:
    grpo.main(sys.argv[2:], reward_fn=toy_reward)
with open(sys.argv[1], "a") as f:
    f.write(json.dumps([asdict(v) for v in check.violations]) + "\\n")
"""


def test_fsdp_two_processes_run_on_the_device(tiny_dir, tmp_path):
    import json
    import subprocess

    from device_check import Violation
    from test_grpo import run_args

    script, found = tmp_path / "worker.py", tmp_path / "violations.jsonl"
    # on GPUs the process group is cpu:gloo,cuda:nccl (test_process_group_holds_both_backends): host tensors in a
    # collective go over gloo, so only placement inside ops is checked here
    script.write_text(FSDP_WORKER.format(root=str(ROOT), tests=str(ROOT / "tests"), collectives="gloo"))
    args = run_args(tiny_dir, tmp_path / "run", "--steps", "2", "--batch-prompts", "1", "--beta", "0.05")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, str(script), str(found), *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "FSDP2" in proc.stdout
    violations = {Violation(**v) for line in found.read_text().splitlines() for v in json.loads(line)}
    assert violations == set(), "\n".join(
        ["CUDA / NCCL would refuse (both ranks):", *sorted(map(str, violations))]
    )


def test_eval_generation_runs_on_the_device(tiny_dir):
    """eval.generate_predictions on the device it is given (the GPU when there is one): the sampler's placement."""
    import eval as E
    from data import load_data

    records = load_data("builtin", split="eval", n=3)
    with DeviceCheck() as check:
        rows = E.generate_predictions(str(tiny_dir), records, batch_size=2, max_new_tokens=6, device=DEVICE)
    assert len(rows) == 3
    assert check.violations == [], check.report()


def test_process_group_holds_both_backends(monkeypatch):
    """On GPUs, setup_distributed creates one process group with gloo for host tensors and NCCL for device ones
    (bound to the rank's GPU), so the host bookkeeping the loop reduces (rewards, counts) needs no device copy."""
    import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(distributed.memory, "keep_large_blocks_mapped", lambda: None)
    rank, world, device = distributed.setup_distributed()
    assert (rank, world, device) == (1, 2, torch.device("cuda", 1))
    assert calls == [(("cpu:gloo,cuda:nccl",), {"device_id": torch.device("cuda", 1)})]
