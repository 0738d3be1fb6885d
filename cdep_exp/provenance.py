"""What a run records about where it ran: code revision, device and peak memory."""
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from cdep_exp.errors import ConfigError

# Linux: writing 5 to clear_refs resets VmHWM, the peak resident set size in status.
CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


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
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a torch device ({str(err).splitlines()[0]}); use auto, cpu or cuda.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for but CUDA is not available; use device=cpu or device=auto.")
    return device


def device_name(device: torch.device) -> str:
    """Human-readable device for cost tables: the GPU's name, or the CPU model and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model} ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or on Linux the process's resident-set
    high-water mark (so a worker that runs several jobs reports each job's own peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif CLEAR_REFS.exists():
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            pass


def peak_memory_gib(device: torch.device) -> dict[str, float | str]:
    """CUDA: peak allocated tensor memory. CPU: the peak resident set size since the last reset
    (Linux; elsewhere since the process started)."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_memory_kind": "cuda_max_allocated"}
    if STATUS.exists():
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return {"peak_memory_gib": int(line.split()[1]) / 2**20, "peak_memory_kind": "process_peak_rss"}
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 2**30 if sys.platform == "darwin" else 2**20
    return {"peak_memory_gib": rss_kib / scale, "peak_memory_kind": "process_max_rss"}
