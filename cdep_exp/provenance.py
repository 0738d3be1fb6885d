"""What a run records about where it ran: code revision, device and peak memory."""
import resource
import subprocess
import sys
from pathlib import Path

import torch


def git_revision(cwd: Path) -> dict[str, str | bool]:
    """Commit hash and whether the tree had uncommitted changes; 'unknown' outside a git checkout."""
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": True}


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; an unavailable CUDA device is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto")
    return device


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> dict[str, float | str]:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_kind": "cuda_max_allocated"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**30 if sys.platform == "darwin" else 2**20
    return {"peak_memory_gib": rss_kib / scale, "peak_memory_kind": "process_max_rss"}
