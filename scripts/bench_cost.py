"""Seconds per training step and peak memory of each explanation penalty (paper Table S1 as ratios).

DecoyMNIST setting: MNISTCNN (1 channel, FC 256), batch 64, synthetic 28×28 inputs with the
four-corner 5×5 annotation, Adam; ColorMNIST setting: MNISTCNN (3 channels, FC 500), batch 256,
with the original CDEP's 8 sampled single-pixel masks a batch (the datasets' own batch sizes).
Each method trains its own model; after warm-up the methods take their timed steps in turn
(round-robin), so load from other processes hits all alike, in three runs whose spread is
reported.

Then the cost of contextual decomposition on current architectures (torchvision resnet18 at
batch 8, 64×64; a 2-layer transformer text classifier and a 2-layer Hugging Face BERT from
token ids, at batch 32, 40 tokens): a decompose call as a multiple of a forward (both without
gradients; for a model fx traces, the eager capture's too), and a CDEP training step as a
multiple of a vanilla one, timed round-robin as well (`--archs` picks them, `--archs none`
skips them). BERT is decomposed by the eager capture (fx cannot trace it).
Run: `.venv/bin/python scripts/bench_cost.py` (or `make bench-cost`).
"""
import argparse
import functools
import itertools
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import pandas as pd
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cdep_exp.cd import decompose
from cdep_exp.cd.rules import model_rule
from cdep_exp.data.decoymnist import corner_mask
from cdep_exp.models import MNISTCNN
from cdep_exp.models.text import TransformerClassifier
from cdep_exp.models.vision import build_torchvision_cnn
from cdep_exp.models.zoo import build_hugging_face_text
from cdep_exp.penalties import CDEP, RRR, ExpectedGradients, Penalty, Vanilla

# setting → (input channels, hidden units, annotation, batch of conf/dataset/<setting>.yaml);
# each setting's ratios are against its own vanilla row. ColorMNIST: the original CDEP's 8
# single-pixel masks a batch, drawn from a sampling distribution over pixels (k + 1 = 9 streams).
SETTINGS = {
    "DecoyMNIST": (1, 256, "corners", 64),
    "ColorMNIST": (3, 500, "pixels", 256),
}
METHODS = {
    ("DecoyMNIST", "vanilla"): Vanilla,
    ("DecoyMNIST", "CDEP"): CDEP,
    ("DecoyMNIST", "RRR"): RRR,
    ("DecoyMNIST", "EG (1 reference)"): lambda: ExpectedGradients(references=1),
    ("ColorMNIST", "vanilla"): Vanilla,
    ("ColorMNIST", "CDEP (8 masks)"): lambda: CDEP(mask_samples=8),
}
MiB = 2**20


class Trainer:
    """One method's model, optimiser and fixed batch; `step()` is one full training step."""

    def __init__(self, setting: str, penalty: Penalty, batch: int | None, device: torch.device) -> None:
        channels, hidden, annotation, own_batch = SETTINGS[setting]
        batch = batch or own_batch
        torch.manual_seed(0)
        self.model = MNISTCNN(channels, hidden).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3, weight_decay=1e-4)
        self.penalty = penalty
        self.x = (torch.rand(batch, channels, 28, 28) * 2 - 1).to(device)
        self.y = torch.randint(10, (batch,)).to(device)
        if annotation == "corners":
            self.annotation = corner_mask(5).expand(batch, 1, 28, 28).to(device)
        else:
            self.annotation = torch.rand(1, 28, 28, device=device)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        logits, value = self.penalty(self.model, self.x, self.y, self.annotation)
        (F.cross_entropy(logits, self.y) + value).backward()
        self.optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ log lines (file descriptor 2), which no setting turns off."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak(trainer: Trainer, device: torch.device) -> int:
    """Peak bytes of tensor memory live during one step, above what was live before it.

    The gradients are freed first, so the step's own gradients count. CUDA: max_memory_allocated
    after a reset; CPU: the profiler's allocation and free events of the step, summed in time
    order.
    """
    trainer.optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        trainer.step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def resident_bytes(trainer: Trainer) -> int:
    """Bytes a method holds between steps: parameters, optimiser state and the batch."""
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    tensors = [*trainer.model.parameters(), *state, trainer.x, trainer.y, trainer.annotation]
    return sum(t.numel() * t.element_size() for t in tensors)


