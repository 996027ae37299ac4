"""Clamp a feature inside the SAE + NFM decomposition of a layer and read what the model's output does.

**The splice** (at exactly the primary SAE's layer, in its normalised space): the layer output ``x``
becomes ``SAE(x) + NFM'(f) + error`` with ``error = x - SAE(x) - NFM(f)`` computed from the same, clean
``x`` (the splice sits at the layer it reads, so ``x`` is clean). With no clamp ``NFM' = NFM`` and the
model is reproduced exactly (a test checks it). A clamp changes one path only:

* ``path="secondary"``: secondary feature ``s`` of the NFM vector ``h`` is edited, ``h' = h + (a' - a)
  d_s / scale`` (``d_s`` its decoder row), and ``h'`` goes through the rest of the NFM (ReLU, Linear(K,d));
  the first-order part and every other feature are untouched;
* ``path="linear"``: primary feature ``i`` is edited in the NFM's first-order term only (the control
  "a feature of the linear path");
* ``control="random"``: instead of the clamp's change, a random direction with the same norm at every
  token (the control "a random edit of matched size").

An edit ``set``s the feature to ``value``, ``multiply``s it by ``value``, or ``add``s ``value``.

**Readouts.** Encoders: the pooled output embedding's cosine to the four condition centroids of the
stimulus set, each centroid computed without the item being measured. Causal LMs: the mean next-token
log-probability of each of the four word buckets at neutral prompt frames. Either way, four numbers per
unit (item or frame) in :data:`featint_utils.data.corpus.CONDITIONS` order, so the clamp's effect is a 2x2 per
unit: bucket formality x bucket emotion.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data.corpus import CONDITIONS
from ..data.interventions import PrefixCache, splice
from ..data.models import LoadedModel, mean_pool
from ..progress import progress
from ..residual.decomposition import Clamp, Decomposition
from ..stats import CONTRASTS, RESOLUTION, block_anova, holm, sign_flip_test
from .counterfactual import MinimalPairs, formal_emotional_layers


@torch.no_grad()
def edit_norm(decomposition: Decomposition, clamp: Clamp, x_raw: torch.Tensor, control: str | None = None) -> float:
    """Mean per-token norm of the change a clamp makes to the layer output (raw units) on ``x_raw``."""
    generator = torch.Generator().manual_seed(0)
    change = decomposition.edit(x_raw, clamp, control, generator) - decomposition.edit(x_raw)
    return float(change.norm(dim=-1).mean())


@contextmanager
def clamped(
    loaded: LoadedModel,
    layer: int,
    decomposition: Decomposition,
    clamp: Clamp | None = None,
    control: str | None = None,
    seed: int = 0,
    memo: dict | None = None,
):
    """Forwards inside the block run through the splice; set ``state["mask"]`` (real tokens) per batch.
    The hook is removed however the block exits. ``memo`` (a :class:`PrefixCache` batch's) keeps the clean
    decomposition of the batch's spliced tokens, so that every later clamp of them reuses it."""
    generator = torch.Generator().manual_seed(seed)

    def replace(h):
        if memo is None:
            return decomposition.edit(h, clamp, control, generator)
        if memo.get("decomposition") is not decomposition:
            memo.update(decomposition=decomposition, clean=decomposition.decompose(h))
        return decomposition.edit(h, clamp, control, generator, clean=memo["clean"])

    with splice(loaded.model, layer, replace) as state:
        yield state


def _forward(
    loaded: LoadedModel,
    layer: int,
    inputs: dict,
    keep: torch.Tensor,
    decomposition: Decomposition | None,
    clamp: Clamp | None,
    control: str | None,
    seed: int,
    prefix: PrefixCache | None = None,
    key=None,
    substitute: torch.Tensor | None = None,
):
    """The model's output on ``inputs``: clean without a decomposition, else spliced at the ``keep`` tokens;
    with a ``prefix`` cache, the layers below the splice are computed once per batch ``key``. ``substitute``
    ([n_attended, d]) replaces the layer's activations at every attended token (special tokens too, whose
    activations the readout pools) before the decomposition reads them."""
    with ExitStack() as stack:
        memo = None
        if prefix is not None:
            memo = stack.enter_context(prefix.forward(loaded.model, layer, key, inputs["input_ids"]))
            if not torch.equal(memo.setdefault("keep", keep), keep):  # the memo's decomposition is of these tokens
                raise ValueError(f"batch {key!r} of this PrefixCache was spliced at other tokens before")
        if substitute is not None:  # entered first, so its hook runs before the decomposition's splice

            def put(h):
                if h.shape != substitute.shape:
                    raise ValueError(f"substitute activations {tuple(substitute.shape)} for {tuple(h.shape)} tokens")
                return substitute

            stack.enter_context(splice(loaded.model, layer, put))["mask"] = inputs["attention_mask"].bool()
        if decomposition is not None:
            state = stack.enter_context(clamped(loaded, layer, decomposition, clamp, control, seed, memo))
            state["mask"] = keep
        return loaded.model(**inputs)


def _real_token_batches(tokenizer, texts: list[str], batch_size: int):
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    for start in range(0, len(texts), batch_size):
        inputs = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        keep = inputs["attention_mask"].bool() & ~torch.isin(inputs["input_ids"], special)
        yield inputs, keep


@torch.no_grad()
def pooled_embeddings(
    loaded: LoadedModel,
    layer: int,
    texts: list[str],
    decomposition: Decomposition | None = None,
    clamp: Clamp | None = None,
    control: str | None = None,
    batch_size: int = 64,
    seed: int = 0,
    prefix: PrefixCache | None = None,
    substitutes: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean-pooled output embeddings of ``texts`` (sentence-transformers' pooling), spliced when a
    decomposition is given (at real tokens only), clean otherwise. Calls that share a ``prefix`` cache (the same
    texts and batch size) compute the layers below the splice, and the clean decomposition, once.
    ``substitutes`` (per text, [n_attended_tokens, d]) are the layer's activations to use instead of the model's."""
    out = []
    device = next(loaded.model.parameters()).device
    for b, (inputs, keep) in enumerate(_real_token_batches(loaded.tokenizer, texts, batch_size)):
        inputs = {k: v.to(device) for k, v in inputs.items()}
        substitute = None
        if substitutes is not None:
            substitute = torch.cat(substitutes[b * batch_size : b * batch_size + len(keep)]).to(device)
        hidden = _forward(
            loaded, layer, inputs, keep.to(device), decomposition, clamp, control, seed, prefix, b, substitute
        ).last_hidden_state
        out.append(mean_pool(hidden, inputs["attention_mask"]).float().cpu())
    return torch.cat(out)


def leave_item_out_centroids(embeddings: torch.Tensor, stimuli: pd.DataFrame) -> torch.Tensor:
    """[n_texts, 4, d]: for each text, the four condition centroids computed over every *other* item
    (every item has all four variants, so each centroid leaves out exactly one text)."""
    out = torch.empty(len(stimuli), len(CONDITIONS), embeddings.shape[1])
    items = stimuli["item_id"].to_numpy()
    for c, condition in enumerate(CONDITIONS):
        rows = np.flatnonzero((stimuli["condition"] == condition).to_numpy())
        row_of_item = dict(zip(items[rows], rows))
        total = embeddings[rows].sum(0)
        own = torch.stack([embeddings[row_of_item[item]] for item in items])
        out[:, c] = (total - own) / (len(rows) - 1)
    return out


def text_readout(embeddings: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """[n_texts, 4]: each text's cosine to the four condition centroids given for it ([n_texts, 4, d])."""
    return F.cosine_similarity(embeddings[:, None, :], centroids, dim=-1).numpy()


def encoder_readout(embeddings: torch.Tensor, centroids: torch.Tensor, stimuli: pd.DataFrame) -> np.ndarray:
    """[n_items, 4]: per item, the mean over its texts of the cosine to each condition centroid."""
    frame = pd.DataFrame(text_readout(embeddings, centroids), columns=list(CONDITIONS))
    frame["item_id"] = stimuli["item_id"].to_numpy()
    return frame.groupby("item_id", sort=True)[list(CONDITIONS)].mean().to_numpy()


def bucket_token_ids(tokenizer, buckets: dict[str, list[str]]) -> dict[str, list[int]]:
    """First token of each word as the next token of a prompt (with its leading space), per bucket."""
    ids = {}
    for condition in CONDITIONS:
        tokens = {tokenizer(" " + word, add_special_tokens=False)["input_ids"][0] for word in buckets[condition]}
        ids[condition] = sorted(tokens)
    return ids


@torch.no_grad()
def causal_readout(
    loaded: LoadedModel,
    layer: int,
    frames: list[str],
    bucket_ids: dict[str, list[int]],
    decomposition: Decomposition | None = None,
    clamp: Clamp | None = None,
    control: str | None = None,
    seed: int = 0,
    prefix: PrefixCache | None = None,
) -> np.ndarray:
    """[n_frames, 4]: mean next-token log-probability of each bucket's words after each prompt frame. Calls that
    share a ``prefix`` cache (the same frames) compute the layers below the splice once per frame."""
    device = next(loaded.model.parameters()).device
    out = np.zeros((len(frames), len(CONDITIONS)))
    for f, frame in enumerate(frames):
        inputs = loaded.tokenizer(frame, return_tensors="pt")
        special = torch.tensor(sorted(set(loaded.tokenizer.all_special_ids)))
        keep = ~torch.isin(inputs["input_ids"], special)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs["use_cache"] = False  # nothing reads a key-value cache, and replayed blocks would not fill one
        logits = _forward(loaded, layer, inputs, keep.to(device), decomposition, clamp, control, seed, prefix, f).logits
        logp = F.log_softmax(logits[0, -1].float(), -1).cpu()
        out[f] = [float(logp[bucket_ids[c]].mean()) for c in CONDITIONS]
    return out


def clamp_statistics(
    changes: dict[str, np.ndarray],
    n_permutations: int = 10_000,
    n_boot: int = 2000,
    seed: int = 0,
    references: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Per condition (e.g. "feature 12 @ +1.0"): the change of the readout [n_units, 4] analysed as a 2x2
    over buckets with the unit as the block: partial eta-squared and ANOVA p of the interaction, the mean
    per-unit interaction contrast with a bootstrap 95% CI, its sign-flip permutation p, and Holm's
    adjustment of those p across every condition given.

    ``references`` maps a condition to its control condition: the per-unit difference of their contrasts
    is sign-flip tested too (``vs_control_p``, Holm-adjusted over the compared conditions), i.e. "more
    non-additive than its control", not only "non-additive"."""
    rows = []
    rng = np.random.default_rng(seed)
    for name, change in changes.items():
        anova = block_anova(change).iloc[0]
        contrast = change @ CONTRASTS["interaction"]
        low, high = _bootstrap_ci(contrast, rng, n_boot)[:, 0]
        rows.append(
            {
                "condition": name,
                "interaction_contrast": contrast.mean(),
                "ci_low": low,
                "ci_high": high,
                "interaction_eta2": anova["interaction_eta2"],
                "anova_p": anova["interaction_p"],
                "sign_flip_p": sign_flip_test(contrast, n_permutations, seed)[0],
                "formality_effect": anova["formality_effect"],
                "emotion_effect": anova["emotion_effect"],
                "mean_abs_change": np.abs(change).mean(),
            }
        )
    table = pd.DataFrame(rows)
    table["holm_p"] = holm(table["sign_flip_p"].to_numpy())
    if references:
        compared = [name for name in table["condition"] if name in references]
        differences = np.stack([(changes[n] - changes[references[n]]) @ CONTRASTS["interaction"] for n in compared], 1)
        p_vs = sign_flip_test(differences, n_permutations, seed)
        table["control"] = table["condition"].map(references)
        table["vs_control_p"] = table["condition"].map(dict(zip(compared, p_vs)))
        table["vs_control_holm_p"] = table["condition"].map(dict(zip(compared, holm(p_vs))))
    return table


def layer_made_readout(
    loaded: LoadedModel,
    layer: int,
    texts: list[str],
    real: list[torch.Tensor],
    additive: list[torch.Tensor],
    centroids: torch.Tensor,
    decomposition: Decomposition | None = None,
    clamp: Clamp | None = None,
    control: str | None = None,
    seed: int = 0,
    prefixes: tuple[PrefixCache, PrefixCache] | None = None,
) -> np.ndarray:
    """[n_items, 4]: how much each item's encoder readout (:func:`encoder_readout`, the mean over its four
    texts) changes when its formal-emotional text's layer activations are the layer's own (``real``) instead of
    their additive counterfactual (``additive``), the decomposition spliced and clamped as given. ``texts`` are the
    formal-emotional texts, ``real`` and ``additive`` their activations
    (:func:`featint_utils.integration.counterfactual.formal_emotional_layers`), ``centroids`` [n_items, 4, d]
    theirs. Zero on every item wherever the layer is additive, whatever the clamp; ``prefixes`` (one cache per
    arm) compute the layers below the splice once across calls."""
    prefixes = prefixes or (None, None)
    cosines = [
        text_readout(
            pooled_embeddings(
                loaded, layer, texts, decomposition, clamp, control, seed=seed, prefix=prefix, substitutes=layers
            ),
            centroids,
        )
        for layers, prefix in zip((real, additive), prefixes)
    ]
    return (cosines[0] - cosines[1]) / len(CONDITIONS)  # the item readout averages its four texts


def layer_made_clamps(
    loaded: LoadedModel,
    layer: int,
    stimuli: pd.DataFrame,
    pairs: MinimalPairs,
    centroids: torch.Tensor,
    decomposition: Decomposition,
    plan: pd.DataFrame,
    references: dict[str, str] | None = None,
    seed: int = 0,
    n_permutations: int = 10_000,
    n_boot: int = 2000,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """06 on token-aligned minimal pairs: every condition of ``plan`` read with each item's formal-emotional
    text at the layer's own activations and at their additive counterfactual (:func:`layer_made_readout`),
    and :func:`layer_made_statistics` of the difference. ``centroids`` are 06's, one row per stimulus text.
    Returns the table, the unclamped layer-made readout [n_items, 4] and each condition's change of it."""
    texts = stimuli["text"].to_numpy()
    rows = formal_emotional_rows(stimuli, pairs.items)
    real, additive = formal_emotional_layers(loaded, layer, pairs)
    centroids = centroids[rows]
    prefixes = (PrefixCache(), PrefixCache())

    def readout(clamp, control):
        return layer_made_readout(
            loaded, layer, list(texts[rows]), real, additive, centroids, decomposition, clamp, control, seed, prefixes
        )

    own, changes = run_clamps(readout, plan)
    clean = pooled_embeddings(loaded, layer, list(texts[rows]), prefix=prefixes[0])  # the model's own readout
    largest = float(np.abs(text_readout(clean, centroids)).max())
    table = layer_made_statistics(own, changes, largest, references, n_permutations, n_boot, seed)
    return table, own, changes


def formal_emotional_rows(stimuli: pd.DataFrame, items: np.ndarray) -> np.ndarray:
    """Positions in ``stimuli`` of each item's formal-emotional text, in the order of ``items``."""
    fe = (stimuli["condition"] == "formal_emotional").to_numpy()
    position = dict(zip(stimuli["item_id"].to_numpy()[fe], np.flatnonzero(fe)))
    return np.array([position[item] for item in items])


def _within(contrasts: np.ndarray, floor: float) -> np.ndarray:
    """Per column of per-unit contrasts [n_units, k]: within ``floor`` of zero in every unit (float32 rounding,
    not an effect: the same rounding in every unit would be "significant" to a sign-flip test)."""
    return np.abs(contrasts).max(0) <= floor


def layer_made_statistics(
    own: np.ndarray,
    changes: dict[str, np.ndarray],
    largest: float,
    references: dict[str, str] | None = None,
    n_permutations: int = 10_000,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The part of each clamp's non-additive effect that the layer made, from :func:`layer_made_readout`'s
    unclamped ``own`` [n_units, 4] and each condition's change of it (``changes``, as :func:`run_clamps` gives).

    The first row, ``"no clamp"``, is the layer's own non-additive effect on the readout: the interaction
    contrast of ``own``. Every other row is a condition's: the interaction contrast of its change made by the
    layer (the clamp's contrast on the real activations minus that on the additive counterfactual), its mean
    with a bootstrap 95% CI, its sign-flip p (Holm-adjusted over the conditions; 1 where every unit's value is
    within :data:`featint_utils.stats.RESOLUTION` of ``largest``, the readout's largest value: float32 rounding),
    and its ratio to the layer's own contrast. ``references`` map a condition to its control: the difference of
    their parts is sign-flip tested per unit (``vs_control_p``, Holm-adjusted; 1 where both parts are rounding).
    Where the layer is additive every part is exactly zero, so no condition and no control can be flagged."""
    floor = RESOLUTION * largest
    rng = np.random.default_rng(seed)
    names = ["no clamp", *changes]
    contrasts = np.stack([own @ CONTRASTS["interaction"]] + [changes[n] @ CONTRASTS["interaction"] for n in changes], 1)
    zero = dict(zip(names, _within(contrasts, floor)))
    p = np.where(list(zero.values()), 1.0, sign_flip_test(contrasts, n_permutations, seed))
    own_mean = contrasts[:, 0].mean()
    table = pd.DataFrame(
        {
            "condition": names,
            "interaction_contrast": contrasts.mean(0),
            **dict(zip(("ci_low", "ci_high"), _bootstrap_ci(contrasts, rng, n_boot))),
            "sign_flip_p": p,
            "holm_p": np.concatenate([p[:1], holm(p[1:])]),
            "share_of_own": contrasts.mean(0) / own_mean if own_mean != 0 else np.nan,
        }
    )
    if references:
        compared = [n for n in changes if n in references]
        differences = np.stack([(changes[n] - changes[references[n]]) @ CONTRASTS["interaction"] for n in compared], 1)
        both_zero = [zero[n] and zero[references[n]] for n in compared]  # a difference of two roundings
        p_vs = np.where(both_zero, 1.0, sign_flip_test(differences, n_permutations, seed))
        table["control"] = table["condition"].map(references)
        table["vs_control_p"] = table["condition"].map(dict(zip(compared, p_vs)))
        table["vs_control_holm_p"] = table["condition"].map(dict(zip(compared, holm(p_vs))))
    return table


def _bootstrap_ci(contrasts: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[2, k] percentile 95% interval of the mean of each column of per-unit contrasts [n_units, k]."""
    contrasts = np.asarray(contrasts, dtype=np.float64).reshape(len(contrasts), -1)
    boot = rng.integers(0, len(contrasts), size=(n_boot, len(contrasts)))
    return np.percentile(contrasts[boot].mean(1), [2.5, 97.5], axis=0)


def run_clamps(readout, plan: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The unclamped readout and, per condition of :func:`clamp_plan`, the change of the readout from it.

    ``readout(clamp, control)`` returns [n_units, 4]; ``readout(None, None)`` the spliced, unclamped one."""
    clean = readout(None, None)
    changes = {}
    for spec in progress(list(plan.itertuples()), desc="clamp conditions"):
        control = spec.control if isinstance(spec.control, str) else None  # pandas stores None as NaN
        changes[spec.name] = readout(spec.clamp, control) - clean
    return clean, changes


def clamp_plan(
    secondary_features: list[int],
    secondary_max: np.ndarray,
    linear_feature: int,
    linear_unit: float,
    levels: list[float],
) -> pd.DataFrame:
    """Every condition of the experiment: each secondary feature at each level (``add`` a multiple of its
    largest observed activation), the random control matched to it token by token, and the linear-path
    feature with ``add`` ``level * linear_unit`` (choose ``linear_unit`` so its edits are as large as the
    secondary ones: :func:`matched_linear_unit`)."""
    rows = []
    for feature in secondary_features:
        for level in levels:
            clamp = Clamp("secondary", int(feature), "add", float(level * secondary_max[feature]))
            rows.append(
                {
                    "name": f"secondary {feature} @ {level:+g}",
                    "group": f"secondary {feature}",
                    "level": level,
                    "clamp": clamp,
                    "control": None,
                }
            )
            rows.append(
                {
                    "name": f"random, matched to {feature} @ {level:+g}",
                    "group": f"random (size of {feature})",
                    "level": level,
                    "clamp": clamp,
                    "control": "random",
                }
            )
    for level in levels:
        rows.append(
            {
                "name": f"linear {linear_feature} @ {level:+g}",
                "group": f"linear-path {linear_feature}",
                "level": level,
                "clamp": Clamp("linear", int(linear_feature), "add", float(level * linear_unit)),
                "control": None,
            }
        )
    return pd.DataFrame(rows)


def with_ablations(plan: pd.DataFrame, secondary_features: list[int]) -> pd.DataFrame:
    """``plan`` and, for each secondary feature, its ablation (``set`` to 0 at every token) and a random edit
    matched to that ablation token by token (``level`` NaN). On minimal pairs an ablation's layer-made part
    (:func:`layer_made_statistics`) against the layer's own says how much of the layer's non-additive effect
    on the readout goes through that feature: ``share_of_own`` -1 would be all of it."""
    rows = []
    for feature in secondary_features:
        clamp = Clamp("secondary", int(feature), "set", 0.0)
        for name, group, control in (
            (f"secondary {feature} @ ablated", f"secondary {feature}", None),
            (f"random, matched to {feature} @ ablated", f"random (size of {feature})", "random"),
        ):
            rows.append({"name": name, "group": group, "level": np.nan, "clamp": clamp, "control": control})
    return pd.concat([plan, pd.DataFrame(rows)], ignore_index=True)


def random_references(plan: pd.DataFrame) -> dict[str, str]:
    """Each secondary condition of ``plan`` and its size-matched random edit, the control it is tested against."""
    return {
        name: name.replace("secondary ", "random, matched to ")
        for name in plan["name"]
        if name.startswith("secondary ")
    }


def matched_linear_unit(
    decomposition: Decomposition,
    secondary_features: list[int],
    secondary_max: np.ndarray,
    linear_feature: int,
    x_raw: torch.Tensor,
) -> float:
    """The ``add`` value for the linear-path feature whose mean edit size on ``x_raw`` equals the secondary
    clamps' mean at level +1 (the first-order edit is linear in the value, so one measurement suffices)."""
    target = np.mean(
        [
            edit_norm(decomposition, Clamp("secondary", int(f), "add", float(secondary_max[f])), x_raw)
            for f in secondary_features
        ]
    )
    per_unit = edit_norm(decomposition, Clamp("linear", int(linear_feature), "add", 1.0), x_raw)
    return float(target / per_unit) if per_unit > 0 else 0.0


def tidy_changes(plan: pd.DataFrame, changes: dict[str, np.ndarray]) -> pd.DataFrame:
    """One row per condition and bucket: mean change of the readout over units and its standard error."""
    rows = []
    for spec in plan.itertuples():
        change = changes[spec.name]
        for b, bucket in enumerate(CONDITIONS):
            se = change[:, b].std(ddof=1) / np.sqrt(len(change))
            rows.append(
                {
                    "name": spec.name,
                    "group": spec.group,
                    "level": spec.level,
                    "bucket": bucket,
                    "mean_change": change[:, b].mean(),
                    "se": se,
                }
            )
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, plan: pd.DataFrame, alpha: float = 0.05) -> str:
    """A plain-language account of what the clamps did and did not show."""
    merged = table.merge(plan[["name", "group", "level"]], left_on="condition", right_on="name")
    lines = []
    for group, rows in merged.groupby("group", sort=False):
        significant = rows[rows["holm_p"] < alpha]
        strongest = rows.loc[rows["interaction_contrast"].abs().idxmax()]
        verdict = f"a non-additive effect at {len(significant)} of {len(rows)} levels (Holm p < {alpha})"
        if not len(significant):
            verdict = "no non-additive effect that survives Holm's correction at any level"
        line = (
            f"- {group}: {verdict}; largest interaction contrast {strongest['interaction_contrast']:+.4f} "
            f"(95% CI {strongest['ci_low']:+.4f} to {strongest['ci_high']:+.4f}) "
            f"at level {strongest['level']:+g}"
        )
        if "vs_control_holm_p" in rows and rows["vs_control_holm_p"].notna().any():
            beats = int((rows["vs_control_holm_p"] < alpha).sum())
            line += f"; larger than its size-matched random control at {beats} of {len(rows)} levels"
        lines.append(line + ".")
    largest = merged.assign(size=merged["interaction_contrast"].abs()).groupby("group")["size"].max()
    linear = [g for g in largest.index if g.startswith("linear-path")]
    secondary = [g for g in largest.index if g.startswith("secondary")]
    if linear and secondary:
        above = [g for g in secondary if largest[g] > largest[linear[0]]]
        lines.append(
            f"- The size-matched {linear[0]} feature's largest contrast is {largest[linear[0]]:.4f}; "
            f"{len(above)} of {len(secondary)} secondary features exceed it"
            + (
                "."
                if above
                else ": edits of the first-order path move the readout non-additively at "
                "least as much, so these effects are not specific to the interaction path."
            )
        )
    lines.append(
        "With hundreds of items even a random edit shifts the readout non-additively by a detectable "
        "amount, so a secondary feature's effect counts as specific only where it exceeds its "
        "size-matched random control (and is comparable with the size-matched linear-path feature). The "
        "readout is a model-internal similarity (encoders) or next-token log-probability (causal LMs), "
        "not a behavioural measure."
    )
    return "\n".join(lines)


def _layer_made_groups(table: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """:func:`layer_made_statistics`'s condition rows with their plan group and kind (secondary, random, linear)."""
    merged = table.merge(plan[["name", "group", "level"]], left_on="condition", right_on="name")
    kind = np.select(
        [merged["group"].str.startswith("secondary"), merged["group"].str.startswith("random")],
        ["secondary", "random"],
        "linear",
    )
    return merged.assign(kind=kind)


def layer_made_summary(table: pd.DataFrame, plan: pd.DataFrame, alpha: float = 0.05) -> str:
    """A plain-language account of :func:`layer_made_statistics`: the layer's own non-additive effect on the
    readout and, per clamped group, the part of its effect the layer made."""
    own = table.iloc[0]
    lines = [
        f"- The layer's own non-additive effect on the readout (real minus additive counterfactual, no clamp): "
        f"{own['interaction_contrast']:+.3g} (95% CI {own['ci_low']:+.3g} to {own['ci_high']:+.3g}, "
        f"sign-flip p {own['sign_flip_p']:.3g})."
    ]
    for group, rows in _layer_made_groups(table, plan).groupby("group", sort=False):
        made = int((rows["holm_p"] < alpha).sum())
        largest = rows.loc[rows["interaction_contrast"].abs().idxmax()]
        line = (
            f"- {group}: a layer-made part in {made} of {len(rows)} conditions (Holm p < {alpha}); largest "
            f"{largest['interaction_contrast']:+.3g} ({largest['condition'].rsplit(' @ ', 1)[-1]}; "
            f"{largest['share_of_own']:+.3f} of the layer's own)"
        )
        ablated = rows[rows["condition"].str.endswith("@ ablated")]
        if len(ablated):
            line += f"; ablated, {ablated['share_of_own'].iloc[0]:+.3f} of the layer's own"
        if rows["vs_control_holm_p"].notna().any():
            line += f"; larger than its random control's at {int((rows['vs_control_holm_p'] < alpha).sum())}"
        lines.append(line + ".")
    return "\n".join(lines)


def layer_made_metrics(table: pd.DataFrame | None, plan: pd.DataFrame, alpha: float = 0.05) -> dict:
    """06's headline numbers of the layer-made split, under fixed keys (``layer_made.*``), all None where it
    was not measured, so that a number measured on other stimuli never stays in ``metrics.json``: the layer's
    own contrast (interval, p) and, per kind of condition, how many have a layer-made part (Holm)."""
    kinds = ("secondary", "random", "linear")
    keys = ["own_contrast", "own_ci", "own_p", "secondary_beats_random", "secondary_conditions"]
    keys += [f"{kind}_flagged" for kind in kinds]
    if table is None:
        return {f"layer_made.{key}": None for key in keys}
    own = table.iloc[0]
    rows = _layer_made_groups(table, plan)
    flagged = rows[rows["holm_p"] < alpha]
    return {
        "layer_made.own_contrast": float(own["interaction_contrast"]),
        "layer_made.own_ci": [float(own["ci_low"]), float(own["ci_high"])],
        "layer_made.own_p": float(own["sign_flip_p"]),
        "layer_made.secondary_beats_random": int((rows["vs_control_holm_p"] < alpha).sum()),
        "layer_made.secondary_conditions": int((rows["kind"] == "secondary").sum()),
        **{f"layer_made.{kind}_flagged": int((flagged["kind"] == kind).sum()) for kind in kinds},
    }
