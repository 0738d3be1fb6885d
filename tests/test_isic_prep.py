"""ISIC data preparation on tiny generated images: generator, patch segmentation, the
prepare / segment / download scripts (no network, no real data)."""
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cdep_exp.data.isic_segment import SegmentParams, iou, segment_patches
from cdep_exp.data.isic_synthetic import generate_isic_like, paste_patches, render_sample
from scripts.isic import download, generate, prepare, segment

N_BENIGN, N_MALIGNANT, SIZE = 12, 6, 32


def ids(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.png"))


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: (content, mtime in ns)."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def pngs(root: Path) -> dict[str, bytes]:
    return {name: content for name, (content, _) in snapshot(root).items() if name.endswith(".png")}


def read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_isic_like(tmp_path_factory.mktemp("gen") / "isic_synthetic", N_BENIGN,
                              N_MALIGNANT, SIZE, patch_fraction=0.5, seed=0)


def test_generator_layout(generated: Path) -> None:
    benign, malignant = ids(generated / "benign"), ids(generated / "malignant")
    assert len(benign) == N_BENIGN and len(malignant) == N_MALIGNANT
    assert not set(benign) & set(malignant)
    # Labels are drawn over the ids, so both halves of the sorted ids hold both classes.
    everything = sorted(benign + malignant)
    for half in (everything[: len(everything) // 2], everything[len(everything) // 2 :]):
        assert set(half) & set(benign) and set(half) & set(malignant)
    patched = ids(generated / "true_masks")
    assert len(patched) == N_BENIGN // 2 and set(patched) <= set(benign)  # benign only
    assert ids(generated / "counterfactual/malignant_patched") == malignant
    assert ids(generated / "counterfactual/masks") == malignant
    image = read(generated / "benign" / f"{benign[0]}.png")
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    for mask_path in [*(generated / "true_masks").glob("*.png"),
                      *(generated / "counterfactual/masks").glob("*.png")]:
        mask = read(mask_path)
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) == {0, 255}


def test_generator_is_deterministic_and_idempotent(generated: Path, tmp_path: Path) -> None:
    before = snapshot(generated)
    assert generate_isic_like(generated, N_BENIGN, N_MALIGNANT, SIZE, 0.5, 0) == generated
    assert snapshot(generated) == before  # nothing rewritten
    again = generate_isic_like(tmp_path / "again", N_BENIGN, N_MALIGNANT, SIZE, 0.5, 0)
    assert pngs(again) == pngs(generated)  # same seed, same bytes
    other = generate_isic_like(tmp_path / "other", N_BENIGN, N_MALIGNANT, SIZE, 0.5, seed=1)
    assert pngs(other) != pngs(again)
    with pytest.raises(FileExistsError, match="another root"):
        generate_isic_like(generated, N_BENIGN, N_MALIGNANT, SIZE, 0.5, seed=1)
    assert not list(generated.parent.glob(f".{generated.name}.*"))


def test_counterfactual_is_the_malignant_image_plus_patches(generated: Path) -> None:
    for name in ids(generated / "malignant"):
        original = read(generated / "malignant" / f"{name}.png").astype(int)
        patched = read(generated / "counterfactual/malignant_patched" / f"{name}.png").astype(int)
        mask = read(generated / "counterfactual/masks" / f"{name}.png") > 0
        near = ndimage.binary_dilation(mask, iterations=3)  # plaster edges are soft
        assert mask.any() and np.array_equal(original[~near], patched[~near])
        assert np.abs(original[mask] - patched[mask]).sum(-1).min() > 30


def test_segmentation_recovers_patches_and_spares_lesions() -> None:
    # 30 patched benign images and 30 clean ones (half of them malignant) at 64 px. On 200 such images the
    # mean IoU is 0.995 (lowest 0.86) with perfect detection; without the border refinement it
    # was 0.82, so 0.95 catches a broken step while leaving room for library versions.
    scores = []
    for index in range(60):
        patched = index % 2 == 0
        sample = render_sample(7, index, 64, malignant=index % 4 == 1)
        if patched:
            sample = paste_patches(sample, 7, index)
        mask = segment_patches(sample.image)
        assert mask.dtype == bool and mask.shape == (64, 64)
        assert not (mask & sample.lesion).any()  # dark, skin-hued lesions are not patches
        assert mask.any() == patched
        if patched:
            scores.append(iou(mask, sample.patch))
    assert np.mean(scores) >= 0.95 and min(scores) >= 0.7


def test_iou() -> None:
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert iou(a, b) == 1.0  # nothing to find, nothing found
    a[:2], b[1:3] = True, True
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, np.zeros_like(a)) == 0.0


def test_segment_script(generated: Path, tmp_path: Path) -> None:
    root = shutil.copytree(generated, tmp_path / "root")
    figure = tmp_path / "fig" / "masks.png"
    scores = segment.main(["--root", str(root), "--figure", str(figure)])
    assert ids(root / "masks") == ids(root / "true_masks")  # patch presence == mask file
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0 and scores["mean_iou"] > 0.9
    assert read(figure).shape[2] == 4
    before = snapshot(root / "masks")
    segment.write_masks(root, ["benign"], SegmentParams())
    assert snapshot(root / "masks") == before  # same settings: not redone
    with pytest.raises(SystemExit, match="--force"):
        segment.main(["--root", str(root), "--figure", str(figure), "--hue-distance", "0.2"])
    segment.write_masks(root, ["benign", "malignant"], SegmentParams(), force=True)
    assert ids(root / "masks") == ids(root / "true_masks")  # no patch found on malignant ones


def write_raw(raw: Path, name: str, size: tuple[int, int], suffix: str) -> np.ndarray:
    pixels = np.random.default_rng(len(name)).integers(0, 256, (size[1], size[0], 3), np.uint8)
    raw.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(raw / f"{name}{suffix}")
    return pixels


def test_prepare_sorts_drops_and_resizes(tmp_path: Path) -> None:
    labels = {"ISIC_1": "benign", "ISIC_2": "Malignant", "ISIC_3": "indeterminate",
              "ISIC_4": None, "ISIC_5": "unknown", "ISIC_6": "benign", "ISIC_7": "malignant "}
    isic = tmp_path / "isic"
    isic.mkdir()
    pd.DataFrame({"isic_id": list(labels), "sex": "male", "benign_malignant": list(labels.values())}
                 ).to_csv(isic / "metadata.csv", index=False)
    sources = {name: write_raw(isic / "raw", name, (40, 25), ".JPG") for name in labels
               if name != "ISIC_6"}  # ISIC_6 has no image
    sources["ISIC_7"] = write_raw(isic / "raw", "ISIC_7", (30, 50), ".png")
    (isic / "raw" / "ISIC_7.JPG").unlink()

    counts = prepare.main(["--data-dir", str(tmp_path), "--size", "16"])
    out = isic / "processed_16"
    assert ids(out / "benign") == ["ISIC_1"] and ids(out / "malignant") == ["ISIC_2", "ISIC_7"]
    assert counts["dropped"] == 3 and counts["no_image"] == 1 and counts["written"] == 3
    resized = read(out / "malignant" / "ISIC_7.png")
    expected = Image.fromarray(sources["ISIC_7"]).resize((16, 16), Image.Resampling.BILINEAR)
    assert np.array_equal(resized, np.asarray(expected))  # aspect not kept, lossless PNG
    assert read(out / "benign" / "ISIC_1.png").shape == (16, 16, 3)

    before = snapshot(out)
    counts = prepare.main(["--data-dir", str(tmp_path), "--size", "16"])
    assert counts["written"] == 0 and counts["already_there"] == 3 and snapshot(out) == before
    prepare.main(["--data-dir", str(tmp_path), "--size", "16", "--ext", "jpg", "--out",
                  str(tmp_path / "jpg")])
    assert read(tmp_path / "jpg" / "benign" / "ISIC_1.jpg").shape == (16, 16, 3)


def test_prepare_names_missing_columns_and_files(tmp_path: Path) -> None:
    (tmp_path / "isic").mkdir()
    with pytest.raises(SystemExit, match="No ISIC metadata.*download.py"):
        prepare.main(["--data-dir", str(tmp_path)])
    (tmp_path / "isic" / "metadata.csv").write_text("isic_id,diagnosis_1\nISIC_1,Benign\n")
    with pytest.raises(SystemExit, match="benign_malignant.*--label-column"):
        prepare.main(["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="No downloaded images.*download.py"):
        prepare.main(["--data-dir", str(tmp_path), "--label-column", "diagnosis_1"])


FAKE_ISIC = f"""#!{sys.executable}
import os, sys
from pathlib import Path
with open(os.environ["ISIC_LOG"], "a") as log:
    log.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("ISIC_FAIL"):
    sys.exit(3)
out = Path(sys.argv[-1])
if sys.argv[1] == "metadata":
    out.write_text("isic_id,benign_malignant\\n")
else:
    out.mkdir(parents=True)
    (out / "metadata.csv").write_text("isic_id\\n")
"""


@pytest.fixture
def fake_isic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `isic` on PATH that logs its arguments and writes what isic-cli would."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "isic").write_text(FAKE_ISIC)
    (bin_dir / "isic").chmod(0o755)
    log = tmp_path / "isic.log"
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("ISIC_LOG", str(log))
    return log


def test_download_without_isic_cli_says_how_to_install(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no `isic` there
    with pytest.raises(SystemExit, match="pip install isic-cli"):
        download.main(["--data-dir", str(tmp_path)])
    assert not (tmp_path / "isic" / "metadata.csv").exists()


def test_download_calls_isic_cli_once(tmp_path: Path, fake_isic: Path) -> None:
    args = ["--data-dir", str(tmp_path), "--search", "image_type:dermoscopic", "--limit", "5"]
    download.main(args)
    isic = tmp_path / "isic"
    filters = "--search image_type:dermoscopic --limit 5"
    assert fake_isic.read_text().splitlines() == [
        f"metadata download {filters} --outfile {isic}/metadata.csv.partial",
        f"image download {filters} {isic}/raw",
    ]
    assert (isic / "metadata.csv").is_file() and (isic / "raw" / "metadata.csv").is_file()
    download.main(args)  # both steps done: isic-cli is not called again
    assert len(fake_isic.read_text().splitlines()) == 2


def test_download_failure_says_what_to_check(tmp_path: Path, fake_isic: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISIC_FAIL", "1")
    with pytest.raises(SystemExit, match="exit code 3.*network"):
        download.main(["--data-dir", str(tmp_path), "--metadata-only"])
    assert not list((tmp_path / "isic").iterdir())  # no half metadata.csv


def test_generate_script(tmp_path: Path) -> None:
    root = generate.main(["--root", str(tmp_path / "syn"), "--n-benign", "3", "--n-malignant",
                          "2", "--size", "24", "--seed", "5"])
    assert len(ids(root / "benign")) == 3 and len(ids(root / "malignant")) == 2
    assert read(root / "malignant" / f"{ids(root / 'malignant')[0]}.png").shape == (24, 24, 3)
    assert (root / "generated.json").is_file()
