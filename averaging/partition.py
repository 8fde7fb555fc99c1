"""Which member reduces which slice of the flat pseudo-gradient buffer.

All tensors of a round are laid end to end in one flat fp32 buffer. The buffer is cut
into fixed-size chunks (the last one may be shorter); each chunk is one message on the
wire and is encoded on its own. Every reducer owns a contiguous run of chunks, in
proportion to its integer share (1 for a normal peer, 0 for a peer that cannot accept
connections). Only integer arithmetic is used, so every member computes exactly the
same partition from the same group description.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[int, int]  # [start, end) offsets into the flat buffer


@dataclass(frozen=True)
class Partition:
    """The chunks of the flat buffer, grouped by the member that reduces them."""

    total_numel: int
    chunk_numel: int
    chunks_by_reducer: tuple[tuple[Span, ...], ...]

    @classmethod
    def build(cls, total_numel: int, shares: Sequence[int], chunk_numel: int) -> Partition:
        """Split ``total_numel`` values among ``len(shares)`` members in proportion to ``shares``."""
        if total_numel < 0 or chunk_numel <= 0:
            raise ValueError(f"invalid sizes: total_numel={total_numel}, chunk_numel={chunk_numel}")
        if not shares or any(not isinstance(s, int) or s < 0 for s in shares) or sum(shares) == 0:
            raise ValueError(f"shares must be non-negative integers with a positive sum, got {list(shares)}")
        num_chunks = -(-total_numel // chunk_numel)
        total_share = sum(shares)
        chunks: list[tuple[Span, ...]] = []
        cumulative = 0
        first_chunk = 0
        for share in shares:
            cumulative += share
            last_chunk = num_chunks * cumulative // total_share
            chunks.append(
                tuple(
                    (index * chunk_numel, min((index + 1) * chunk_numel, total_numel))
                    for index in range(first_chunk, last_chunk)
                )
            )
            first_chunk = last_chunk
        return cls(total_numel=total_numel, chunk_numel=chunk_numel, chunks_by_reducer=tuple(chunks))

    @property
    def num_chunks(self) -> int:
        return sum(len(chunks) for chunks in self.chunks_by_reducer)

    def chunks_of(self, reducer_index: int) -> tuple[Span, ...]:
        return self.chunks_by_reducer[reducer_index]
