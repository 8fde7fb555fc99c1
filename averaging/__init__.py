"""The outer step of DiLoCo: averaging pseudo-gradients across the swarm.

Package map:

- ``averager``: ``SwarmAverager``, the entry point: averages a fixed list of tensors with the
  peers of the same run, epoch and theta_g, leaving every member of a group with
  bitwise-identical results; ``RoundResult``.
- ``backend``: ``RoundBackend``, the background process (hivemind's matchmaking) that runs
  each averaging round on shared-memory buffers.
- ``allreduce``: ``IdenticalAllReduce``, the all-reduce runner: each reducer encodes its
  averaged part once and every member decodes those same bytes.
- ``tickets``: ``RoundTicket``, the matchmaking key and ``check_group``: who may average with whom.
- ``settings``: ``RoundSettings``, the averager's timeouts and group sizes, checked in one place.
- ``partition``: which reducer owns which chunks of the flat buffer.
- ``compression``: the codecs on the wire (``none``, ``fp16``, ``int8``).
- ``outer``: ``OuterOptimizer``, theta_g, the pseudo-gradient and the outer Nesterov step.

Nothing here imports ``worker``.
"""

from averaging.averager import RoundResult, SwarmAverager
from averaging.compression import CODEC_NAMES, Codec, CodecError, get_codec

__all__ = ["CODEC_NAMES", "Codec", "CodecError", "RoundResult", "SwarmAverager", "get_codec"]
