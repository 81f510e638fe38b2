"""Fault: the output storage is unwritable or fills up while sharding (issue 7). `vitflow shard` runs as a
real subprocess against a real read-only folder, a real full filesystem (a small tmpfs) and a real
file-size quota (``RLIMIT_FSIZE``), with real Flowers-17 photos.

Each case expects a one-line error naming the output folder and the cause (no traceback), nothing half
done presented as finished (no ``dataset.json``, no temporary files, every shard file there whole), and,
once the storage is fixed, the same command completing, reusing the shards that were finished, and
``vitflow shard verify`` passing.

Root bypasses file modes, so a read-only folder only means something to a process without root's file
capabilities: as root, the subprocess drops ``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH`` and ``CAP_FOWNER``
from its bounding set before ``exec`` (``prctl(PR_CAPBSET_DROP)``), which leaves it root by uid but bound
by permissions. (Switching to ``nobody`` would not do here: the virtual environment's interpreter may live
under ``/root``, which ``nobody`` cannot enter.) A normal user needs nothing: ``chmod`` is enough.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.shard_damage import assert_nothing_half_done

pytestmark = pytest.mark.slow

VITFLOW = str(Path(sys.executable).parent / "vitflow")
PR_CAPBSET_DROP = 24
FILE_CAPABILITIES = (1, 2, 3)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
# 4 photos (~36 KB each) per shard: 24 train shards of ~150 KB, 8 test shards of 3 photos; ~5 MB in all.
SHARD_ARGS = ("--no-progress", "--shard-samples", "4")


def drop_file_privileges() -> None:
    """preexec_fn: as root, give up the capabilities that override file modes (in the exec'd program)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in FILE_CAPABILITIES:
        if libc.prctl(PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {capability})")


def file_size_quota(limit: int) -> Callable[[], None]:
    def apply() -> None:  # CPython ignores SIGXFSZ: a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def shard(source: Path, out: Path, *args: str, preexec: Callable[[], None] | None = None,
          ray_tmp: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if ray_tmp is not None:
        env.update(RAY_TMPDIR=str(ray_tmp), RAY_AUTH_MODE="disabled")
    return subprocess.run([VITFLOW, "shard", str(source), str(out), *SHARD_ARGS, *args], capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec, env=env)


def verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([VITFLOW, "shard", "verify", str(out)], capture_output=True, text=True, timeout=300)


def assert_clear_error(result: subprocess.CompletedProcess, out: Path, cause: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert str(out) in errors[0] and cause in errors[0], errors[0]
    return errors[0]


def cannot_write(directory: Path) -> bool:
    """Whether a process started like the sharder can create a file in ``directory`` (the injection held)."""
    probe = subprocess.run([sys.executable, "-c", f"open({str(directory / 'probe')!r}, 'w')"],
                           capture_output=True, text=True, preexec_fn=drop_file_privileges)
    return probe.returncode != 0 and "PermissionError" in probe.stderr


@pytest.fixture
def flowers(flowers_source) -> Path:
    """6 real Flowers-17 classes, 16 train and 4 test photos each (~36 KB a photo)."""
    return flowers_source


@pytest.fixture
def ray_tmp() -> Iterator[Path]:
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths are length-limited
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


def test_a_read_only_output_folder_is_a_clear_error_before_any_work(flowers, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cannot_write(out)
        started = time.perf_counter()
        result = shard(flowers, out, "--workers", "0", preexec=drop_file_privileges)
        seconds = time.perf_counter() - started
        assert_clear_error(result, out, "Permission denied")
        assert list(out.iterdir()) == []
    finally:
        out.chmod(0o755)
    result = shard(flowers, out, "--workers", "0", preexec=drop_file_privileges)
    assert result.returncode == 0, result.stderr
    assert verify(out).returncode == 0
    print(f"read-only OUT: refused in {seconds:.1f} s (CLI start included), nothing written")


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_read_only_split_folder_fails_the_shard_tasks_and_a_rerun_keeps_their_work(flowers, tmp_path, workers,
                                                                                    ray_tmp):
    """An earlier run left OUT a vitflow dataset; OUT/train has since become read-only, and a new seed
    means every shard is written again. The test split's shards land, each train shard task fails (in this
    process, or in Ray workers), and the error still reaches the user as one line."""
    out = tmp_path / "out"
    assert shard(flowers, out, "--workers", "0").returncode == 0
    (out / "train").chmod(0o555)
    try:
        assert cannot_write(out / "train")
        started = time.perf_counter()
        result = shard(flowers, out, "--workers", workers, "--seed", "1", preexec=drop_file_privileges,
                       ray_tmp=ray_tmp)
        failed_after = time.perf_counter() - started
        line = assert_clear_error(result, out, "Permission denied (EACCES)")
        assert re.search(r"cannot write train/train-\d{6}\.tar", line), line
        present = assert_nothing_half_done(out, temporary_files=workers != "0")
        # The earlier run's 24 train shards stay, whole (their folder is read-only).
        assert sum(p.startswith("train/") for p in present) == 24, present
        # The test shards (planned first) are each the earlier run's or this run's, whole: in order, all 8.
        # With 2 tasks in flight, the one beside the failing train task may have been cancelled after
        # publishing its new shard but before its receipt: that shard is removed (whole, but never "done"),
        # so at most one test shard is missing per extra task in flight.
        in_flight = max(int(workers), 1)
        test_shards = sum(p.startswith("test/") for p in present)
        assert 8 - (in_flight - 1) <= test_shards <= 8, present
    finally:
        (out / "train").chmod(0o755)
    started = time.perf_counter()
    result = shard(flowers, out, "--workers", workers, "--seed", "1", preexec=drop_file_privileges, ray_tmp=ray_tmp)
    rerun_s = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    counts = summary_counts(result.stdout)  # split -> (built, reused)
    assert counts["train"] == (24, 0) and sum(counts["test"]) == 8, result.stdout
    if workers == "0":  # in order: the 8 test shards were written before the first train shard failed
        assert counts["test"] == (0, 8)
    assert counts["test"][1] >= 1  # the failed run's finished work is kept
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    assert verify(out).returncode == 0
    print(f"read-only split folder, workers={workers}: failed after {failed_after:.1f} s; rerun {rerun_s:.1f} s "
          f"reused {counts['test'][1]} of 8 test shards")


@contextlib.contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Callable[[str], None] | None]:
    """A tmpfs of ``size`` at ``path`` and a function that resizes it (content kept), or None where this
    process may not mount (not root, or no CAP_SYS_ADMIN, as in a default container)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True).returncode == 0 if shutil.which("mount") else False
    if not mounted:
        yield None
        return

    def resize(new_size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield resize
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_full_disk_fails_cleanly_and_the_rerun_after_freeing_space_completes(flowers, tmp_path):
    """A 600 KiB tmpfs (the dataset needs ~5 MB): some shards land, then ENOSPC. Without the right to
    mount, the same run hits a 150 KB file-size quota (EFBIG) instead: the same guarantees must hold."""
    out = tmp_path / "out"
    with small_filesystem(out, "600k") as resize:
        quota = None if resize else file_size_quota(150_000)
        started = time.perf_counter()
        result = shard(flowers, out, "--workers", "0", preexec=quota)
        failed_after = time.perf_counter() - started
        cause = "No space left on device (ENOSPC)" if resize else "File too large (EFBIG)"
        line = assert_clear_error(result, out, cause)
        assert re.search(r"cannot write (train|test)/\1-\d{6}\.tar", line), line
        kept = assert_nothing_half_done(out)
        assert kept, "some shards fit before the disk was full"

        if resize:
            resize("64m")  # the fix: more space, same folder, same content
        started = time.perf_counter()
        result = shard(flowers, out, "--workers", "0")
        rerun_s = time.perf_counter() - started
        assert result.returncode == 0, result.stderr
        assert verify(out).returncode == 0
        assert_reused(result.stdout, len(kept))
        print(f"{'tmpfs full' if resize else 'file-size quota'}: failed after {failed_after:.1f} s with {len(kept)} "
              f"shards whole; rerun {rerun_s:.1f} s reused them")


def test_a_file_size_quota_fails_cleanly_and_the_rerun_without_it_completes(flowers, tmp_path):
    """RLIMIT_FSIZE works for any user: every shard over 150 KB fails with EFBIG, the smaller ones land."""
    out = tmp_path / "out"
    result = shard(flowers, out, "--workers", "0", preexec=file_size_quota(150_000))
    assert_clear_error(result, out, "File too large (EFBIG)")
    kept = assert_nothing_half_done(out)
    assert all((out / path).stat().st_size <= 150_000 for path in kept)
    result = shard(flowers, out, "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert_reused(result.stdout, len(kept))
    assert verify(out).returncode == 0


def summary_counts(summary: str) -> dict[str, tuple[int, int]]:
    """split -> (shards built, shards reused), from the summary table `vitflow shard` prints."""
    rows = [line.split("│") for line in summary.splitlines() if line.count("│") == 7]
    return {cells[1].strip(): (int(cells[5]), int(cells[6])) for cells in rows if cells[5].strip().isdigit()}


def assert_reused(summary: str, expected: int) -> None:
    assert sum(reused for _, reused in summary_counts(summary).values()) == expected, summary
