"""The worker daemon: `worker start`, `worker swarm`, `worker status`.

Package map:

- ``cli``: the command line, a thin entry point (parse, build, run, always close).
- ``config``: the typed config tree (flags > ``WORKER_*`` env > TOML file > defaults).
- ``runtime``: ``Worker``, the lifecycle: start acquires in order on one ExitStack, shutdown
  releases in reverse; the DiLoCo loop and its inner phase.
- ``round_state``: ``RoundState``, where the round stands; the published progress record is
  derived from it.
- ``outer_round``: ``OuterRound``, the outer step as named phases, and ``decide``, the pure
  function that names each round's ``Outcome``.
- ``state_sync``: ``StateSync``, offering this worker's state and catching up with (or repairing
  from) the swarm's.
- ``exchange``: ``StateExchange``, the network side of that: serve, announce, fetch.
- ``swarm``: ``SwarmView``, this worker's view of the progress board (waiting for a round's
  members, agreement, what the swarm vouches for).
- ``persist``: ``DiskState``, what a checkpoint holds and how a start resumes from one.
- ``train`` / ``model`` / ``data``: the inner AdamW trainer, model presets, the token stream.
- ``faults``: ``FaultPlan``, the test-only fault plan read once from ``DILOCO_FAULT``.
- ``children``: helper processes a crashed worker left, cleared by the next start.
- ``local_swarm``: `worker swarm`, a bootstrap and N-1 workers on this machine.
- ``console`` / ``metrics`` / ``errors``: terminal output, ``metrics.jsonl``, ``WorkerError``.
"""
