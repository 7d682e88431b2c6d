"""bench/gpu_check.py --tiny: every section on CPU, end to end through grpo.main; a failing section is recorded with
its traceback and the next ones still run; the deadline stops a section and skips the rest."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole --tiny run once, in a subprocess where gguf cannot be imported (the GPU machine has none)."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "gpu_check.json", tmp / "work"
    code = (
        "import runpy, sys; sys.modules['gguf'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    cmd = [sys.executable, "-c", code, str(SCRIPT), "--tiny", "--out", str(out), "--workdir", str(work)]
    t0 = time.time()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, work, time.time() - t0


def test_tiny_runs_every_section_and_each_passes(tiny_run):
    r, stdout, work, wall = tiny_run
    gc = load_script()
    s = r["sections"]
    assert list(s) == list(gc.SECTIONS)
    assert {n: e["status"] for n, e in s.items()} == dict.fromkeys(gc.SECTIONS, "passed"), {
        n: e.get("error") or e.get("failed_checks") for n, e in s.items()
    }
    assert r["all_passed"] and r["wall_s"] < 300
    # the table at the end names every section
    assert all(f"{name} " in stdout for name in gc.SECTIONS) and "all passed: True" in stdout
    # the script's own directories are gone, and nothing else was written there
    assert not any(work.iterdir())


def test_tiny_checks_say_what_they_measured(tiny_run):
    s = tiny_run[0]["sections"]
    checks = {k: c for e in s.values() for k, c in (e.get("checks") or {}).items()}
    # inv_freq after grpo's bf16 load and after optimizer steps that copy the masters back
    for k in ("inv_freq_fp32_after_load", "inv_freq_exact_after_load", "inv_freq_fp32_after_updates"):
        assert checks[k]["passed"] is True, k
    assert s["load_bf16"]["result"]["weight_dtype"] == "torch.bfloat16"
    # the attention kernels are recorded on CPU (its flash kernel, forward and backward) but not asserted there
    t = s["train_step"]["result"]
    assert "flash" in t["sampling_attention"] and "flash" in t["training_attention"]
    assert checks["attention_not_math"]["passed"] is None and "CPU" in checks["attention_not_math"]["skipped"]
    assert t["training_tokens_per_s"] > 0 and t["trained_tokens"] > t["completion_tokens"]
    assert t["mfu"] is None  # no peak FLOPs known for a CPU
    d = s["decode"]["result"]
    assert d["compiled"] in ("available", "not available in this build")
    for rows in (32, 256):
        assert (
            d[f"eager_{rows}_rows"]["ms_per_decode_step"] > 0 and d[f"eager_{rows}_rows"]["tokens_per_s"] > 0
        )


def test_tiny_grpo_stages_chain_and_report_the_mismatch(tiny_run):
    s = tiny_run[0]["sections"]
    for stage in (0, 1, 2):
        g = s[f"grpo_stage{stage}"]["result"]
        assert g["steps"] == 2 and all(n > 0 for n in g["grad_norm"]), stage
    assert s["grpo_stage1"]["result"]["started_from"].endswith("q-stage0/checkpoint")
    assert s["grpo_stage2"]["result"]["started_from"].endswith("q-stage1/checkpoint")
    for name in ("grpo_stage1", "grpo_stage2", "fsdp_stage1", "lora_stage1"):
        g = s[name]["result"]
        # fp32 on CPU: the sampler and the trainer compute the same log-probs up to float32 rounding
        assert 0 <= g["sampling/sampling_logp_difference/max"] < 1e-4, name
        assert abs(g["sampling/importance_sampling_ratio/mean"] - 1) < 1e-4, name
    assert s["fsdp_stage1"]["result"]["processes"] == 2
    assert s["lora_stage1"]["result"]["lora_rank"] == 4
    assert s["logprob_7b"]["checks"]["fused_grads_match_naive"]["passed"]


def run_in_process(module, tmp_path, *args):
    out = tmp_path / "gpu_check.json"
    report = module.main(["--tiny", "--out", str(out), "--workdir", str(tmp_path / "work"), *args])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    return report


def test_a_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    gc = load_script()
    seen = {}

    def broken(ctx):
        seen["json"] = json.loads((tmp_path / "gpu_check.json").read_text())  # written after every section
        raise RuntimeError("decode broke")

    monkeypatch.setitem(gc.SECTIONS, "decode", broken)
    # the bug inv_freq_fp32 guards against: a cast that takes the rotary frequencies to bf16 with the weights
    monkeypatch.setattr(gc.Transformer, "_apply", torch.nn.Module._apply)
    r = run_in_process(gc, tmp_path, "--sections", "env,checkpoint,load_bf16,decode,logprob_7b")
    s = r["sections"]
    assert seen["json"]["sections"]["load_bf16"]["status"] == "failed"  # on disk before decode started
    assert seen["json"]["sections"]["logprob_7b"]["status"] == "pending"
    assert s["load_bf16"]["status"] == "failed"
    assert "inv_freq_fp32_after_load" in s["load_bf16"]["failed_checks"]
    assert s["decode"]["status"] == "failed" and s["decode"]["error"] == "RuntimeError: decode broke"
    assert "in broken" in s["decode"]["traceback"]
    assert s["env"]["status"] == s["checkpoint"]["status"] == s["logprob_7b"]["status"] == "passed"
    assert not r["all_passed"]


def test_the_deadline_stops_a_section_and_skips_the_rest(tmp_path, monkeypatch):
    gc = load_script()
    monkeypatch.setitem(gc.SECTIONS, "checks", lambda ctx: time.sleep(60))
    t0 = time.time()
    r = run_in_process(gc, tmp_path, "--sections", "checks,logprob_7b", "--budget-s", "3")
    assert time.time() - t0 < 20
    s = r["sections"]
    assert s["checks"]["status"] == "failed" and "deadline" in s["checks"]["error"]
    assert 2 <= s["checks"]["wall_s"] < 10
    assert s["logprob_7b"]["status"] == "skipped" and "left of the budget" in s["logprob_7b"]["reason"]
