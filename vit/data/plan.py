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
    """One worker role's share of an epoch: ``num_samples`` positions of the cyclic sample sequence from
    ``start``, in ``num_batches`` batches."""

    start: int
    num_samples: int
    num_batches: int


def plan_epoch(num_samples: int, batch_size: int, rank: int, world_size: int, num_roles: int, *,
               train: bool, drop_last: bool = False) -> tuple[int, list[RoleRange]]:
    """(batches this rank yields, each role's range), by the rule in the module docstring."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if train:
        per_rank = world_size * batch_size
        batches = num_samples // per_rank if drop_last else -(-num_samples // per_rank)
        if batches == 0:
            raise DataError(
                f"{num_samples} samples are fewer than world_size x batch_size = {per_rank}: no full batch per rank"
            )
        rank_start, rank_samples = rank * batches * batch_size, batches * batch_size
    else:
        rank_start = rank * num_samples // world_size
        rank_samples = (rank + 1) * num_samples // world_size - rank_start
        batches = -(-rank_samples // batch_size)
    ranges, offset = [], 0
    for count in role_batches(batches, num_roles):
        samples = min(count * batch_size, rank_samples - offset)
        ranges.append(RoleRange(start=rank_start + offset, num_samples=max(samples, 0), num_batches=count))
        offset += count * batch_size
    return batches, ranges
