"""Every run parameter, defined once: its stage, type, default, meaning and the values it may take.

The notebooks' ``parameters`` cells repeat these defaults literally (papermill and JupyterLab read them
there); a test keeps the two equal, so "Run All" in a notebook is the same experiment as ``make run`` of the
embedded profile. Names are namespaced by what they control (``split_seed``, ``sae_seed``, ``nfm_seeds``,
``clamp_seed``, ...), so one name never means two things. :func:`validate` turns a degenerate value
(``sae_lr=inf``, ``sae_batch_size=0``, ``sae_train_tokens=-5``) into a clear error before any work starts.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Any


class ParameterError(ValueError):
    """A parameter has a value no run can use; the message names it and says what it may be."""


@dataclass(frozen=True)
class Parameter:
    name: str
    type: type
    default: Any
    doc: str
    check: str = ""
    """One of the checks in :data:`CHECKS` (empty: any value of the type)."""


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


CHECKS = {
    "positive": (lambda v: v > 0, "a positive number"),
    "non_negative": (lambda v: v >= 0, "zero or more"),
    "fraction": (lambda v: 0 < v < 1, "strictly between 0 and 1"),
    "probability": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "at_least_2": (lambda v: v >= 2, "at least 2"),
    "positive_list": (
        lambda v: len(_floats(v)) > 0 and all(x > 0 and math.isfinite(x) for x in _floats(v)),
        "a comma-separated list of positive finite numbers",
    ),
    "fraction_list": (
        lambda v: len(_floats(v)) > 0 and all(0 < x < 1 for x in _floats(v)),
        "a comma-separated list of numbers strictly between 0 and 1",
    ),
    "nonzero_list": (
        lambda v: len(_floats(v)) > 0 and all(x != 0 and math.isfinite(x) for x in _floats(v)),
        "a comma-separated list of non-zero finite numbers",
    ),
    "seed_list": (
        lambda v: len(_ints(v)) > 0 and len(set(_ints(v))) == len(_ints(v)) and min(_ints(v)) >= 0,
        "a comma-separated list of distinct seeds >= 0, e.g. 0,1",
    ),
    "dtype": (lambda v: v in ("float32", "float16"), "float32 or float16"),
    "model_dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v) is not None, "auto, cpu, cuda, cuda:N or mps"),
    "text": (lambda v: v.strip() != "", "a non-empty string"),
}

# Parameters that several stages read, with one meaning.
DEVICE = Parameter("device", str, "auto", '"auto" (GPU if present), "cpu" or "cuda"', "device")
MODEL_DTYPE = Parameter(
    "model_dtype",
    str,
    "float32",
    "language model weights: float32, bfloat16 or float16 (not the store's dtype)",
    "model_dtype",
)
RESUME = Parameter("resume", bool, True, "continue from a checkpoint of an interrupted run with the same settings")
KEEP_CHECKPOINTS = Parameter(
    "keep_checkpoints", bool, False, "keep finished trainings' optimiser state (only to train further)"
)
N_SHOW_FEATURES = Parameter("n_show_features", int, 6, "features whose top activations are listed", "non_negative")
NFM_SEED = Parameter("nfm_seed", int, 0, "the NFM (one of 02's nfm_seeds) that 03-06 take apart", "non_negative")
N_TOP_FEATURES = Parameter("n_top_features", int, 20, "features shown and compared per part", "positive")
N_BOOT = Parameter("n_boot", int, 2000, "bootstrap resamples for every interval", "positive")
FDR_Q = Parameter(
    "fdr_q", float, 0.05, "false-discovery (03's conjunction latents, 05) or family-wise (06) level", "fraction"
)

MAX_ITEMS = Parameter("max_items", int, 0, "stimulus items measured (0: all)", "non_negative")
STIMULUS_SET = Parameter(
    "stimulus_set",
    str,
    "default",
    '"default" (a planted model\'s own, else the project\'s), "minimal_pairs" or a CSV path',
    "text",
)

_P = Parameter
PARAMETERS: dict[str, dict[str, Parameter]] = {
    "00_activations": {
        p.name: p
        for p in [
            _P(
                "model",
                str,
                "embedded",
                '"embedded" (bundled MiniLM), a local model directory, or a Hugging Face name',
                "text",
            ),
            _P(
                "layer",
                int,
                3,
                "hidden_states index: 0 is the embedding output, L the output of block L-1",
                "non_negative",
            ),
            _P(
                "corpus",
                str,
                "stimuli",
                '"stimuli", a .txt/.jsonl/.parquet path, "hf:NAME[:CONFIG[:SPLIT]]" or "activations:PATH.npz"',
                "text",
            ),
            _P(
                "max_groups",
                int,
                0,
                "keep a seeded random subset of this many documents or items (0: all); a Hub corpus is "
                "streamed and its first this many kept",
                "non_negative",
            ),
            _P(
                "val_fraction",
                float,
                0.5,
                "documents/items held out: the SAE's validation and all the NFM stage's data",
                "fraction",
            ),
            _P("split_seed", int, 0, "seeds the train/held-out split and the max_groups subset", "non_negative"),
            _P("context_tokens", int, 128, "tokens per model context, special tokens included", "at_least_2"),
            _P("batch_size", int, 64, "contexts per forward pass", "positive"),
            _P("dtype", str, "float32", "storage dtype: float32 or float16", "dtype"),
            DEVICE,
            MODEL_DTYPE,
        ]
    },
    "01_primary_sae": {
        p.name: p
        for p in [
            _P(
                "primary_sae",
                str,
                "",
                '"" trains the SAE; a SAELens SAE directory or "saelens:RELEASE/SAE_ID" is installed instead',
            ),
            _P("sae_latents", int, 4096, "dictionary size", "positive"),
            _P("sae_k", int, 32, "active latents per token", "positive"),
            _P(
                "sae_train_tokens",
                int,
                1_000_000,
                "training-token budget (several epochs over a small store)",
                "positive",
            ),
            _P("sae_batch_size", int, 4096, "tokens per step", "positive"),
            _P("sae_lr", float, 3e-3, "Adam learning rate; 0 uses 2e-4 / sqrt(n_latents / 2**14)", "non_negative"),
            _P("sae_dead_tokens", int, 250_000, "a latent is dead after this many tokens without firing", "positive"),
            _P("sae_seed", int, 0, "seeds the SAE's initialisation and data order", "non_negative"),
            RESUME,
            KEEP_CHECKPOINTS,
            _P("splice_texts", int, 256, "held-out contexts for the splice metrics", "positive"),
            N_SHOW_FEATURES,
            DEVICE,
            MODEL_DTYPE,
        ]
    },
    "02_nfm": {
        p.name: p
        for p in [
            _P("nfm_k_embed", int, 256, "K, width of the factor embeddings and of the interaction MLP", "positive"),
            _P("nfm_dropout", float, 0.15, "dropout on the pooled vector while training", "probability"),
            _P("nfm_batch_norm", bool, False, "batch norm on the pooled vector"),
            _P("nfm_knots", int, 3, "hinges per feature in the additive models", "positive"),
            _P(
                "nfm_lr_grid",
                str,
                "1e-3,3e-3",
                "learning rates tried per model (first seed); the best on tune is kept",
                "positive_list",
            ),
            _P("nfm_weight_decay", float, 0.0, "decoupled weight decay", "non_negative"),
            _P("nfm_batch_size", int, 1024, "tokens per step", "positive"),
            _P(
                "nfm_max_epochs",
                int,
                60,
                "upper bound on epochs (the tune-set schedule usually ends sooner)",
                "positive",
            ),
            _P(
                "nfm_patience",
                int,
                5,
                "epochs without a tune-set improvement before training stops or the learning rate decays",
                "positive",
            ),
            _P(
                "nfm_lr_decays",
                int,
                0,
                "learning-rate divisions by 3 on a plateau before stopping (none helped in our real runs)",
                "non_negative",
            ),
            _P(
                "tune_fraction",
                float,
                0.15,
                "share of the documents for early stopping, learning rates and penalties",
                "fraction",
            ),
            _P("test_fraction", float, 0.3, "share of the documents for the reported numbers only", "fraction"),
            _P("nfm_split_seed", int, 0, "seeds the fit/tune/test split of the documents", "non_negative"),
            _P("nfm_seeds", str, "0,1", "seeds of every trained model, null control and planted size", "seed_list"),
            _P(
                "pair_ridge_pairs",
                int,
                1024,
                "co-firing pairs whose products the explicit-pairs ridge adds",
                "positive",
            ),
            _P(
                "power_shares",
                str,
                "0.001,0.003,0.01,0.03",
                "planted sizes: pairwise-only variance as a share of the residual's",
                "fraction_list",
            ),
            _P(
                "power_pairs",
                int,
                16,
                "pairs per planted interaction (among the 256 most frequently co-firing)",
                "positive",
            ),
            RESUME,
            KEEP_CHECKPOINTS,
            DEVICE,
        ]
    },
    "03_contributions": {
        p.name: p
        for p in [
            NFM_SEED,
            N_TOP_FEATURES,
            N_BOOT,
            _P("bootstrap_seed", int, 0, "seeds the bootstrap of test documents and seeds", "non_negative"),
            _P(
                "absorption_share",
                float,
                0.02,
                "size of the interaction injected before SAE training (share of activation variance)",
                "fraction",
            ),
            _P("absorption_pairs", int, 16, "latent pairs in the injected interaction", "positive"),
            _P(
                "absorption_train_tokens",
                int,
                0,
                "the retrained SAE's budget (0: the primary SAE's own; then it is the reference)",
                "non_negative",
            ),
            _P("absorption_seed", int, 0, "seeds the injected interaction and the retrained SAE", "non_negative"),
            _P(
                "conjunction_candidates",
                int,
                10,
                "per latent, the most correlated latents whose pairs are searched",
                "positive",
            ),
            _P(
                "conjunction_min_increment",
                float,
                0.01,
                "least pre-activation variance share a conjunction's pair product adds",
                "fraction",
            ),
            FDR_Q,
            DEVICE,
        ]
    },
    "04_secondary_sae": {
        p.name: p
        for p in [
            NFM_SEED,
            _P("secondary_latents", int, 1024, "secondary dictionary size", "positive"),
            _P("secondary_k", int, 32, "active secondary latents per token", "positive"),
            _P("secondary_train_tokens", int, 500_000, "training-token budget", "positive"),
            _P("secondary_batch_size", int, 2048, "tokens per step", "positive"),
            _P(
                "secondary_lr", float, 3e-3, "Adam learning rate; 0 uses 2e-4 / sqrt(n_latents / 2**14)", "non_negative"
            ),
            _P(
                "secondary_dead_tokens",
                int,
                250_000,
                "a latent is dead after this many tokens without firing",
                "positive",
            ),
            _P("secondary_seed", int, 0, "seeds the secondary SAE's initialisation and data order", "non_negative"),
            N_SHOW_FEATURES,
            RESUME,
            KEEP_CHECKPOINTS,
            DEVICE,
        ]
    },
    "05_feature_identification": {
        p.name: p
        for p in [
            NFM_SEED,
            _P("probe_folds", int, 5, "item-grouped cross-validation folds of the linear probe", "at_least_2"),
            N_BOOT,
            FDR_Q,
            N_TOP_FEATURES,
            _P("n_panels", int, 4, "secondary features shown in full in a headless run", "non_negative"),
            _P("replication_seed", int, 0, "seeds the split of the items for the replication check", "non_negative"),
            MAX_ITEMS,
            STIMULUS_SET,
            DEVICE,
            MODEL_DTYPE,
        ]
    },
    "06_clamping": {
        p.name: p
        for p in [
            NFM_SEED,
            _P("clamp_features", int, 3, "strongest interaction-selective secondary features to clamp", "positive"),
            _P(
                "clamp_levels",
                str,
                "-1,-0.5,0.5,1",
                "added multiples of each feature's largest observed activation",
                "nonzero_list",
            ),
            MAX_ITEMS,
            STIMULUS_SET,
            _P("n_permutations", int, 10_000, "sign-flip permutations per test", "positive"),
            N_BOOT,
            FDR_Q,
            _P("clamp_seed", int, 0, "seeds the random-edit control and the statistics", "non_negative"),
            DEVICE,
            MODEL_DTYPE,
        ]
    },
}
STAGES = tuple(PARAMETERS)


@functools.cache
def all_parameters() -> dict[str, Parameter]:
    """name -> :class:`Parameter` over every stage (a name shared by stages has one definition)."""
    merged: dict[str, Parameter] = {}
    for params in PARAMETERS.values():
        for name, p in params.items():
            if name in merged and merged[name] != p:
                raise AssertionError(f"parameter {name!r} is defined twice with different meanings")
            merged[name] = p
    return merged


def defaults(stage: str) -> dict[str, Any]:
    return {name: p.default for name, p in _stage(stage).items()}


def _stage(stage: str) -> dict[str, Parameter]:
    if stage not in PARAMETERS:
        raise ParameterError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return PARAMETERS[stage]


def cast(name: str, raw: str) -> Any:
    """A command-line string as the parameter's type (``--set sae_lr=3e-3``)."""
    p = all_parameters().get(name)
    if p is None:
        raise ParameterError(f"unknown parameter {name!r}; known: {', '.join(sorted(all_parameters()))}")
    if p.type is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ParameterError(f"{name}={raw}: expected true or false")
    try:
        return p.type(raw)
    except ValueError as err:
        raise ParameterError(f"{name}={raw}: expected {p.type.__name__}") from err


