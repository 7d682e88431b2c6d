"""metrics.py: the trainer's end-of-run summary on a hand-built history, and the trainer's independence of eval.py.
(batch_metrics' hand example is in test_grpo.py.)"""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import metrics  # noqa: E402


def step(i, **extra):
    return dict(
        step=i,
        reward_mean=float(i),
        **{"reward/em": 0.5},
        frac_reward_zero_std=0.0,
        completion_len_mean=10.0 * i,
        clipped_share=0.0,
        **extra,
    )


def row(lines, key):
    """The four numbers of one table row: first step, last step, mean of the first 5, mean of the last 5."""
    line = next(x for x in lines if x.startswith(key + " "))
    return [float(x) for x in line[len(key) :].split()]


def test_training_summary_by_hand():
    assert metrics.training_summary(1, [], 0.0) == ["[done] no steps run"]
    history = [step(i) for i in range(6)]  # reward_mean 0..5, completion_len_mean 0..50
    lines = metrics.training_summary(1, history, wall=60.0)
    assert lines[0] == "GRPO stage 1: 6 steps logged, wall time 1.0 min (10.0 s/step)"
    assert "step 0" in lines[1] and "step 5" in lines[1] and "first 5" in lines[1] and "last 5" in lines[1]
    # first 5 steps: mean(0..4) = 2; last 5: mean(1..5) = 3
    assert row(lines, "reward_mean") == [0.0, 5.0, 2.0, 3.0]
    assert row(lines, "completion_len_mean") == [0.0, 50.0, 20.0, 30.0]
    assert row(lines, "reward/em") == [0.5, 0.5, 0.5, 0.5]
    # a diagnostic missing from one step (a stage-2 batch without unanswerable questions) is left out
    partial = [step(i, refused_unanswerable=0.5) for i in range(5)] + [step(5)]
    assert not any(x.startswith("refused_unanswerable") for x in metrics.training_summary(2, partial, 60.0))
    # the sampler-vs-trainer line: the largest log-prob difference and the range of the importance ratios
    diff = "sampling/sampling_logp_difference/max"
    sampled = [
        step(
            i,
            **{diff: 1e-6 * (i + 1)},
            **{"sampling/importance_sampling_ratio/min": 1 - 0.01 * i},
            **{"sampling/importance_sampling_ratio/max": 1 + 0.01 * i},
        )
        for i in range(3)
    ]
    assert metrics.training_summary(1, sampled, 30.0)[-1] == (
        "sampler vs trainer log-probs: largest |difference| 3.00e-06 (step 2), importance ratios in [0.9800, 1.0200]"
    )


def test_the_trainer_does_not_import_eval():
    """eval.py is the evaluation CLI: grpo.py takes its per-step reports from metrics.py."""
    code = "import sys, grpo; assert 'eval' not in sys.modules, 'grpo imports eval'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
