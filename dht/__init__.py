"""Joining the swarm and what peers tell each other through the DHT.

Package map:

- ``node``: ``SwarmNode``, a hivemind DHT node with a persistent identity and the addresses
  others can dial (``pick_join_address``); ``SwarmError``.
- ``board``: ``SignedBoard``, the one mechanism for signed per-peer records (publish, withdraw,
  read), its record kinds (``PROGRESS``, ``OFFERS``), the run's validators and the record key.
- ``records``: ``ProgressRecord`` and the majority rule over the swarm's records (``vouched_state``).
- ``lineage``: heads, lineages and the fork-choice rule: which theta_g is the swarm's when peers
  hold several (a failed round, a healed partition, a corrupted peer).
- ``offers``: ``Offer``, a donor's signed claim of the state it serves, and ``tcp_endpoints``.
- ``status``: what `worker status` prints.

Nothing here imports ``worker``.
"""