def check_value(name: str, value: Any) -> Any:
    """``value`` if it is a usable value of parameter ``name``; :class:`ParameterError` otherwise."""
    p = all_parameters()[name]
    if p.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, p.type) or (p.type is int and isinstance(value, bool)):
        raise ParameterError(f"{name}={value!r}: expected {p.type.__name__}, got {type(value).__name__}")
    if p.type is float and not math.isfinite(value):
        raise ParameterError(f"{name}={value}: must be finite")
    if p.check:
        ok, meaning = CHECKS[p.check]
        try:
            passed = ok(value)
        except ValueError:
            passed = False
        if not passed:
            raise ParameterError(f"{name}={value!r}: must be {meaning} ({p.doc})")
    return value


def _cross_checks(values: dict[str, Any]) -> None:
    """Constraints between parameters of one stage."""
    pairs = [("sae_k", "sae_latents"), ("secondary_k", "secondary_latents")]
    for k, n in pairs:
        if k in values and n in values and values[k] > values[n]:
            raise ParameterError(f"{k}={values[k]} exceeds {n}={values[n]}: k active latents need that many latents")
    for tokens, batch in [("sae_train_tokens", "sae_batch_size"), ("secondary_train_tokens", "secondary_batch_size")]:
        if tokens in values and batch in values and values[tokens] < values[batch]:
            raise ParameterError(f"{tokens}={values[tokens]} is less than one batch ({batch}={values[batch]})")
    if "tune_fraction" in values and values["tune_fraction"] + values["test_fraction"] >= 1:
        raise ParameterError(
            f"tune_fraction + test_fraction = {values['tune_fraction'] + values['test_fraction']}"
            " leaves no documents to fit on; their sum must be below 1"
        )


def validate(stage: str, values: dict[str, Any]) -> dict[str, Any]:
    """The stage's parameters from ``values`` (a notebook's globals or the runner's), checked one by one and
    together; a missing one is an error, since a notebook's parameters cell declares them all."""
    declared = _stage(stage)
    missing = sorted(set(declared) - set(values))
    if missing:
        raise ParameterError(f"stage {stage}: parameters {missing} are not set")
    checked = {name: check_value(name, values[name]) for name in declared}
    _cross_checks(checked)
    return checked


def seeds(text: str) -> tuple[int, ...]:
    """``nfm_seeds`` as a tuple."""
    return tuple(_ints(text))


def numbers(text: str) -> tuple[float, ...]:
    """A comma-separated list parameter (``nfm_lr_grid``, ``power_shares``, ``clamp_levels``) as floats."""
    return tuple(_floats(text))
