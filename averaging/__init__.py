"""The outer step of DiLoCo: averaging pseudo-gradients across the swarm.

``SwarmAverager`` (averager.py) is the entry point: it averages a fixed list of tensors
with the peers of the same run and epoch, leaving every member of a group with
bitwise-identical results. The rest is its machinery: codecs (compression.py), the
partition of the flat buffer (partition.py), round agreement (round.py), timeouts and
group sizes (settings.py), the
all-reduce runner (allreduce.py) and the background process (backend.py).
"""

from averaging.averager import RoundResult, SwarmAverager
from averaging.compression import CODEC_NAMES, Codec, CodecError, get_codec

__all__ = ["CODEC_NAMES", "Codec", "CodecError", "RoundResult", "SwarmAverager", "get_codec"]
