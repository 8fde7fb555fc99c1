"""Every benchmark script runs in its --quick mode and ends with its one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, worker_env


def run_bench(script: str, *args: str, timeout: float = 300) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", *args],
                            capture_output=True, text=True, timeout=timeout, env=worker_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_overhead_quick() -> None:
    out = run_bench("overhead.py")
    assert out["bench"] == "overhead"
    # A sanity range for a noisy 2-core machine; the target is checked by the full run.
    assert 0.3 < out["ratio"] < 3
    assert out["worker_tokens_per_s"] > 0 and out["bare_tokens_per_s"] > 0


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "bench").glob("*.py")
                                           if not p.name.startswith("_")))
def test_every_bench_has_a_quick_mode(script: str) -> None:
    text = (Path(ROOT) / "bench" / script).read_text()
    assert "--quick" in text and '"bench"' in text


def test_averaging_quick() -> None:
    out = run_bench("averaging.py")
    assert out["bench"] == "averaging"
    # int8 on real pseudo-gradients must stay under 1% relative L2 error; fp16 and none far below.
    errors = out["pseudo_grad_rel_l2"]
    assert errors["int8"] < 0.01 and errors["fp16"] < 1e-3 and errors["none"] < 1e-6
    reduction = out["reduction_vs_ddp"]
    assert reduction["int8"] > reduction["fp16"] > reduction["none"] >= 5
    from tests import netns

    if netns.available()[0]:
        assert 0.2 < out["efficiency"] <= 1.05  # sane; the 90% target is checked by the full run


def test_convergence_quick() -> None:
    out = run_bench("convergence.py")
    assert out["bench"] == "convergence"
    assert {"diloco_loss", "ddp_loss", "gap_pct"} <= set(out)
    assert 0 < out["ddp_loss"] < 6 and 0 < out["diloco_loss"] < 6


def test_newcomer_quick() -> None:
    out = run_bench("newcomer.py")
    assert out["bench"] == "newcomer"
    assert out["first_group_size"] >= 2  # the newcomer contributed to a round with the others
    assert 0 < out["transfer_s"] <= out["time_to_state_s"] <= out["time_to_first_round_s"]


def test_utilization_quick() -> None:
    out = run_bench("utilization.py", timeout=400)
    assert out["bench"] == "utilization" and out["workers"] == 4 and len(out["per_worker"]) == 4
    # A share of wall time; the figure itself is read from the full run, not asserted on a loaded 2-core
    # machine.
    assert 0 < out["utilization"] <= 1 and all(0 < u <= 1 for u in out["per_worker"])
    assert out["allreduce_s"] > 0  # the measured rounds were averaged, not run alone
