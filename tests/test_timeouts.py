"""Timeouts that follow the payload: the arithmetic by hand, and a round of the 150m preset's width (4 of
its layers) on a 10 Mbit/s link with the default flags."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from averaging import SwarmAverager, get_codec
from averaging.settings import LinkRate, PayloadTimeouts, RoundSettings, allreduce_bytes
from tests import netns
from tests.helpers import events, wait_for
from worker.config import ConfigError, load_config
from worker.model import model_config
from worker.outer_round import RoundTiming


def test_butterfly_bytes_per_member() -> None:
    # 2 (N-1)/N of the payload each way: S in a pair, 1.5 S at N=4, at most 2 S whatever N.
    assert allreduce_bytes(1000, 2) == 1000
    assert allreduce_bytes(1000, 4) == 1500
    assert allreduce_bytes(1000, None) == 2000
    assert allreduce_bytes(1000, 1) == 0


def test_payload_counts_int8_scales_per_chunk() -> None:
    # 1M values in 65536-value chunks: 15 full chunks of 1024 scales + 65536 codes, then 16960 values
    # (265 blocks): 15 * 69632 + 265 * 4 + 16960 = 1_062_500 bytes, 8.5 bits a value.
    payload = PayloadTimeouts.of(get_codec("int8"), total_numel=1_000_000, chunk_numel=65536)
    assert (payload.payload_bytes, payload.chunk_bytes) == (1_062_500, 69632)
    assert PayloadTimeouts.of(get_codec("none"), total_numel=1000, chunk_numel=64).payload_bytes == 4000


def test_attempt_round_and_chunk_silence_by_hand() -> None:
    payload = PayloadTimeouts(payload_bytes=250_000_000, chunk_bytes=262144)  # floor: 1.25e6 B/s
    assert payload.attempt_s(2) == pytest.approx(10 + 2 * 250e6 / 1.25e6)  # 410 s
    assert payload.attempt_s(None) == pytest.approx(810)  # the cap: 2 S at the floor
    assert payload.attempt_s(4, rate=12.5e6) == pytest.approx(10 + 2 * 375e6 / 12.5e6)  # 70 s measured
    # 8 MB of transport buffers and 16 fp32 chunks drained at a quarter of the floor: 39 s (int8: 29 s).
    assert payload.next_chunk_s == pytest.approx((8e6 + 16 * 262144) * 4 / 1.25e6)
    big = PayloadTimeouts(payload_bytes=10**9, chunk_bytes=69632)
    assert big.next_chunk_s == pytest.approx(29.165, abs=1e-3)
    # No more than a member sends in the attempt (2 S) can be queued: 2 * 1.8 MB * 4 / 1.25e6 = 11.52 s for
    # the tiny model's fp32 payload. Never under 5 s, whatever the floor.
    assert PayloadTimeouts(payload_bytes=1_800_000, chunk_bytes=262144).next_chunk_s == pytest.approx(11.52)
    assert PayloadTimeouts(payload_bytes=1, chunk_bytes=69632).next_chunk_s == 5.0
    assert PayloadTimeouts(payload_bytes=10**9, chunk_bytes=69632, floor=125e6).next_chunk_s == 5.0
    settings = RoundSettings(matchmaking_time=5, request_timeout=3, allreduce_timeout=810,
                             next_chunk_timeout=13.0)
    # Two lookups (5 + 3), a dead peer's detection (2 * 13) and two attempts (2 * 410).
    assert payload.round_s(settings, 2) == pytest.approx(16 + 26 + 820)
    # The attempt never gets more than the cap the background process enforces.
    assert payload.round_s(settings, 2, rate=1.0) == pytest.approx(16 + 26 + 2 * 810)


def test_one_billion_parameters_fit_a_100_mbit_link() -> None:
    # The case: 1e9 values in int8 at N=4 move 1.59 GB each way, 127.5 s at 100 Mbit/s. The
    # first round (no measurement yet) gets the floor's 2560 s; once measured, 265 s.
    payload = PayloadTimeouts(payload_bytes=1_062_500_000, chunk_bytes=69632)
    needed = allreduce_bytes(payload.payload_bytes, 4) / 12.5e6
    assert needed == pytest.approx(127.5)
    assert payload.attempt_s(4) == pytest.approx(2560) and payload.attempt_s(4) > needed
    assert payload.attempt_s(4, rate=12.5e6) == pytest.approx(265)


def test_link_rate_keeps_the_slowest_recent_round_and_forgets_after_a_failure() -> None:
    link = LinkRate()
    assert link.rate is None
    link.observe(bytes_sent=100_000_000, bytes_received=120_000_000, allreduce_s=10.0)
    link.observe(bytes_sent=20_000_000, bytes_received=20_000_000, allreduce_s=1.0)
    link.observe(bytes_sent=0, bytes_received=0, allreduce_s=0.0)  # nothing moved: not a measurement
    assert link.rate == 12e6
    link.forget()
    assert link.rate is None


def test_averager_derives_its_timeouts_from_the_template() -> None:
    # Never started, so no DHT is needed: client_mode is given instead of read from one.
    template = [torch.zeros(1_000_000)]
    averager = SwarmAverager(dht=None, run_id="t", template=template, compression="int8",  # type: ignore[arg-type]
                             allreduce_timeout=None, next_chunk_timeout=None, client_mode=False)
    # Chunk silence: 2 S (less than the transport buffer) * 4 / 1.25e6 = 6.8 s; the cap (10 + 2 * 2 *
    # 1_062_500 / 1.25e6 = 13.4 s) is raised to twice that, RoundSettings' invariant.
    silence = 2 * 1_062_500 * 4 / 1.25e6
    assert averager.settings.next_chunk_timeout == pytest.approx(silence)
    assert averager.settings.allreduce_timeout == pytest.approx(2 * silence)
    # Pair: 2 * (5 + 2) + 2 * silence + 2 * (10 + 2 * 1_062_500 / 1.25e6) = 14 + 13.6 + 23.4.
    assert averager.round_time(2) == pytest.approx(14 + 2 * silence + 23.4)
    averager.link.observe(bytes_sent=1_062_500, bytes_received=1_062_500, allreduce_s=0.1)  # 10.6 MB/s
    assert averager.round_time(2) == pytest.approx(14 + 2 * silence + 2 * (10 + 0.2))
    # An explicit cap bounds the derived chunk silence to half of it (RoundSettings' invariant).
    small = SwarmAverager(dht=None, run_id="t", template=template, allreduce_timeout=6.0,  # type: ignore[arg-type]
                          next_chunk_timeout=None, client_mode=False)
    assert small.settings.next_chunk_timeout == 3.0


def test_config_auto_defaults_and_explicit_overrides() -> None:
    swarm = load_config(environ={}).swarm
    assert swarm.averaging_timeout == swarm.next_chunk_timeout == swarm.compression == "auto"
    assert swarm.explicit_averaging_timeout() is None and swarm.explicit_next_chunk_timeout() is None
    assert swarm.codec_for(150_000_000)[0] == "int8" and swarm.codec_for(450_000)[0] == "none"
    swarm = load_config(environ={"WORKER_AVERAGING_TIMEOUT": "600", "WORKER_NEXT_CHUNK_TIMEOUT": "20",
                                 "WORKER_COMPRESSION": "none"}).swarm
    assert (swarm.explicit_averaging_timeout(), swarm.explicit_next_chunk_timeout()) == (600.0, 20.0)
    assert swarm.codec_for(1_000_000_000) == ("none", "as configured")  # explicit always wins
    with pytest.raises(ConfigError, match=r"expected seconds > 0 or 'auto', got 'soon'.*--next-chunk"):
        load_config(environ={}, cli={("swarm", "next_chunk_timeout"): "soon"})
    with pytest.raises(ConfigError, match=r"next_chunk_timeout \(20.0\) must be at most half of "
                                          r"averaging_timeout \(30.0\)"):
        load_config(environ={"WORKER_AVERAGING_TIMEOUT": "30", "WORKER_NEXT_CHUNK_TIMEOUT": "20"})


def test_wait_for_members_is_not_scaled_by_the_payload() -> None:
    auto = RoundTiming(averaging_timeout=None, matchmaking_time=5, request_timeout=3, inner_steps=1)
    slow = SimpleNamespace(round_time=lambda: 3000.0)  # a 1b payload before any measurement
    assert auto.members_wait == 30.0 and auto.outer_step_s(slow) == 3030.0  # type: ignore[arg-type]
    given = RoundTiming(averaging_timeout=60, matchmaking_time=5, request_timeout=3, inner_steps=1)
    assert given.members_wait == 30.0 and given.outer_step_s(slow) == 60  # type: ignore[arg-type]


# -- a 150m-width round over a 10 Mbit/s link, default timeouts -------------------------------------------

ok, why = netns.available()


@pytest.fixture
def slow_link() -> Iterator[netns.Network]:
    with netns.Network.create(2, rate_mbit=10) as net:
        yield net


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """The 150m preset cut to 4 of its 12 layers: 124M parameters, still above the 100M at which `auto`
    picks int8, and 131 MB each way instead of 185 MB (about 45 s less of transfer at 10 Mbit/s). The
    message sizes, and so the gaps between messages the chunk silence must allow, are the 150m's."""
    config = model_config("150m")
    config.num_hidden_layers = 4
    config.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def start_wide(host: netns.Host, run_dir: Path, model: Path, *args: str) -> subprocess.Popen[str]:
    # As cheap as such a worker gets: one inner step on one 16-token sequence, no evaluation, checkpoints
    # written in place (no second copy of the state). No timeout flag: the defaults are under test.
    return netns.start_worker(
        host, run_dir, "--model", str(model), "--batch-size", "1", "--seq-len", "16", "--inner-steps", "1",
        "--warmup-steps", "0", "--max-epochs", "1", "--eval-every", "0", "--no-background-checkpoints",
        "--keep-checkpoints", "1", "--min-peers", "2", *args)


