"""A planted language model: known features, a known integration of two of them, and a stimulus set that
switches them, so that stages 00-06 can be checked against the truth.

``load_model("planted:seed=3,integration=0.2")`` builds it in-process from its spec (nothing to download):
a two-block encoder behind the same interface as a loaded Hugging Face encoder (layer mapping, hooks,
splice, readouts) with a word-level tokenizer. Each text's layer-1 activation at every real token is

    x_t = e(w_t) + a(T) d_A + b(T) d_B + integration * a(T) b(T) u_AB + noise * c(T)

* ``e(w)``: the word's embedding, a sum of two of ``n_token_features`` random unit directions (values in
  [0.5, 1.5]): the features an SAE learns, in superposition (256 directions in 64 dimensions);
* ``a(T)``: the text's *formality*, the intensity of its formal marker word (0 in casual texts: no formal
  marker); ``b(T)``, its *emotion*, likewise for an emotional marker. Each marker word has its own intensity in
  [1, 2], so ``a b`` varies from text to text and no single latent can stand for the three terms at once;
* ``u_AB``: the **integration direction**, present only where both factors are, with size ``a b`` (a
  multiplicative, strictly pairwise term). ``integration=0`` is the same model without it;
* ``c(T)``: the text's own *context*, a Gaussian vector (``E||c||^2 = 1``) drawn from the text's words, so
  that a text always gets the same one and the four variants of an item get independent ones. It is what
  makes an item's 2x2 contrast noisy, as the rest of a real sentence does; with ``noise=0`` every feature
  that reads the layer linearly has an exact, noiseless contrast, and any test of it has full power.

Block 2 passes ``x`` on unchanged, so the encoder readout (the mean-pooled output's cosine to the condition
centroids) reads ``u_AB`` directly: changing the integration changes the readout non-additively in the two
factors, and :func:`oracle_contrast` says by how much.

The stimulus set (:attr:`PlantedModel.stimuli`) is the 2x2 of minimal pairs that stage 05 and 06 need: each
item's four variants share their filler words and differ only in which formality marker (formal or casual)
and which emotion marker (emotional or neutral) they carry. It is also the corpus of stage 00 (``corpus =
"stimuli"``), as the embedded profile's stimulus set is.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

PREFIX = "planted:"
MODEL_TYPE = "featint_planted"
LAYER = 1
"""The layer that holds the planted features (``hidden_states[1]``, the context block's output)."""


@dataclass(frozen=True)
class PlantedSpec:
    """What a planted model is made of; everything else follows from ``seed``."""

    seed: int = 0
    """Seeds the features, the vocabulary, the marker intensities and the stimulus set."""
    integration: float = 0.2
    """Size of the integration term per unit of ``a b`` (0: none)."""
    d: int = 64
    """Width of the hidden states."""
    n_token_features: int = 256
    """Directions the words' embeddings are made of."""
    n_fillers: int = 400
    """Content words (their embeddings are what an SAE mostly learns)."""
    n_markers: int = 8
    """Marker words per factor level (formal, casual, emotional, neutral)."""
    n_items: int = 600
    """Stimulus items (four variants each)."""
    words: int = 8
    """Filler words per text (each text also has its two markers)."""
    noise: float = 0.0
    """Size of each text's own context ``c(T)`` (root mean square norm; 0: none)."""

    @classmethod
    def parse(cls, name: str) -> PlantedSpec:
        """``planted:seed=3,integration=0.2`` (any field of the spec, others at their defaults)."""
        if not name.startswith(PREFIX):
            raise ValueError(f"a planted model's name starts with {PREFIX!r}, got {name!r}")
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        values = {}
        for part in filter(None, name[len(PREFIX) :].split(",")):
            key, _, value = part.partition("=")
            key = key.strip()
            if key not in fields:
                raise ValueError(f"{name!r}: unknown planted-model setting {key!r}; known: {sorted(fields)}")
            try:
                values[key] = float(value) if fields[key] == "float" else int(value)
            except ValueError as err:
                raise ValueError(f"{name!r}: {key}={value!r} is not a number") from err
        spec = cls(**values)
        if spec.integration < 0 or spec.noise < 0 or spec.words < 1 or spec.n_items < 4 or spec.n_markers < 1:
            raise ValueError(
                f"{name!r}: needs integration >= 0, noise >= 0, words >= 1, n_items >= 4 and n_markers >= 1"
            )
        return spec

    @property
    def name(self) -> str:
        """The canonical name (every field), which :meth:`parse` reads back."""
        return PREFIX + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LEVELS = ("formal", "casual", "emotional", "neutral")


@dataclass(frozen=True)
class Truth:
    """The planted model's ground truth (float64 arrays)."""

    token_features: np.ndarray
    """[n_token_features, d] unit directions of the words' embeddings."""
    formality: np.ndarray
    """[d] ``d_A``, the formality direction (unit)."""
    emotion: np.ndarray
    """[d] ``d_B``, the emotion direction (unit)."""
    integration_direction: np.ndarray
    """[d] ``u_AB`` (unit)."""
    integration: float
    """Its size per unit of ``a b``."""
    intensity: dict[str, float]
    """Each formal or emotional marker word's intensity (``a`` or ``b``)."""


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


class _Vocabulary:
    """Words, their embeddings and marker intensities, drawn from the spec's seed."""

    def __init__(self, spec: PlantedSpec):
        rng = np.random.default_rng(spec.seed + 7_001)
        self.features = _unit(rng, spec.n_token_features, spec.d)
        self.formality, self.emotion, self.integration_direction = _unit(rng, 3, spec.d)
        self.fillers = [f"w{i}" for i in range(spec.n_fillers)]
        self.markers = {level: [f"{level}{i}" for i in range(spec.n_markers)] for level in LEVELS}
        self.words = SPECIALS + self.fillers + [w for level in LEVELS for w in self.markers[level]]
        n_words = len(self.words)
        embedding = np.zeros((n_words, spec.d))
        for w in range(len(SPECIALS), n_words):  # two token features per word, values in [0.5, 1.5]
            chosen = rng.choice(spec.n_token_features, 2, replace=False)
            embedding[w] = rng.uniform(0.5, 1.5, 2) @ self.features[chosen]
        self.embedding = embedding
        index = {w: i for i, w in enumerate(self.words)}
        self.a = np.zeros(n_words)  # formality intensity of each word (formal markers only)
        self.b = np.zeros(n_words)
        for word, value in zip(self.markers["formal"], rng.uniform(1.0, 2.0, spec.n_markers)):
            self.a[index[word]] = value
        for word, value in zip(self.markers["emotional"], rng.uniform(1.0, 2.0, spec.n_markers)):
            self.b[index[word]] = value
        self.index = index


def truth(spec: PlantedSpec) -> Truth:
    vocab = _Vocabulary(spec)
    intensity = {w: float(vocab.a[vocab.index[w]]) for w in vocab.markers["formal"]}
    intensity |= {w: float(vocab.b[vocab.index[w]]) for w in vocab.markers["emotional"]}
    return Truth(
        vocab.features, vocab.formality, vocab.emotion, vocab.integration_direction, spec.integration, intensity
    )


def tokenizer_for(spec: PlantedSpec):
    """A word-level tokenizer over the vocabulary that frames a text as BERT does (``[CLS] ... [SEP]``)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = _Vocabulary(spec)
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab.words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=512,
    )


def stimuli_for(spec: PlantedSpec) -> pd.DataFrame:
    """The planted 2x2 stimulus set, in the project's stimulus format (see the module docstring)."""
    vocab = _Vocabulary(spec)
    rng = np.random.default_rng(spec.seed + 7_013)
    rows = []
    for item in range(spec.n_items):
        fillers = list(rng.choice(vocab.fillers, spec.words, replace=False))
        marker = {level: vocab.markers[level][rng.integers(spec.n_markers)] for level in LEVELS}
        slots = sorted(rng.choice(spec.words + 1, 2, replace=False))  # where the two markers go
        for formality in ("formal", "casual"):
            for emotion in ("emotional", "neutral"):
                words = list(fillers)
                words.insert(slots[1], marker[emotion])
                words.insert(slots[0], marker[formality])
                rows.append(
                    {
                        "item_id": f"planted_{item:04d}",
                        "topic": f"topic{item % 8}",
                        "formality": formality,
                        "emotion": emotion,
                        "valence": "positive" if emotion == "emotional" else "neutral",
                        "text": " ".join(words),
                    }
                )
    frame = pd.DataFrame(rows)
    frame["condition"] = frame["formality"] + "_" + frame["emotion"]
    return frame


class PlantedConfig:
    """The few ``config`` fields the pipeline reads of a model."""

    model_type = MODEL_TYPE
    num_hidden_layers = 2
    architectures = ["PlantedModel"]

    def __init__(self, spec: PlantedSpec, vocab_size: int):
        self.spec = spec
        self.hidden_size = spec.d
        self.vocab_size = vocab_size


def text_context(input_ids: torch.Tensor, attention_mask: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """[batch, d] each text's context ``c(T)``: standard normal / sqrt(d), drawn from the text's real token ids
    (padding does not change it) and ``seed``, on the host, so the same text gets the same vector anywhere."""
    out = torch.empty(len(input_ids), d)
    for row, (ids, mask) in enumerate(zip(input_ids.cpu(), attention_mask.cpu())):
        key = zlib.crc32(ids[mask.bool()].numpy().astype(np.int64).tobytes())
        out[row] = torch.randn(d, generator=torch.Generator().manual_seed(key * 1_000_003 + seed)) / d**0.5
    return out


class ContextBlock(nn.Module):
    """Block 1: adds the text's formality, emotion, their integration and the text's own context at every
    token (module docstring)."""

    def __init__(self, vocab: _Vocabulary, integration: float, noise: float = 0.0, seed: int = 0):
        super().__init__()
        self.register_buffer("a", torch.tensor(vocab.a, dtype=torch.float32))
        self.register_buffer("b", torch.tensor(vocab.b, dtype=torch.float32))
        self.register_buffer("formality", torch.tensor(vocab.formality, dtype=torch.float32))
        self.register_buffer("emotion", torch.tensor(vocab.emotion, dtype=torch.float32))
        self.register_buffer("direction", torch.tensor(vocab.integration_direction, dtype=torch.float32))
        self.integration = integration
        self.noise, self.seed = noise, seed
        self.input_ids: torch.Tensor | None = None  # set by the model before each forward
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        mask = self.attention_mask.to(hidden.dtype)
        a = (self.a.to(hidden.dtype)[self.input_ids] * mask).amax(1)[:, None, None]  # [batch, 1, 1]
        b = (self.b.to(hidden.dtype)[self.input_ids] * mask).amax(1)[:, None, None]
        added = a * self.formality + b * self.emotion + self.integration * a * b * self.direction
        if self.noise > 0:
            context = text_context(self.input_ids, self.attention_mask, hidden.shape[-1], self.seed)
            added = added + self.noise * context.to(hidden.device, hidden.dtype)[:, None, :]
        return hidden + added.to(hidden.dtype)


class PassBlock(nn.Module):
    """Block 2: the output is its input (the readout sees layer 1 as it is)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


class PlantedModel(nn.Module):
    """The planted encoder (module docstring): ``embeddings`` -> ``layers[0]`` (context) -> ``layers[1]``."""

    def __init__(self, spec: PlantedSpec):
        super().__init__()
        vocab = _Vocabulary(spec)
        self.config = PlantedConfig(spec, len(vocab.words))
        self.embeddings = nn.Embedding(len(vocab.words), spec.d)
        with torch.no_grad():
            self.embeddings.weight.copy_(torch.from_numpy(vocab.embedding))
        self.layers = nn.ModuleList([ContextBlock(vocab, spec.integration, spec.noise, spec.seed), PassBlock()])

    @property
    def base_model(self) -> nn.Module:
        return self

    def get_output_embeddings(self):
        return None

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False, **_):
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        context = self.layers[0]
        context.input_ids, context.attention_mask = input_ids, attention_mask
        states = [self.embeddings(input_ids)]
        for block in self.layers:
            states.append(block(states[-1]))
        return BaseModelOutput(
            last_hidden_state=states[-1], hidden_states=tuple(states) if output_hidden_states else None
        )
