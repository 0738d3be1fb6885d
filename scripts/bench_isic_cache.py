"""What the ISIC feature cache buys: cache-building time, seconds per CDEP epoch on the cache vs
through the whole VGG16 on images, and a check that both give the same CDEP penalty.

The whole-network epoch is extrapolated from a few timed steps. The check runs one batch of
patch images in eval mode: the cached penalty continues the frozen layers' decomposition read
back from the cache; the whole-network one decomposes the image with the dilated mask.

    .venv/bin/python scripts/bench_isic_cache.py                    # generated data, 64 px
    .venv/bin/python scripts/bench_isic_cache.py --root data/isic/processed_299 --size 299 \
        --mask-dir masks --pretrained
"""
import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cdep_exp.data.images import dilate, dilation_width, load_image, load_mask
from cdep_exp.data.isic import ImageDataset, class_weights, scan_root, split_records
from cdep_exp.data.isic_synthetic import generate_isic_like
from cdep_exp.feature_cache import CacheSettings, CachedFeatures, ensure_cache
from cdep_exp.models.vgg import VGG16Classifier, VGG16Head, vgg16_features
from cdep_exp.penalties import CDEP
from cdep_exp.provenance import resolve_device

# Relative tolerance of the penalty check per cache dtype (float16 rounds the cached features).
TOLERANCE = {"float16": 1e-2, "float32": 1e-5}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/isic_synthetic"),
                        help="dataset root; generated with the isic_synthetic defaults if missing")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--mask-dir", default="true_masks")
    parser.add_argument("--pretrained", action="store_true", help="ImageNet weights (default: random)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="float16", choices=sorted(TOLERANCE))
    parser.add_argument("--dilation", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed whole-network steps")
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def image_batch(records: list, size: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and dilated masks (what the cache decomposes with) of `records`."""
    x = torch.stack([load_image(r.image, size) for r in records])
    masks = [dilate(load_mask(r.mask, size), width) if r.mask else np.zeros((size, size), bool) for r in records]
    return x, torch.tensor([r.label for r in records]), torch.from_numpy(np.stack(masks)).float().unsqueeze(1)


def timed_steps(model, penalty, batches, optimizer, weights, device) -> list[float]:
    """Seconds of each training step (forward with the penalty, backward, update)."""
    times = []
    model.train()
    for x, y, annotation in batches:
        x, y, annotation = x.to(device), y.to(device), annotation.to(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits, value = penalty(model, x, y, annotation)
        (F.cross_entropy(logits, y, weight=weights) + 10 * value).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if not args.root.exists():
        generate_isic_like(args.root, size=args.size)
    records = scan_root(args.root, args.mask_dir)
    train = split_records(records)[0]
    features = vgg16_features(args.pretrained).to(device).eval()
    width = dilation_width(args.dilation, args.size)

    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache = ensure_cache(ImageDataset(records, args.size, width), features, CacheSettings(dtype=args.dtype),
                             Path(cache_dir), device)
        build = time.perf_counter() - start
        print(f"cache: {len(records)} images ({sum(r.mask is not None for r in records)} with patches), "
              f"{args.size} px, {args.dtype}, {device}: built in {build:.1f} s")

        torch.manual_seed(0)
        head = VGG16Head(hidden=args.hidden).to(device)
        weights = class_weights(records).to(device)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)
        row = {r.image: i for i, r in enumerate(records)}
        train_set = CachedFeatures(cache, [row[r.image] for r in train])
        loader = DataLoader(train_set, batch_size=args.batch, shuffle=True)
        start = time.perf_counter()
        timed_steps(head, CDEP().bind("relevant"), loader, optimizer, weights, device)
        cached_epoch = time.perf_counter() - start

        full = VGG16Classifier(features, head)
        chunks = [train[i : i + args.batch] for i in range(0, (args.steps + 1) * args.batch, args.batch)]
        steps = timed_steps(full, CDEP(), (image_batch(c, args.size, width) for c in chunks), optimizer, weights, device)
        full_epoch = statistics.median(steps[1:]) * len(loader)  # the first step warms up
        print(f"CDEP epoch ({len(train)} training images, batch {args.batch}, head hidden {args.hidden}): "
              f"{cached_epoch:.1f} s on the cache, ~{full_epoch:.1f} s through the whole network "
              f"({len(steps) - 1} timed steps × {len(loader)} batches), {full_epoch / cached_epoch:.1f}× slower")

        patched = [r for r in records if r.mask is not None][: args.batch]
        x, y, mask = image_batch(patched, args.size, width)
        full.eval()
        with torch.no_grad():
            _, whole = CDEP()(full, x.to(device), y.to(device), mask.to(device))
            cached = CachedFeatures(cache, [row[r.image] for r in patched])
            fx, fy, rel = next(iter(DataLoader(cached, batch_size=len(cached))))
            _, from_cache = CDEP().bind("relevant")(head, fx.to(device), fy.to(device), rel.to(device))
    gap = abs(whole.item() - from_cache.item()) / max(abs(whole.item()), 1e-12)
    verdict = "equal" if gap <= TOLERANCE[args.dtype] else "DIFFERENT"
    print(f"CDEP penalty on {len(patched)} patch images (eval): whole network {whole.item():.6f}, "
          f"from the {args.dtype} cache {from_cache.item():.6f}, relative gap {gap:.1e}: {verdict}")
    if verdict != "equal":
        raise SystemExit(1)


if __name__ == "__main__":
    main()
