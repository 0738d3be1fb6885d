import numpy as np
import pytest
import torch

from cdep_exp.provenance import CLEAR_REFS, device_name, peak_memory_gib, reset_peak_memory

CPU = torch.device("cpu")


def test_cpu_device_name_gives_the_thread_count() -> None:
    assert device_name(CPU).endswith(f"({torch.get_num_threads()} threads)")


@pytest.mark.skipif(not CLEAR_REFS.exists(), reason="peak reset needs Linux /proc")
def test_reset_starts_a_new_peak_after_a_large_allocation_is_freed() -> None:
    block = np.ones(2**28 // 8)  # 256 MiB, touched
    before = peak_memory_gib(CPU)["peak_memory_gib"]
    del block
    reset_peak_memory(CPU)
    after = peak_memory_gib(CPU)
    assert after["peak_memory_kind"] == "process_peak_rss"
    assert after["peak_memory_gib"] < before - 0.2
