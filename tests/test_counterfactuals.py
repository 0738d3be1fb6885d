"""Every builder's counterfactual test sets: same samples, same labels, only the annotated features changed."""
from pathlib import Path

import numpy as np
import pytest
import torch

from cdep_exp.data.colormnist import build_colormnist, class_colors
from cdep_exp.data.compas import RACES, build_compas
from cdep_exp.data.decoymnist import build_decoymnist, corner_mask, scale
from cdep_exp.data.isic import build_isic
from cdep_exp.data.isic_synthetic import generate_isic_like
from cdep_exp.data.sst import POSITIVE, build_sst
from test_data_compas import write_csv
from test_data_sst import write_trees


def stacked(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(item[0], int(item[1])) for item in dataset])
    return torch.stack(xs), torch.tensor(ys)


def check_pairs(splits) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per counterfactual: (factual x, counterfactual x, labels), after checking they pair up
    (with a test set, or with validation for the one `val_shortcut` names)."""
    out = {}
    for name, cf in splits.counterfactuals.items():
        assert cf.description and (cf.test == "val") == (name == splits.val_shortcut), name
        x, y = stacked(splits.val if cf.test == "val" else splits.tests[cf.test])
        x_cf, y_cf = stacked(cf.dataset)
        assert torch.equal(y, y_cf), name
        out[name] = (x, x_cf, y)
    return out


def test_decoymnist_counterfactuals_change_only_the_patch(fake_mnist_dir: Path) -> None:
    splits = build_decoymnist(str(fake_mnist_dir), source="idx")
    pairs = check_pairs(splits)
    assert set(pairs) == {"patch_removed", "patch_train_shade", "val_patch_random_shade"}
    x, repainted, y = pairs.pop("val_patch_random_shade")
    val_corners = corner_mask(5).bool().expand(len(x), 1, 28, 28)
    assert torch.equal(x[~val_corners], repainted[~val_corners]) and not torch.equal(x, repainted)
    corners = corner_mask(5).bool().expand(len(pairs["patch_removed"][0]), 1, 28, 28)
    for name, (x, x_cf, y) in pairs.items():
        assert torch.equal(x[~corners], x_cf[~corners]), name
    x, removed, y = pairs["patch_removed"]
    assert (removed[corners] == -1).all()  # the fake digits have no ink in the corners
    _, shaded, _ = pairs["patch_train_shade"]
    changed = (shaded != x).flatten(1)
    patch_pixels = (shaded != removed).flatten(1).sum(1)
    assert ((patch_pixels == 25) | (y == 10)).all()  # one 5×5 square per image (shade 255 − 25y > 0)
    shade = (shaded[corners].view(len(y), -1).max(1).values + 1) / 2 * 255
    torch.testing.assert_close(shade, (255 - 25 * y).float(), atol=0.01, rtol=0)
    assert changed.any(1)[y != 5].all()  # test shade 25y equals the training one only for y = 5


def test_colormnist_counterfactuals_recolour_the_digit(fake_mnist_dir: Path) -> None:
    splits = build_colormnist(str(fake_mnist_dir), source="idx")
    pairs = check_pairs(splits)
    assert set(pairs) == {"recoloured_train", "recoloured_random", "val_recoloured_random"}
    colors = torch.tensor(class_colors(), dtype=torch.float32)
    for name, (x, x_cf, y) in pairs.items():
        background = x[:, :, 0, 0].view(-1, 3, 1, 1)  # fake digits have no ink at (0, 0): −mean/std
        ink = (x - background).abs().sum(1) > 1e-4
        assert torch.equal(ink, (x_cf - background).abs().sum(1) > 1e-4), name  # same digit shape
        # (x − background) = digit · colour / std per channel, so the ratio of the two images'
        # inked pixels is the ratio of their colours, channel by channel.
        for i in range(len(y)):
            test_colour, j = colors[9 - y[i]], ink[i].nonzero()[0]
            ratio = (x_cf[i, :, j[0], j[1]] - background[i, :, 0, 0])
            ratio = ratio / (x[i, :, j[0], j[1]] - background[i, :, 0, 0])
            if name == "recoloured_train":
                positive = test_colour > 0.05
                expected = colors[y[i]][positive] / test_colour[positive]
                torch.testing.assert_close(ratio[positive], expected, rtol=1e-3, atol=1e-4)
    _, random_cf, y = pairs["recoloured_random"]
    assert not torch.equal(random_cf, pairs["recoloured_train"][1])


def test_compas_counterfactuals_flip_and_remove_race(tmp_path: Path) -> None:
    write_csv(tmp_path / "compas" / "compas-scores-two-years.csv")
    splits = build_compas(str(tmp_path))
    pairs = check_pairs(splits)
    black, white = RACES.index("African-American"), RACES.index("Caucasian")
    x, flipped, _ = pairs["race_flipped"]
    assert torch.equal(x[:, 6:], flipped[:, 6:])
    assert torch.equal(flipped[:, black], x[:, white]) and torch.equal(flipped[:, white], x[:, black])
    others = [i for i in range(len(RACES)) if i not in (black, white)]
    assert torch.equal(flipped[:, others], x[:, others])
    x, removed, _ = pairs["race_removed"]
    assert (removed[:, :6] == 0).all() and torch.equal(x[:, 6:], removed[:, 6:])


def words(dataset, vocab) -> list[list[str]]:
    return [[vocab[i] for i in item[0].tolist()] for item in dataset]


def test_sst_decoy_counterfactuals_swap_and_remove_the_decoy(tmp_path: Path) -> None:
    write_trees(tmp_path / "sst" / "trees")
    splits = build_sst(str(tmp_path), variant="decoy")
    vocab = splits.train.vocab
    assert set(splits.counterfactuals) == {"bias_swapped", "bias_removed", "val_bias_swapped"}
    dev = words(splits.val, vocab)
    for plain_dev, swapped_dev, item in zip(dev, words(splits.counterfactuals["val_bias_swapped"].dataset, vocab),
                                            splits.val):
        wrong = "video" if int(item[1]) == POSITIVE else "text"
        at = swapped_dev.index(wrong)
        assert swapped_dev[:at] + swapped_dev[at + 1:] == plain_dev
    planted = words(splits.tests["test_decoy"], vocab)
    swapped = words(splits.counterfactuals["bias_swapped"].dataset, vocab)
    removed = words(splits.counterfactuals["bias_removed"].dataset, vocab)
    plain = words(splits.tests["test"], vocab)
    assert removed == plain
    labels = [int(item[1]) for item in splits.tests["test"]]
    for p, s, r, label, item in zip(planted, swapped, removed, labels, splits.tests["test_decoy"]):
        own, other = ("text", "video") if label == POSITIVE else ("video", "text")
        at = p.index(own)
        assert p[:at] + p[at + 1:] == r and len(s) == len(p)
        assert s[at] == other and s[:at] + s[at + 1:] == r
        assert item[2].tolist() == [float(i == at) for i in range(len(p))]


def test_sst_articles_counterfactuals_exchange_the_articles(tmp_path: Path) -> None:
    write_trees(tmp_path / "sst" / "trees")
    splits = build_sst(str(tmp_path), variant="articles")
    vocab = splits.train.vocab
    plain = words(splits.tests["test"], vocab)
    swapped = words(splits.counterfactuals["bias_swapped"].dataset, vocab)
    removed = words(splits.counterfactuals["bias_removed"].dataset, vocab)
    exchange = {"a": "the", "the": "a"}
    assert swapped == [[exchange.get(t, t) for t in s] for s in plain]
    assert removed == [[t for t in s if t not in exchange] or ["<unk>"] for s in plain]
    assert build_sst(str(tmp_path), variant="none").counterfactuals == {}


def test_isic_generated_counterfactuals_paste_and_remove_patches(tmp_path: Path) -> None:
    root = generate_isic_like(tmp_path / "isic", n_benign=12, n_malignant=6, size=16, patch_fraction=0.5, seed=0)
    splits = build_isic(str(root), source="processed", image_size=16, mask_dir="true_masks",
                        fractions=(0.34, 0.33, 0.33), dilation=0)
    assert set(splits.counterfactuals) == {"patch_pasted", "patch_removed", "val_patch_pasted"}
    assert splits.counterfactuals["patch_pasted"].dataset is splits.tests["test_malignant_patched"]
    pairs = check_pairs(splits)
    test = splits.tests["test"]
    masks = torch.stack([item[2] for item in test]).bool()
    x, pasted, y = pairs["patch_pasted"]
    assert torch.equal(x[y == 0], pasted[y == 0]) and (x[y == 1] != pasted[y == 1]).any()
    x, removed, y = pairs["patch_removed"]
    has_patch = masks.flatten(1).any(1)
    assert has_patch.any() and torch.equal(x[~has_patch], removed[~has_patch])
    for i in has_patch.nonzero().flatten():
        outside = ~masks[i].expand_as(x[i])
        assert (x[i] != removed[i]).any()
        # Away from the soft plaster edge the pixels are those of the unpatched render.
        assert (x[i][outside] - removed[i][outside]).abs().float().median() == 0


def test_colormnist_colour_annotation_is_x_minus_its_grey_version(fake_mnist_dir: Path) -> None:
    pixels = build_colormnist(str(fake_mnist_dir), source="idx")
    colour = build_colormnist(str(fake_mnist_dir), source="idx", annotation="colour")
    x, _ = stacked(colour.train)
    part = torch.stack([item[2] for item in colour.train])
    assert torch.equal(x, stacked(pixels.train)[0]) and part.shape == x.shape
    background = x[:, :, :1, :1]  # fake digits have no ink at (0, 0)
    grey = (x - part - background).double()  # digit · mean colour / std_c: one image up to 1/std_c
    ink = grey.abs().amin(1) > 1e-3
    for a, b in ((0, 1), (1, 2)):
        ratio = grey[:, a][ink] / grey[:, b][ink]  # std_b / std_a at every inked pixel of every image
        assert ratio.std() / ratio.mean().abs() < 1e-4
    assert (part != 0).any()
    with pytest.raises(ValueError):
        build_colormnist(str(fake_mnist_dir), source="idx", annotation="hue")


def class_attribute_pairs(splits, split: str) -> set[tuple[int, str]]:
    """The (class, shortcut attribute) groups present in a split."""
    dataset = splits.train if split == "train" else splits.val if split == "val" else splits.tests[split]
    labels = [int(item[1]) for item in dataset]
    assert len(splits.groups[split]) == len(labels), split
    return set(zip(labels, splits.groups[split]))


def test_every_builder_labels_the_shortcut_attribute_of_every_split(tmp_path: Path, fake_mnist_dir: Path) -> None:
    """Training data carry the shortcut for every class; the tests break it (or mix it)."""
    decoy = build_decoymnist(str(fake_mnist_dir), source="idx")
    assert {a for _, a in class_attribute_pairs(decoy, "train")} == {"class shade"}
    assert {a for _, a in class_attribute_pairs(decoy, "test")} == {"other shade"}
    colour = build_colormnist(str(fake_mnist_dir), source="idx")
    assert {a for _, a in class_attribute_pairs(colour, "train")} == {"class colour"}
    assert {a for _, a in class_attribute_pairs(colour, "val")} == {"other colour"}
    assert {a for _, a in class_attribute_pairs(build_colormnist(str(fake_mnist_dir), source="idx",
                                                                 val_colors="train"), "val")} == {"class colour"}
    write_trees(tmp_path / "sst" / "trees")
    sst = build_sst(str(tmp_path), variant="decoy")
    assert class_attribute_pairs(sst, "train") == {(POSITIVE, '"text"'), (1 - POSITIVE, '"video"')}
    assert {a for _, a in class_attribute_pairs(sst, "test")} == {"no bias word"}
    assert {a for _, a in class_attribute_pairs(sst, "test_decoy")} == {'"text"', '"video"'}
    write_csv(tmp_path / "compas" / "compas-scores-two-years.csv")
    assert {a for _, a in class_attribute_pairs(build_compas(str(tmp_path)), "train")} <= set(RACES)
    root = generate_isic_like(tmp_path / "isic", n_benign=12, n_malignant=6, size=16, patch_fraction=0.5, seed=0)
    isic = build_isic(str(root), source="processed", image_size=16, mask_dir="true_masks",
                      fractions=(0.34, 0.33, 0.33), dilation=0)
    assert (0, "patch") in class_attribute_pairs(isic, "train")
    assert {a for _, a in class_attribute_pairs(isic, "test_no_patches")} == {"no patch"}