def spread(values: list[float]) -> str:
    """'median (min–max)' of per-run figures."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def bench_device(device: torch.device, batch: int | None, warmup: int, steps: int, runs: int) -> pd.DataFrame:
    """Per method: median step time over `runs` runs of `steps` round-robin steps each, its
    ratio to the setting's vanilla per run (median and range over the runs), and step memory."""
    trainers = {key: Trainer(key[0], build(), batch, device) for key, build in METHODS.items()}
    for trainer in trainers.values():
        for _ in range(warmup):
            trainer.step()
    sync(device)
    per_run: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
    for _ in range(runs):
        times: dict[tuple[str, str], list[float]] = {key: [] for key in trainers}
        for _ in range(steps):
            for key, trainer in trainers.items():
                start = time.perf_counter()
                trainer.step()
                sync(device)
                times[key].append(time.perf_counter() - start)
        for key in trainers:
            per_run[key].append(statistics.median(times[key]))

    rows = []
    for (setting, method), trainer in trainers.items():
        base = (setting, "vanilla")
        peak = step_peak(trainer, device)
        ratios = [t / v for t, v in zip(per_run[(setting, method)], per_run[base])]
        rows.append({
            "setting": setting, "method": method,
            "s/step": statistics.median(per_run[(setting, method)]),
            "time ×vanilla (range)": spread(ratios),
            "step peak MiB": peak / MiB,
            "total MiB": (peak + resident_bytes(trainer)) / MiB,
        })
    table = pd.DataFrame(rows).set_index(["setting", "method"])
    vanilla = table.xs("vanilla", level="method")
    for column, ratio in {"step peak MiB": "step peak", "total MiB": "total"}.items():
        base = vanilla[column].reindex(table.index.get_level_values("setting")).to_numpy()
        table.insert(table.columns.get_loc(column) + 1, f"{ratio} ×vanilla", table[column] / base)
    return table


def _resnet18_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    model = build_torchvision_cnn("resnet18", num_classes=10, in_channels=3)
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    annotation = torch.zeros(8, 1, 64, 64)
    annotation[..., :12, :12] = 1
    return model, x, torch.randint(10, (8,)), annotation, "softmax"


def _transformer_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    model = TransformerClassifier(vocab_size=1000, embed_dim=64, heads=4, layers=2, ff_dim=128, num_classes=2)
    tokens = torch.randint(1, 1000, (32, 40))
    annotation = torch.rand(32, 40) < 0.2
    return model, tokens, torch.randint(2, (32,)), annotation, "text"


def _bert_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    model = build_hugging_face_text("bert", vocab_size=1000, num_classes=2, hidden_size=64, layers=2, heads=4,
                                    intermediate_size=128)
    tokens = torch.randint(1, 1000, (32, 40))
    annotation = torch.rand(32, 40) < 0.2
    return model, tokens, torch.randint(2, (32,)), annotation, "text"


ARCHS = {
    "resnet18": ("torchvision resnet18, batch 8, 3×64×64", _resnet18_case),
    "transformer": ("transformer text classifier (d 64, 4 heads, 2 layers), batch 32, 40 tokens", _transformer_case),
    "hf_bert": ("Hugging Face BERT (d 64, 4 heads, 2 layers), token ids, batch 32, 40 tokens", _bert_case),
}


