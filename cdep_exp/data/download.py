"""Fetching dataset files for users with a network, so that an interrupted download never
leaves a half-written file under its final name."""
import urllib.request

from cdep_exp.atomic import write_atomic

__all__ = ["fetch", "write_atomic"]


def fetch(url: str, timeout: float = 30.0) -> bytes:
    """The whole payload at `url`; raises urllib.error.URLError (or OSError) offline."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()
