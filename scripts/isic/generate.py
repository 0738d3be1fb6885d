"""Generate the small ISIC-like set (cdep_exp/data/isic_synthetic.py) that runs the ISIC
pipeline offline. Then find its patches as on real data: scripts/isic/segment.py --root ROOT.

    python scripts/isic/generate.py [--root data/isic_synthetic] [--size 64]

Run it from the repository root (or as `python -m scripts.isic.generate`).
"""
import argparse
from pathlib import Path


from cdep_exp.data.isic_synthetic import generate_isic_like


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("data/isic_synthetic"))
    parser.add_argument("--n-benign", type=int, default=700)
    parser.add_argument("--n-malignant", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--patch-fraction", type=float, default=0.5,
                        help="fraction of the benign images that get coloured patches")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = generate_isic_like(args.root, args.n_benign, args.n_malignant, args.size,
                              args.patch_fraction, args.seed)
    print(f"ISIC-like set ready in {root}")
    return root


if __name__ == "__main__":
    main()
