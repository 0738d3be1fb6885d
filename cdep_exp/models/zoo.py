"""Models from the zoos researchers train today, built from a config with random weights (no
download): a Hugging Face sequence classifier over token ids and a timm image classifier.

The CD engine decomposes both with capture="auto" (`cdep_exp.cd`): the Hugging Face model
eagerly, from token ids and a token mask (its input embedding is split by the mask while the
forward runs), the timm model like any image model (fx where it traces, eagerly where not).
Nothing here is a CD rule; the zoo packages are imported only when such a model is built.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from cdep_exp.models.vision import ResizedInput


class HuggingFaceTextClassifier(nn.Module):
    """Token ids (B, T), right-padded with `pad_index`, to logits (B, num_classes) through a
    `transformers` sequence classifier; attention ignores padding. Offers `embed` and
    `forward_embedded` (cdep_exp.models.base.TokenModel), so RRR and Expected Gradients
    differentiate with respect to the embedded tokens."""

    def __init__(self, model: nn.Module, pad_index: int) -> None:
        super().__init__()
        self.model = model
        self.pad_index = pad_index

    def embed(self, tokens: Tensor) -> Tensor:
        """Token ids (B, T) → the model's input embeddings (B, T, D) (positions are added inside)."""
        return self.model.get_input_embeddings()(tokens)

    def forward_embedded(self, embedded: Tensor, tokens: Tensor) -> Tensor:
        """Embedded tokens (B, T, D) → logits (B, C); `tokens` gives the padding."""
        return self.model(inputs_embeds=embedded, attention_mask=(tokens != self.pad_index).long()).logits

    def forward(self, tokens: Tensor) -> Tensor:
        return self.forward_embedded(self.embed(tokens), tokens)


def build_hugging_face_text(
    model_type: str = "bert",
    vocab_size: int = 1000,
    num_classes: int = 2,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate_size: int = 128,
    max_len: int = 512,
    pad_index: int = 0,
    dropout: float = 0.1,
    config: dict[str, Any] | None = None,
) -> HuggingFaceTextClassifier:
    """A `transformers` sequence classifier of `model_type` (tested: bert, distilbert, roberta,
    gpt2), random weights, sized by the arguments, which are mapped to those families' own config
    names; `config` overrides or adds config keys (another family's size names, e.g. llama's
    num_key_value_heads). Encoder-decoder families (t5, bart) are not sequence classifiers of
    embedded tokens and do not fit. Raises ValueError for a model type transformers
    does not know, ImportError without transformers installed."""
    import transformers

    sizes = {"hidden_size": hidden_size, "num_hidden_layers": layers, "num_attention_heads": heads,
             "intermediate_size": intermediate_size, "max_position_embeddings": max_len,
             "hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
    family = {  # the families that name their sizes differently
        "distilbert": {"dim": hidden_size, "n_layers": layers, "n_heads": heads, "hidden_dim": intermediate_size,
                       "max_position_embeddings": max_len, "dropout": dropout, "attention_dropout": dropout},
        "gpt2": {"n_embd": hidden_size, "n_layer": layers, "n_head": heads, "n_inner": intermediate_size,
                 "n_positions": max_len, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout},
    }.get(model_type, sizes)
    if model_type == "roberta":  # positions start after the padding index
        family = {**family, "max_position_embeddings": max_len + pad_index + 1}
    try:
        cfg = transformers.AutoConfig.for_model(
            model_type, vocab_size=vocab_size, num_labels=num_classes, pad_token_id=pad_index,
            **family, **(config or {}))
    except ValueError as err:
        raise ValueError(f"model.model_type={model_type!r} is not a transformers model type; tested here: "
                         f"bert, distilbert, roberta, gpt2 (transformers.CONFIG_MAPPING lists all)") from err
    model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    return HuggingFaceTextClassifier(model, pad_index)


def build_timm(
    name: str = "deit_tiny_patch16_224",
    num_classes: int = 10,
    in_channels: int = 3,
    image_size: int | None = 32,
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """timm's `name` with random weights, `num_classes` outputs and `in_channels` input channels.
    With `image_size`, inputs are resized to image_size × image_size first and the model is
    built for that size (`img_size`, for the families that take one: ViTs, Swin, MaxViT);
    `kwargs` go to timm.create_model (depth, embed_dim, …). Raises ValueError for a name timm
    does not know."""
    import timm

    if name not in timm.list_models():
        raise ValueError(f"model.name={name!r} is not a timm model; see timm.list_models()")
    args = dict(pretrained=False, num_classes=num_classes, in_chans=in_channels, **(kwargs or {}))
    if image_size is None:
        return timm.create_model(name, **args)
    try:
        model = timm.create_model(name, img_size=image_size, **args)
    except TypeError:  # a family that pools adaptively and takes no image size
        model = timm.create_model(name, **args)
    return ResizedInput(model, image_size)
