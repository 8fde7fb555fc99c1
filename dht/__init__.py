"""Joining the swarm and what peers tell each other through the DHT.

Package map:

- ``node``: ``SwarmNode``, a hivemind DHT node with a persistent identity and the addresses
  others can dial (``pick_join_address``); ``SwarmError``.
- ``board``: ``SignedBoard``, the one mechanism for signed per-peer records (publish, withdraw,
  read), its record kinds (``PROGRESS``, ``OFFERS``), the run's validators and the record key.
- ``records``: ``ProgressRecord`` and the pure rules over the swarm's records
  (``check_agreement``, ``vouched_state``).
- ``offers``: ``Offer``, a donor's signed claim of the state it serves, and ``tcp_endpoints``.
- ``status``: what `worker status` prints.

Nothing here imports ``worker``.
"""
