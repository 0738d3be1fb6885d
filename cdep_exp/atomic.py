"""Writing files so that a crash never leaves a half-written one under its final name, with the
permissions a plain write would give, and a full or read-only disk reported in one line."""
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cdep_exp.errors import StorageError

PARTIAL = ".part"


def default_mode() -> int:
    """The mode a new file gets from open(): 0o666 without the process's umask (mkstemp's files
    are 0600 whatever the umask, which would hide results from a cluster group). The umask is
    read from /proc where Linux shows it; elsewhere it is set and restored, for an instant in
    which another thread's new file would get 0666."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `dest`; rename it to `dest` when the block succeeds.

    The temporary name is unique per call (`.<name>.<random>.part`), so concurrent writers of
    one file never share it; on an exception the temporary file is removed and `dest` is left
    as it was. The file gets the umask's permissions. Raises StorageError (naming `dest`) when
    the disk is full, read-only or over a file-size limit.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=PARTIAL)
        os.close(fd)
        os.chmod(tmp, default_mode())
    except OSError as err:
        raise StorageError(f"Cannot write {dest} ({err.strerror}); free space, or choose a writable "
                           f"paths.output_dir.") from err
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError(f"Cannot write {dest} ({err.strerror}); free space, or choose a writable "
                           f"paths.output_dir.") from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, payload: bytes | str) -> None:
    """Write `payload` (bytes, or str as UTF-8) to `dest` atomically (see `atomic_path`)."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(payload.encode() if isinstance(payload, str) else payload)


def remove_partial_writes(folder: Path) -> list[Path]:
    """Delete the temporary files (`.*.part`) that writes killed mid-way left in `folder` and its
    subfolders; returns them. Only for a folder no other process writes to (a locked run)."""
    stale = [p for p in Path(folder).rglob(f".*{PARTIAL}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
