"""The epoch plan: which sample positions each rank and loader worker reads in each epoch. Pure
arithmetic, the same on every rank; ``vit.data.loader`` carries it out.

How an epoch is divided (the rule DDP depends on)
-------------------------------------------------
The epoch's shards are put in an order (a permutation seeded by ``seed + epoch`` for training, the
manifest order for evaluation) and concatenated into one sequence of N sample positions, repeated
cyclically. With W ranks, batch size b and k loader workers per rank:

- training: every rank gets exactly ``B = ceil(N / (W * b))`` batches (``floor`` with ``drop_last``), all
  of b samples. Rank r reads positions ``[r * B * b, (r + 1) * B * b)``, so the epoch covers every sample
  at least once; the last ranks wrap around to the sequence's start for the ``W * B * b - N`` samples of
  padding (as ``DistributedSampler`` pads). Worker roles split a rank's batches ``B // k`` each, the first
  ``B % k`` roles one more, each role reading a contiguous range of positions through a shuffle buffer.
- evaluation: rank r reads positions ``[floor(r * N / W), floor((r + 1) * N / W))`` once, in batches of b
  (the last one short): every sample is seen exactly once across ranks, and ranks differ by at most one
  batch. ``vit.loop.evaluate`` only synchronises after its loop, so that cannot hang DDP.

Repeated augmentation (``repeats = k > 1``; Hoffer et al. 2020, as DeiT trains) keeps the epoch's length
(B batches per rank, as above) but fills it with ``U = ceil(B * b / k)`` distinct samples per rank, each read
k times and augmented independently each time. The epoch's ``W * U`` distinct positions start at
``epoch * W * U`` (so consecutive epochs walk through the data rather than rereading its start) and are cut
into W contiguous ranges ``R_0 .. R_{W-1}`` of U each. Rank r reads the k ranges ``R_r, R_{r-1}, ...,
R_{r-k+1}`` (indices mod W) one after the other, the last one cut short to B * b samples in all: so a
sample's k copies go to k different ranks when ``k <= W`` (DeiT's sampler spreads them the same way), and
to the same rank, a range apart, on fewer ranks. Worker roles then split that sequence as above, so a role
may read parts of two ranges (its ``segments``). DeiT's ``RASampler`` works on an index list; a streaming
reader of tar shards needs ranges, hence this arithmetic.

Reading a range costs one pass over its shards plus skipping into the first one, so ranks and workers
may outnumber shards and shards may be uneven.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from vit.data.index import DataError


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's shard permutation: the same on every rank and worker for one (seed, epoch)."""
    order = list(range(num_shards))
    random.Random(derive_seed(seed, epoch, 0x5A4D)).shuffle(order)
    return order


def role_batches(num_batches: int, num_roles: int) -> list[int]:
    """Batches per worker role: ``num_batches // k`` each, the first ``num_batches % k`` one more. With the
    DataLoader's round-robin over workers, rank-batch i then comes from role ``i % k``."""
    return [num_batches // num_roles + (role < num_batches % num_roles) for role in range(num_roles)]


@dataclass(frozen=True)
class RoleRange:
    """One worker role's share of an epoch: ``segments``, (start, count) runs of positions of the cyclic
    sample sequence read one after the other (one run without repeated augmentation), in ``num_batches``
    batches."""

    segments: tuple[tuple[int, int], ...]
    num_batches: int

    @property
    def start(self) -> int:
        return self.segments[0][0] if self.segments else 0

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.segments)

    @property
    def end(self) -> int:
        """The position after the last run: where stand-ins for corrupt samples are read from."""
        return self.segments[-1][0] + self.segments[-1][1] if self.segments else 0


def plan_epoch(num_samples: int, batch_size: int, rank: int, world_size: int, num_roles: int, *,
               train: bool, drop_last: bool = False, repeats: int = 1,
               epoch: int = 0) -> tuple[int, list[RoleRange]]:
    """(batches this rank yields, each role's range), by the rules in the module docstring. ``repeats``
    (training only) is the repeated-augmentation count; ``epoch`` matters only with it."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    if train:
        per_rank = world_size * batch_size
        batches = num_samples // per_rank if drop_last else -(-num_samples // per_rank)
        if batches == 0:
            raise DataError(
                f"{num_samples} samples are fewer than world_size x batch_size = {per_rank}: no full batch per rank"
            )
        rank_samples = batches * batch_size
        if repeats == 1:
            runs = [(rank * rank_samples, rank_samples)]
        else:
            unique = -(-rank_samples // repeats)  # U: distinct samples per rank
            base = epoch * world_size * unique % num_samples
            runs, left = [], rank_samples
            for copy in range(repeats):
                count = min(unique, left)
                runs.append((base + (rank - copy) % world_size * unique, count))
                left -= count
    else:
        rank_start = rank * num_samples // world_size
        rank_samples = (rank + 1) * num_samples // world_size - rank_start
        batches = -(-rank_samples // batch_size)
        runs = [(rank_start, rank_samples)]
    ranges, offset = [], 0
    for count in role_batches(batches, num_roles):
        samples = max(min(count * batch_size, rank_samples - offset), 0)
        ranges.append(RoleRange(segments=_cut(runs, offset, samples), num_batches=count))
        offset += count * batch_size
    return batches, ranges


def _cut(runs: list[tuple[int, int]], offset: int, length: int) -> tuple[tuple[int, int], ...]:
    """Positions ``[offset, offset + length)`` of the sequence the ``runs`` make, as runs of their own."""
    pieces, position = [], 0
    for start, count in runs:
        low, high = max(offset, position), min(offset + length, position + count)
        if low < high:
            pieces.append((start + low - position, high - low))
        position += count
    return tuple(pieces)
