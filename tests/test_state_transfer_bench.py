"""bench/catchup.py --quick runs end to end (raw TCP, ours from 1 and 2 donor processes, stock hivemind)."""

from __future__ import annotations

from tests.test_bench_quick import run_bench


def test_catchup_quick() -> None:
    out = run_bench("catchup.py", timeout=120)
    assert out["bench"] == "catchup"
    assert out["mb_per_s"] > 0 and out["tcp_mb_per_s"] > 0 and out["hivemind_mb_per_s"] > 0
    # At 20 MB the figures are noisy; ours is 3-5x stock hivemind there, so this only catches a collapse.
    assert out["ratio_vs_hivemind"] > 1.0
