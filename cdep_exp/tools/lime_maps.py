"""LIME (Ribeiro et al. 2016, the `lime` package) explanations of a trained model, as maps of the
shapes `cdep_exp.tools.attributions` gives: (H, W) per image, (d,) per table row, (T,) per text.

LIME fits a sparse linear model to the classifier's probability of class y on perturbed copies
of one input; a feature's map value is its weight in that model (signed). Per kind:

* images (`lime_image`): the segments are the grid of square patches that CD decomposes
  (`attributions.patch_groups`), hidden by the training images' mean value per channel (LIME's
  own default, each segment's mean, leaves a flat patch such as DecoyMNIST's unchanged, so it
  could never see it); 1,000 samples (LIME's default);
* tables (`lime_tabular`): LIME's defaults, features discretised into quartiles of the
  training rows, 5,000 samples;
* texts (`lime_text`): every token position its own feature (bow=False), a dropped token
  replaced by the unknown word, 5,000 samples.

`random_state` fixes LIME's draws. `LimeExplainer.explain` is one explanation; its time is what
the timing table reports (building the explainer, e.g. the tabular quartiles, is done once).
"""
import numpy as np
import torch
from lime.lime_image import LimeImageExplainer
from lime.lime_tabular import LimeTabularExplainer
from lime.lime_text import LimeTextExplainer
from torch import Tensor, nn

from cdep_exp.tools.attributions import default_patch, input_kind, patch_groups

# Where a text dataset's vocabulary has no unknown word, a dropped token becomes padding (id 0).
UNKNOWN_WORDS = ("<unk>", "<UNK>", "[UNK]")


class LimeExplainer:
    """LIME for one model and one kind of input (module docstring).

    model: the trained model (eval mode); train: training inputs (N, ...) of the kind explained
    (LIME's statistics for tables, the hiding value for images); vocab: token id → word, for
    text; patch: the image segments' side (default `default_patch`); batch: model inputs per
    forward pass.
    """

    def __init__(self, model: nn.Module, train: Tensor, vocab: list[str] | None = None, patch: int | None = None,
                 random_state: int = 0, batch: int = 500) -> None:
        self.model, self.batch, self.random_state = model, batch, random_state
        self.kind = input_kind(train)
        if self.kind == "text":
            if vocab is None:
                raise ValueError("LIME on token ids needs the dataset's vocabulary (Splits.vocab)")
            self.vocab = vocab
            self.ids = {word: i for i, word in enumerate(vocab)}
            self.unknown = next((w for w in UNKNOWN_WORDS if w in self.ids), vocab[0])
            self.explainer = LimeTextExplainer(split_expression=" ", bow=False, mask_string=self.unknown,
                                               random_state=random_state)
        elif self.kind == "table":
            self.explainer = LimeTabularExplainer(train.cpu().numpy(), mode="classification",
                                                  random_state=random_state)
        else:
            self.channels, height, width = train.shape[1:]
            self.hide = train.mean((0, 2, 3)).cpu().numpy()
            if self.channels == 1:
                self.hide = np.repeat(self.hide, 3)
            groups = patch_groups(height, width, patch or default_patch(height, width))
            self.segments = (groups[:, 0, 0].argmax(0) if len(groups) > 1 else torch.zeros(height, width)).numpy()
            self.explainer = LimeImageExplainer(random_state=random_state)

    @torch.no_grad()
    def probabilities(self, x: Tensor) -> np.ndarray:
        """Softmax probabilities (N, C) of model inputs x, `batch` at a time."""
        device = next(self.model.parameters()).device
        parts = [torch.softmax(self.model(x[i:i + self.batch].to(device)), 1).cpu() for i in range(0, len(x), self.batch)]
        return torch.cat(parts).double().numpy()

    def _texts(self, texts: list[str]) -> np.ndarray:
        rows = [torch.tensor([self.ids.get(w, self.ids[self.unknown]) for w in t.split(" ")]) for t in texts]
        return self.probabilities(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True))

    def _images(self, images: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(images).float().permute(0, 3, 1, 2)
        return self.probabilities(x[:, :1] if self.channels == 1 else x)

    def explain(self, x: Tensor, y: int) -> Tensor:
        """LIME's weights for class y of one input x (one sample, no batch axis; token ids
        without padding), as a map: (H, W), (d,) or (T,)."""
        if self.kind == "text":
            words = [self.vocab[int(i)] for i in x]
            out = self.explainer.explain_instance(" ".join(words), self._texts, labels=(y,), num_features=len(words))
            weights = torch.zeros(len(words))
        elif self.kind == "table":
            out = self.explainer.explain_instance(x.cpu().numpy(), lambda rows: self.probabilities(
                torch.from_numpy(rows).float()), labels=(y,), num_features=x.shape[-1])
            weights = torch.zeros(x.shape[-1])
        else:
            image = x.cpu().permute(1, 2, 0).numpy().astype(np.float64)
            image = np.repeat(image, 3, axis=2) if self.channels == 1 else image
            out = self.explainer.explain_instance(
                image, self._images, labels=(y,), top_labels=None, hide_color=self.hide, batch_size=100,
                segmentation_fn=lambda _: self.segments, random_seed=self.random_state)
            weights = torch.zeros(int(self.segments.max()) + 1)
        for feature, weight in out.as_map()[y] if self.kind != "image" else out.local_exp[y]:
            weights[feature] = weight
        return weights[torch.from_numpy(self.segments)] if self.kind == "image" else weights
