"""Grad-CAM of a vanilla and a CDEP ISIC run side by side (paper Fig. 3): where each model looks.

Loads each run's best checkpoint (trained on cached features or on images alike) into the
whole VGG16 and draws, for test images with a patch (and, on generated data, malignant test
images with one pasted on), the image and each model's heat map of the class it predicts.

    .venv/bin/python scripts/isic/gradcam.py --vanilla outputs/isic_synthetic/vanilla/lam=0/seed=0/default \
        --cdep outputs/isic_synthetic/cdep/lam=10/seed=0/default
"""
import argparse
import inspect
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch


from cdep_exp.data.isic import CLASSES, build_isic
from cdep_exp.data.images import IMAGENET_MEAN, IMAGENET_STD
from cdep_exp.tools.gradcam import grad_cam, last_conv_activation
from cdep_exp.models.vgg import VGG16Classifier, build_vgg16
from cdep_exp.run.record import RunRecord

# Settings that fix the frozen layers and the images; both runs must share them.
SHARED = ("root", "image_size", "split_seed", "mask_dir")


def load_run(run_dir: Path) -> tuple[dict, VGG16Classifier]:
    """The run's resolved config and its best weights in a whole-network VGG16."""
    config = RunRecord.load(run_dir / RunRecord.FILE).config_on()
    settings = {k: v for k, v in config["model"].items() if k != "_target_"}
    model = build_vgg16(**settings)
    model.load_trained(torch.load(run_dir / "checkpoints" / "best.pt", map_location="cpu", weights_only=True))
    return config, model.eval()


def pick_images(dataset_cfg: dict, n: int) -> list[tuple[str, torch.Tensor]]:
    """Up to n test images with a patch, then up to n patched malignant ones, as (title, image)."""
    accepted = inspect.signature(build_isic).parameters  # the builder's arguments, not the app's meta keys
    args = {k: v for k, v in dataset_cfg.items() if k in accepted}
    splits = build_isic(**args)
    chosen = [("benign, patch", x) for x, y, mask in splits.tests["test"] if mask.any()][:n]
    patched = splits.tests.get("test_malignant_patched", [])
    chosen += [("malignant, patch pasted", x) for x, y, mask in patched if y == 1][:n]
    if not chosen:
        raise SystemExit("The test split has no image with a patch to show.")
    return chosen


def unnormalise(x: torch.Tensor) -> np.ndarray:
    """An ImageNet-normalised (3, H, W) image as (H, W, 3) RGB in [0, 1] for imshow."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vanilla", type=Path, required=True, help="run directory of a vanilla run")
    parser.add_argument("--cdep", type=Path, required=True, help="run directory of a CDEP run")
    parser.add_argument("--n", type=int, default=4, help="images per kind")
    parser.add_argument("--out", type=Path, default=Path("results/figures/isic_gradcam.png"))
    args = parser.parse_args()

    (cfg_v, vanilla), (cfg_c, cdep) = load_run(args.vanilla), load_run(args.cdep)
    differ = [k for k in SHARED if cfg_v["dataset"].get(k) != cfg_c["dataset"].get(k)]
    differ += [f"model.{k}" for k in ("pretrained", "init_seed") if cfg_v["model"].get(k) != cfg_c["model"].get(k)]
    if differ:
        raise SystemExit(f"The runs differ in dataset settings {differ}; compare runs on the same data.")
    images = pick_images(cfg_v["dataset"], args.n)
    x = torch.stack([img for _, img in images])
    models = {"vanilla": vanilla, "CDEP": cdep}
    with torch.no_grad():
        probs = {name: model(x).softmax(1) for name, model in models.items()}
    maps = {name: grad_cam(model, last_conv_activation(model), x, probs[name].argmax(1))
            for name, model in models.items()}

    fig, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.6 * len(images)), squeeze=False)
    for row, (title, img) in enumerate(images):
        shown = unnormalise(img)
        axes[row, 0].imshow(shown)
        axes[row, 0].set_title(title, fontsize=9)
        for col, name in enumerate(maps, start=1):
            axes[row, col].imshow(shown)
            axes[row, col].imshow(maps[name][row].numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            p, label = probs[name][row].max(0)
            axes[row, col].set_title(f"{name}: {CLASSES[label]} {p:.2f}", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
