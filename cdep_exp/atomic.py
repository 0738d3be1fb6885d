"""Writing files so that a crash never leaves a half-written one under its final name."""
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `dest`; rename it to `dest` when the block succeeds.

    The temporary name is unique per call, so concurrent writers of one file never share it;
    on an exception the temporary file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(dest: Path, payload: bytes | str) -> None:
    """Write `payload` (bytes, or str as UTF-8) to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(payload.encode() if isinstance(payload, str) else payload)
