"""Fetching dataset files for users with a network, so that an interrupted download never
leaves a half-written file under its final name."""
import os
import tempfile
import urllib.request
from pathlib import Path


def fetch(url: str, timeout: float = 30.0) -> bytes:
    """The whole payload at `url`; raises urllib.error.URLError (or OSError) offline."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def write_atomic(dest: Path, payload: bytes) -> None:
    """Write to a temporary file beside `dest`, then rename it into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