def bench_arch(name: str, device: torch.device, warmup: int, steps: int) -> dict[str, float]:
    """Median ms of a no-grad forward, a no-grad decompose, a vanilla and a CDEP training step
    (each with its own copy of the model, in train mode), timed round-robin."""
    torch.manual_seed(0)
    build = ARCHS[name][1]
    runs = {}
    for method in ("vanilla", "CDEP"):
        torch.manual_seed(0)
        model, x, y, annotation, form = build()
        model, x, y, annotation = model.to(device).train(), x.to(device), y.to(device), annotation.to(device)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        penalty = Vanilla() if method == "vanilla" else CDEP(form=form)

        def step(model=model, optimizer=optimizer, penalty=penalty, x=x, y=y, annotation=annotation) -> None:
            optimizer.zero_grad(set_to_none=True)
            logits, value = penalty(model, x, y, annotation)
            (F.cross_entropy(logits, y) + value).backward()
            optimizer.step()

        runs[f"{method} step"] = step
        if method == "vanilla":
            def forward(model=model, x=x) -> None:
                with torch.no_grad():
                    model(x)

            def decomposition(model=model, x=x, annotation=annotation, capture="auto") -> None:
                with torch.no_grad():
                    decompose(model, x, annotation, capture=capture)

            runs["forward"], runs["decompose"] = forward, decomposition
            if model_rule(type(model)) is None and x.is_floating_point():  # fx traces it: the eager capture beside
                runs["eager decompose"] = functools.partial(decomposition, capture="eager")
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(steps):
        for key, fn in runs.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "forward ms": ms["forward"], "decompose ms": ms["decompose"],
        "decompose ×forward": ms["decompose"] / ms["forward"],
        "eager decompose ×forward": ms["eager decompose"] / ms["forward"] if "eager decompose" in ms else float("nan"),
        "vanilla step ms": ms["vanilla step"], "CDEP step ms": ms["CDEP step"],
        "CDEP step ×vanilla": ms["CDEP step"] / ms["vanilla step"],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA: {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo
                      if line.startswith("model name")), model)
    return f"CPU: {model}, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size for every setting (default: each dataset's own, 64 and 256)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per method")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method and run")
    parser.add_argument("--runs", type=int, default=3, help="runs of --steps round-robin steps; the spread is over them")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CPU, then CUDA when available")
    parser.add_argument("--archs", default=",".join(ARCHS),
                        help=f"comma-separated architectures for the CD cost table ({', '.join(ARCHS)}), or 'none'")
    parser.add_argument("--arch-warmup", type=int, default=2, help="untimed calls per measurement")
    parser.add_argument("--arch-steps", type=int, default=10, help="timed calls per measurement")
    args = parser.parse_args()
    archs = [] if args.archs == "none" else [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        parser.error(f"--archs: unknown {unknown}; choose from {list(ARCHS)}")

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device != "cpu" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    batches = f"batch {args.batch}" if args.batch else "each dataset's batch (64, 256)"
    print(f"DecoyMNIST: MNISTCNN(1, 256), 4-corner 5×5 mask; ColorMNIST: MNISTCNN(3, 500), 8 pixel masks "
          f"a batch. {batches.capitalize()}, Adam; per method {args.warmup} warm-up steps, then {args.runs} runs "
          f"of {args.steps} timed steps (forward, penalty, backward, optimiser step), round-robin.")
    print("s/step: median wall time of a step over all runs. time ×vanilla: per run, the median "
          "step time over the setting's vanilla median; median (min–max) over the runs. step peak: "
          "the most tensor memory live during a step above what was live before it (CPU: torch "
          "profiler allocation events; CUDA: max_memory_allocated). total: step peak + parameters, "
          "Adam state and batch.\n")
    for device in devices:
        print(f"## {device_name(device)}\n")
        table = bench_device(device, args.batch, args.warmup, args.steps, args.runs)
        print(table.reset_index().to_markdown(index=False, floatfmt=".3g"), end="\n\n")
        if archs:
            print(f"### Contextual decomposition on current architectures ({device_name(device)})\n")
            print(f"Train mode, Adam; {args.arch_warmup} warm-up and {args.arch_steps} timed calls per "
                  f"measurement, round-robin; medians. forward/decompose without gradients.\n")
            rows = {f"{a}: {ARCHS[a][0]}": bench_arch(a, device, args.arch_warmup, args.arch_steps) for a in archs}
            print(pd.DataFrame(rows).T.to_markdown(floatfmt=".3g"), end="\n\n")


if __name__ == "__main__":
    main()