@pytest.mark.slow
@pytest.mark.netns
@pytest.mark.skipif(not ok, reason=why)
def test_a_124m_round_on_a_10_mbit_link_with_default_timeouts(
    tmp_path: Path, slow_link: netns.Network, model_dir: Path, procs: list
) -> None:
    a, b = slow_link.hosts
    began = time.monotonic()
    procs.append(start_wide(a, tmp_path / "a", model_dir))
    peer = wait_for(lambda: (tmp_path / "a" / "peer.json").exists()
                    and json.loads((tmp_path / "a" / "peer.json").read_text()),
                    timeout=180, what="host a's peer.json", interval=0.5)
    entry = next(m for m in peer["maddrs"] if m.startswith(f"/ip4/{a.address}/"))
    procs.append(start_wide(b, tmp_path / "b", model_dir, "--initial-peers", entry))
    # int8 (auto above 100M parameters): ~131 MB each way at 10 Mbit/s, about 105 s of transfer alone.
    for proc in procs:
        assert proc.wait(timeout=900) == 0
    steps = [events(tmp_path / d, "outer_step") for d in ("a", "b")]
    assert [len(s) for s in steps] == [1, 1]
    (ra,), (rb,) = steps
    assert ra["group_size"] == rb["group_size"] == 2, (ra["failures"], rb["failures"])
    assert ra["param_sha256"] == rb["param_sha256"]
    # The defaults picked int8 and left the slow link all the time it needed (far more than the old 60 s).
    assert 120e6 < ra["bytes_sent"] < 145e6 and ra["allreduce_s"] > 60
    assert "compression int8 (auto:" in (tmp_path / "a" / "worker.log").read_text()
    print(f"124m round at 10 Mbit/s: all-reduce {ra['allreduce_s']:.0f}s, whole test "
          f"{time.monotonic() - began:.0f}s")
