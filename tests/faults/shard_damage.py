"""Ways to damage a real shard on disk, and the checks the storage scenarios share.

Offsets come from the tar headers themselves (``TarInfo.offset_data``), so each injection lands where
it says: inside a member's data, not in padding or a header by luck.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from pipeline.manifest import WORK_DIR, file_sha256

IMAGE_SUFFIXES = (".jpg", ".png", ".webp")


def image_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return [m for m in tar.getmembers() if m.name.endswith(IMAGE_SUFFIXES)]


def truncate_mid_member(path: Path) -> tuple[int, str]:
    """Cut the shard in the middle of the data of its middle image; (samples left whole, the cut member)."""
    images = image_members(path)
    victim = images[len(images) // 2]
    path.write_bytes(path.read_bytes()[: victim.offset_data + victim.size // 2])
    return len(images) // 2, victim.name


def flip_image_headers(path: Path, count: int) -> list[str]:
    """Invert the first 4 bytes of the first ``count`` image members (the JPEG SOI/APP markers): the
    samples keep their size and their tar headers, but no decoder recognises them. Returns their keys."""
    images = image_members(path)[:count]
    data = bytearray(path.read_bytes())
    for member in images:
        for offset in range(member.offset_data, member.offset_data + 4):
            data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    return [member.name.split(".", 1)[0] for member in images]


def flip_mid_image_byte(path: Path) -> str:
    """Invert one byte in the middle of the first image's entropy-coded data: the kind of damage a decoder
    may not notice (it decodes a slightly wrong picture), but a checksum does. Returns the member name."""
    member = image_members(path)[0]
    data = bytearray(path.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return member.name


def assert_nothing_half_done(out: Path, *, temporary_files: bool = False) -> list[str]:
    """After a failed run: no ``dataset.json`` (nothing presented as finished), no temporary files left
    (unless ``temporary_files``: a Ray worker stopped mid-write cannot clean up; its hidden
    ``.NAME.tar.tmp-PID`` is never taken for a shard, and the next run removes it), and every shard file
    there whole (its receipt's sha256, every member readable). Returns the shard paths, relative to ``out``."""
    assert not (out / "dataset.json").exists(), "a failed run must not leave a dataset.json"
    leftovers = [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert all(p.name.startswith(".") for p in leftovers), leftovers
    assert temporary_files or not leftovers, f"temporary files left behind: {leftovers}"
    present = []
    for shard in sorted(out.glob("*/*.tar")):
        relative = str(shard.relative_to(out))
        split, name = shard.parent.name, shard.stem  # train, train-000003
        receipt = json.loads((out / WORK_DIR / f"{name}.json").read_text())
        assert receipt["shard"]["path"] == relative and split in name
        assert receipt["shard"]["sha256"] == file_sha256(shard), f"{relative} is not the shard its receipt records"
        with tarfile.open(shard) as tar:
            for member in tar:
                tar.extractfile(member).read()
        present.append(relative)
    return present
