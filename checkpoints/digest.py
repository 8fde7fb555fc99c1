"""``param_sha256``: the swarm-wide fingerprint of a set of named tensors.

Peers compare this hash to prove they hold bitwise-identical global parameters
(theta_g) after an outer step, and it is what ``metrics.jsonl`` and ``worker status``
report. Every implementation must produce exactly the same digest, so the byte stream
fed to SHA-256 is specified here and must not change without changing the version tag.

The byte stream (version 1):

1. The ASCII line ``param_sha256-v1\\n`` (a domain tag, so a future format cannot
   collide with this one).
2. For every tensor, in ascending order of its name (Python ``str`` order, i.e. by
   Unicode code point):

   a. A header line: the compact JSON array ``[name, dtype, shape, nbytes]`` as
      produced by ``json.dumps(..., separators=(",", ":"), ensure_ascii=True)``,
      followed by ``\\n``. ``dtype`` is the torch dtype name without the ``torch.``
      prefix (``"float32"``, ``"bfloat16"``, ``"int64"``, ``"uint8"``, ...), ``shape``
      is a list of ints (``[]`` for a scalar), ``nbytes`` is ``numel * element_size``.
   b. Exactly ``nbytes`` raw bytes: the elements in row-major (C) order, each in its
      in-memory little-endian representation (bfloat16 is its 2 raw bytes, bool is
      one byte 0/1). Strides, storage offset, device and ``requires_grad`` are not
      covered; only the logical values, dtype, shape and name are.

The header carries ``nbytes``, so the stream is unambiguous without separators.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import torch

from checkpoints.errors import CheckpointError

_DOMAIN_TAG = b"param_sha256-v1\n"


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as named in the hash header, e.g. ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 CPU view of ``tensor``'s values; no copy for a contiguous CPU tensor.

    Viewing as uint8 (instead of converting through numpy by dtype) is what makes
    bfloat16 work: numpy has no bfloat16, but every dtype can be reinterpreted as bytes.
    """
    if tensor.layout != torch.strided:
        raise CheckpointError(f"cannot hash a tensor with layout {tensor.layout}; only dense tensors")
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    # Lazy conjugate/negative bits are not materialised by .contiguous(); resolve them
    # so the bytes are the logical values.
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return flat.view(torch.uint8)


def param_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex SHA-256 of ``tensors`` as specified in this module's docstring.

    Hashes each tensor's storage through a memoryview: a contiguous CPU tensor is not
    copied; a GPU or non-contiguous tensor is copied once, one tensor at a time.
    """
    digest = hashlib.sha256(_DOMAIN_TAG)
    for name in sorted(tensors):
        tensor = tensors[name]
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"cannot hash {name!r}: expected a tensor, got {type(tensor).__name__}")
        raw = tensor_bytes(tensor)
        header = json.dumps(
            [name, dtype_name(tensor.dtype), list(tensor.shape), raw.numel()],
            separators=(",", ":"),
            ensure_ascii=True,
        )
        digest.update(header.encode("ascii") + b"\n")
        # hashlib releases the GIL for large buffers, so hashing a big model does not
        # stall the DHT/averager threads.
        digest.update(memoryview(raw.numpy()))
    return digest.hexdigest()
