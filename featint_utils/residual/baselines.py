"""Closed-form and gradient baselines for "what predicts the SAE residual", fitted to the same residual and split.

* :func:`fit_ridge` from the SAE code (``source="codes"``): the converged linear first-order model, in
  closed form; every nested model starts from it.
* :func:`fit_ridge` from the raw activation (``source="inputs"``): the "dark matter" baseline (Engels et
  al. 2024): much of an SAE's error is a linear function of the activation itself.
* :func:`fit_pair_ridge`: the code plus the products ``f_a f_b`` of listed pairs (the most frequently
  co-firing ones: :func:`cofiring_pairs`, or the planted pairs: an oracle), a transparent check on the
  NFM's pairwise term. The code's penalty stays the first-order fit's; the pairs' penalty, and how many of
  the strongest pairs a refit keeps, are chosen on the tune documents from a grid that includes infinity
  (no pairs), so the model is nested in the first-order fit and is that fit unless pairs help on tune by
  more than one standard error across the tune documents (choosing the best of ~65 candidates on tune
  flatters the winner: without that margin, null data picks pairs that lose on test, and the share's
  interval misses zero from below in about one null in ten).
* :class:`CodeMLP`: the first-order fit plus a one-hidden-layer MLP branch on the code with as many
  parameters as the NFM's pairwise branch (:func:`matched_hidden`): is the factorised pairwise form special,
  or would any non-linear model do?

Ridge: the intercept is unpenalised (centred normal equations); the penalty is ``alpha`` times the mean
diagonal of the centred Gram matrix of the penalised columns, ``alpha`` picked on the tune documents. The
design is sparse (k code entries and the active listed pairs per token) and streamed from the memory maps;
its Gram matrix does not depend on the target, so :class:`SparseDesign` accumulates it once and then serves
any number of targets (the residual, null controls, injected interactions) for one pass each.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import nn

from ..dictionary.metrics import VarianceAccumulator
from ..progress import progress
from .code_data import CodeBatch, CodeData
from .nfm_training import document_sse, residual_fvu

RIDGE_ALPHAS = tuple(10.0**e for e in range(-6, 4))  # up to a penalty that all but zeroes W
PAIR_ALPHAS = (float("inf"),) + tuple(10.0 ** (e / 2) for e in range(-8, 5))  # inf (no pairs) first: wins ties
PAIR_KEEP = (4, 16, 64, 256)  # how many of the strongest pairs a refit keeps (chosen on tune; all pairs too)


class RidgeModel(nn.Module):
    """``y = W z + b`` with ``z`` the code (sparse, an embedding bag) or the activation (dense)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, source: str, alpha: float, penalty: float):
        super().__init__()
        # contiguous: a solver's column-major result makes every embedding-bag row gather strided (~10x slower)
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.source, self.alpha = source, alpha
        self.penalty = penalty
        """The absolute penalty on ``||W||^2`` (``alpha`` times the Gram scale): what a nested model keeps."""

    def predict(self, batch) -> torch.Tensor:
        if self.source == "codes":
            return F.embedding_bag(batch.indices, self.weight, per_sample_weights=batch.values, mode="sum") + self.bias
        return batch.inputs @ self.weight + self.bias


# ---------------------------------------------------------------------------------------------------
# Pairs of latents


def pair_keys(indices: torch.Tensor, n_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every unordered pair of active slots of each token: (key ``lo * n + hi``, slot i, slot j), [batch, P]."""
    k = indices.shape[1]
    slot_i, slot_j = torch.triu_indices(k, k, offset=1, device=indices.device)
    a, b = indices[:, slot_i], indices[:, slot_j]
    return torch.minimum(a, b) * n_latents + torch.maximum(a, b), slot_i, slot_j


def cofiring_pairs(data: CodeData, n_pairs: int, batch_size: int = 8192, max_table: int = 4_000_000) -> np.ndarray:
    """The ``n_pairs`` pairs of latents that fire together most often in ``data``, [n_pairs, 2] (a < b),
    most frequent first. Counts are exact unless the number of distinct pairs exceeds ``max_table``
    (then the rarest are dropped between batches, which can only lose pairs far below the top)."""
    keys_seen = np.zeros(0, np.int64)
    counts = np.zeros(0, np.int64)
    n = data.n_latents
    for batch in data.batches(batch_size):
        keys, slot_i, slot_j = pair_keys(batch.indices, n)
        both = (batch.values[:, slot_i] > 0) & (batch.values[:, slot_j] > 0)
        new_keys, new_counts = np.unique(keys[both].numpy(), return_counts=True)
        merged = np.concatenate([keys_seen, new_keys])
        keys_seen, inverse = np.unique(merged, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, new_counts]), minlength=len(keys_seen))
        counts = counts.astype(np.int64)
        if len(keys_seen) > max_table:
            keep = np.argsort(-counts, kind="stable")[: max_table // 2]
            keys_seen, counts = keys_seen[np.sort(keep)], counts[np.sort(keep)]
    top = np.argsort(-counts, kind="stable")[:n_pairs]
    top = top[counts[top] > 0]
    return np.stack([keys_seen[top] // n, keys_seen[top] % n], 1)


class PairLookup:
    """Finds, for each token, which of a fixed list of pairs are active, and their products ``f_a f_b``.

    The listed pairs' latents get compact numbers ``0..M-1`` (every other latent is ``M``), and an
    ``(M+1) x (M+1)`` table holds each listed pair's column plus one (0: not listed), so a token's slot pair is
    looked up with one gather. Listing every slot pair's key and binary-searching it was most of stage 02's
    time; the table is at most ``(2 n_pairs + 1)^2`` int32 (17 MB for 1,024 pairs)."""

    def __init__(self, pairs: np.ndarray, n_latents: int):
        pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
        if len(pairs) and (pairs.min() < 0 or pairs.max() >= n_latents or (pairs[:, 0] == pairs[:, 1]).any()):
            raise ValueError(f"pairs must be two different latents in [0, {n_latents})")
        keys = np.minimum(pairs[:, 0], pairs[:, 1]) * n_latents + np.maximum(pairs[:, 0], pairs[:, 1])
        if len(np.unique(keys)) != len(keys):
            raise ValueError("a pair is listed twice")
        members = np.unique(pairs)
        self.stride = len(members) + 1
        compact = np.full(n_latents, len(members), np.int32)
        compact[members] = np.arange(len(members))
        table = np.zeros((self.stride, self.stride), np.int32)
        a, b = compact[pairs[:, 0]], compact[pairs[:, 1]]
        table[a, b] = table[b, a] = np.arange(1, len(pairs) + 1)
        self.compact, self.table = torch.from_numpy(compact), torch.from_numpy(table.ravel())
        self.n_latents, self.n_pairs = n_latents, len(pairs)

    def active(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair column, product) of every listed pair active in a token, [batch, width] each: a token's listed
        pairs side by side in the order of its slot pairs, then column 0 and product 0 up to ``width`` (the most
        any token of the batch has, at least 1). A sum over a row adds the same products in the same order as
        a sum over all the token's slot pairs with zeros at the unlisted ones, so it is the same number."""
        batch, k = indices.shape
        if self.table.device != indices.device:  # the lookup follows the codes it is asked about
            self.compact, self.table = self.compact.to(indices.device), self.table.to(indices.device)
        token = torch.zeros(0, dtype=torch.long, device=indices.device)
        if self.n_pairs and k > 1 and batch:
            # each token's slots of listed latents, moved to the front in slot order: their pairs, in order, are
            # the token's slot pairs that can be listed, in the order of all its slot pairs
            compact = self.compact[indices]
            member = compact < self.stride - 1
            rank = member.cumsum(1) - 1
            width_m = int(member.sum(1).max())
            at_token, at_slot = member.nonzero(as_tuple=True)
            codes = torch.full((batch, width_m), self.stride - 1, dtype=compact.dtype, device=indices.device)
            codes[at_token, rank[at_token, at_slot]] = compact[at_token, at_slot]
            kept = torch.zeros(batch, width_m, dtype=values.dtype, device=values.device)
            kept[at_token, rank[at_token, at_slot]] = values[at_token, at_slot]
            slot_i, slot_j = torch.triu_indices(width_m, width_m, offset=1, device=indices.device)
            hit = self.table[codes[:, slot_i] * self.stride + codes[:, slot_j]]  # listed column + 1, or 0
            token, slot_pair = hit.nonzero(as_tuple=True)  # row-major: each token's pairs in order
        counts = torch.bincount(token, minlength=batch)
        width = max(int(counts.max()) if len(token) else 0, 1)
        column = torch.zeros(batch, width, dtype=torch.long, device=indices.device)
        product = torch.zeros(batch, width, dtype=values.dtype, device=values.device)
        if len(token):
            position = torch.arange(len(token), device=indices.device) - (counts.cumsum(0) - counts)[token]
            column[token, position] = hit[token, slot_pair].long() - 1
            product[token, position] = kept[token, slot_i[slot_pair]] * kept[token, slot_j[slot_pair]]
        return column, product


# ---------------------------------------------------------------------------------------------------
# Closed-form ridge on a sparse design


class SparseDesign:
    """Normal equations of a ridge from the sparse code (and optionally listed pair products) of a token set.

    Columns: the ``n_latents`` code columns, then one per listed pair. The Gram matrix and column sums are
    accumulated once (float64); :meth:`cross` accumulates the products with a target, one pass each."""

    def __init__(self, data: CodeData, pairs: np.ndarray | None = None, batch_size: int = 8192):
        self.data, self.batch_size = data, batch_size
        self.pairs = np.zeros((0, 2), np.int64) if pairs is None else np.asarray(pairs, np.int64).reshape(-1, 2)
        self.lookup = PairLookup(self.pairs, data.n_latents)
        self.width = data.n_latents + self.lookup.n_pairs
        self.gram = torch.zeros(self.width, self.width, dtype=torch.float64)
        self.z_sum = torch.zeros(self.width, dtype=torch.float64)
        gram, z_sum = self.gram.numpy(), self.z_sum.numpy()  # views: filled in place
        desc = f"ridge design ({self.lookup.n_pairs} pairs)" if self.lookup.n_pairs else "ridge design"
        for batch in progress(data.batches(batch_size), total=-(-len(data) // batch_size), desc=desc):
            z = self.rows(batch)
            product = (z.T @ z).tocoo()  # coordinates are unique: plain fancy-index addition is exact
            gram[product.row, product.col] += product.data
            z_sum += np.asarray(z.sum(0)).ravel()
        self.n = len(data)
        self._gram_centred: torch.Tensor | None = None
        self._factor: tuple[tuple[float, str], tuple[torch.Tensor, int]] | None = None

    def rows(self, batch: CodeBatch) -> scipy.sparse.csr_matrix:
        """The batch's design rows as a sparse [batch, width] float64 matrix."""
        values, indices = batch.values.double(), batch.indices
        columns, entries = [indices], [values]
        if self.lookup.n_pairs:
            pair_column, product = self.lookup.active(values, indices)
            columns.append(pair_column + self.data.n_latents)
            entries.append(product)
        columns, entries = torch.cat(columns, 1).numpy(), torch.cat(entries, 1).numpy()
        keep = entries != 0
        token = np.broadcast_to(np.arange(len(values))[:, None], columns.shape)
        return scipy.sparse.csr_matrix((entries[keep], (token[keep], columns[keep])), shape=(len(values), self.width))

    def cross(self, data: CodeData) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Z^T y, sum y)`` for ``data``'s target (the same tokens as the design's, any target)."""
        if len(data) != self.n or not np.array_equal(data.rows, self.data.rows):
            raise ValueError("a target for this design must cover the same tokens")
        cross = np.zeros((self.width, data.d_out))
        y_sum = np.zeros(data.d_out)
        for batch in data.batches(self.batch_size):
            y = batch.target.double().numpy()
            cross += self.rows(batch).T @ y
            y_sum += y.sum(0)
        return torch.from_numpy(cross), torch.from_numpy(y_sum)

    def centred(self, cross: torch.Tensor, y_sum: torch.Tensor):
        """Centred Gram (the same tensor for every target: not to be changed in place), centred cross-products,
        and the column and target means."""
        z_mean, y_mean = self.z_sum / self.n, y_sum / self.n
        return self.centred_gram(), cross - self.n * torch.outer(z_mean, y_mean), z_mean, y_mean

    def centred_gram(self) -> torch.Tensor:
        """``Z^T Z - n m m^T`` (``m``: the column means), computed once."""
        if self._gram_centred is None:
            z_mean = self.z_sum / self.n
            self._gram_centred = self.gram - self.n * torch.outer(z_mean, z_mean)
        return self._gram_centred

    def code_factor(self, penalty: float, device: torch.device | str = "cpu") -> tuple[torch.Tensor, int]:
        """Cholesky factor of the code block's centred Gram plus ``penalty`` times the identity, on ``device``
        (float64), and LAPACK's ``info`` (nonzero: not positive definite). The last one is kept: every target's
        first-order ridge, its nested refits, its pair ridge and the planted pairs' projection solve with the
        residual's penalty, so one factorisation serves them all."""
        key = (float(penalty), str(torch.device(device)))
        if self._factor is None or self._factor[0] != key:
            code = slice(0, self.data.n_latents)
            gram = self.centred_gram()[code, code].to(device)
            system = gram + penalty * torch.eye(len(gram), dtype=torch.float64, device=device)
            factor, info = torch.linalg.cholesky_ex(system)
            self._factor = key, (factor, int(info))
        return self._factor[1]


def _dense_normal_equations(data: CodeData, batch_size: int = 8192):
    """Centred float64 normal equations of a ridge from the raw activation."""
    width = data.inputs.shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, data.d_out, dtype=torch.float64)
    z_sum, y_sum = torch.zeros(width, dtype=torch.float64), torch.zeros(data.d_out, dtype=torch.float64)
    for batch in progress(data.batches(batch_size), total=-(-len(data) // batch_size), desc="ridge (inputs)"):
        z, y = batch.inputs.double(), batch.target.double()
        gram += z.T @ z
        cross += z.T @ y
        z_sum += z.sum(0)
        y_sum += y.sum(0)
    n = len(data)
    z_mean, y_mean = z_sum / n, y_sum / n
    return gram - n * torch.outer(z_mean, z_mean), cross - n * torch.outer(z_mean, y_mean), z_mean, y_mean


def fit_ridge(
    fit: CodeData,
    tune: CodeData,
    source: str = "codes",
    alphas=RIDGE_ALPHAS,
    design: SparseDesign | None = None,
    device: torch.device | str = "cpu",
) -> RidgeModel:
    """Closed-form ridge from the code or the activation to the residual, ``alpha`` chosen on ``tune``.
    A code ridge can reuse a :class:`SparseDesign` of ``fit`` across targets. The normal equations are
    accumulated on the host and solved on ``device``, in float64 there too; the model lives there."""
    if source not in ("codes", "inputs"):
        raise ValueError(f"source must be 'codes' or 'inputs', got {source!r}")
    if source == "codes":  # the code block of a design (one built with pairs serves too)
        design = design or SparseDesign(fit)
        code = slice(0, fit.n_latents)
        gram_c, cross_c, z_mean, y_mean = design.centred(*design.cross(fit))
        gram_c, cross_c, z_mean = gram_c[code, code], cross_c[code], z_mean[code]
    else:
        gram_c, cross_c, z_mean, y_mean = _dense_normal_equations(fit)
    gram_c, cross_c, z_mean, y_mean = (t.to(device) for t in (gram_c, cross_c, z_mean, y_mean))
    scale = float(gram_c.diagonal().mean()) or 1.0
    best = None
    for alpha in alphas:
        if source == "codes":  # factorised once per penalty for every target of the design
            factor, info = design.code_factor(alpha * scale, device)
        else:
            system = gram_c + alpha * scale * torch.eye(len(gram_c), dtype=torch.float64, device=device)
            factor, info = torch.linalg.cholesky_ex(system)
        if int(info):
            continue  # not positive definite at this penalty (latents that never fire, tiny alpha)
        weight = torch.cholesky_solve(cross_c, factor)
        model = RidgeModel(weight, y_mean - z_mean @ weight, source, alpha, alpha * scale)
        score = residual_fvu(model, tune)
        if best is None or score < best[0]:
            best = (score, model)
    if best is None:
        raise ValueError(f"ridge from {source}: no penalty in {alphas} gave a solvable system")
    return best[1]


class PairRidgeModel(nn.Module):
    """``y = W f + U p + b``: the code ``f`` and the products ``p`` of listed pairs."""

    def __init__(
        self,
        weight,
        pair_weight,
        bias,
        pairs: np.ndarray,
        n_latents: int,
        alpha: float,
        lookup: PairLookup | None = None,
    ):
        """``lookup``: a :class:`PairLookup` of ``pairs`` to share (the candidates of one fit share their design's)."""
        super().__init__()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)
        self.pair_weight = nn.Parameter(pair_weight.float().contiguous(), requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.pairs, self.alpha = np.asarray(pairs), alpha
        self.lookup = lookup or PairLookup(self.pairs, n_latents)
        self.kept = int((self.pair_weight.abs().sum(1) > 0).sum())
        """How many of the listed pairs the model uses."""

    def predict(self, batch, active: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The prediction for ``batch``; ``active``: its pairs as :meth:`PairLookup.active` gives them for this
        model's pairs (looked up here when not given)."""
        out = F.embedding_bag(batch.indices, self.weight, per_sample_weights=batch.values, mode="sum") + self.bias
        if self.lookup.n_pairs:
            column, product = active or self.lookup.active(batch.values, batch.indices)
            out = out + F.embedding_bag(column, self.pair_weight, per_sample_weights=product, mode="sum")
        return out


def fit_pair_ridge(
    fit: CodeData,
    tune: CodeData,
    first_order: RidgeModel,
    pairs: np.ndarray | None = None,
    alphas=PAIR_ALPHAS,
    design: SparseDesign | None = None,
    keep=PAIR_KEEP,
    clear_gain: bool = True,
    device: torch.device | str = "cpu",
) -> PairRidgeModel:
    """Ridge on the code plus pair products, nested in ``first_order`` (see the module docstring), in two
    stages: all the listed pairs, then only the ``m`` of them with the largest standardised coefficients in
    that fit (``m`` in ``keep``), refitted. The pairs kept and the pair penalty are chosen on ``tune``; the
    ranking uses the fitting documents only. One penalty for many pairs shrinks a few real ones towards zero
    along with the rest; the refit on the few does not. With ``clear_gain``, pairs are kept only when their
    summed tune gain over "no pairs" exceeds its standard error across tune documents (an oracle that is
    given the true pairs has no choice to pay for, and passes False).

    Solved through the Schur complement of the code block (restricted to the kept pairs, it is the same
    matrix's sub-block), so every choice costs an eigenvalue solve of a pair block, not a new factorisation;
    on ``device``, in float64."""
    if first_order.source != "codes":
        raise ValueError("the pair ridge nests in a ridge from the code")
    if design is None:
        if pairs is None:
            raise ValueError("fit_pair_ridge needs the pairs or a SparseDesign built with them")
        design = SparseDesign(fit, pairs)
    n, n_pairs = fit.n_latents, design.lookup.n_pairs
    gram_c, cross_c, z_mean, y_mean = (t.to(device) for t in design.centred(*design.cross(fit)))
    code, pair = slice(0, n), slice(n, design.width)
    factor, info = design.code_factor(first_order.penalty, device)
    if info:
        raise torch.linalg.LinAlgError(f"the code block plus the first-order penalty is not positive definite ({info})")
    a_inv_b = torch.cholesky_solve(gram_c[code, pair], factor)
    a_inv_c = torch.cholesky_solve(cross_c[code], factor)
    schur = gram_c[pair, pair] - gram_c[code, pair].T @ a_inv_b
    schur = 0.5 * (schur + schur.T)
    remainder = cross_c[pair] - gram_c[code, pair].T @ a_inv_c  # what the pairs can explain beyond the code
    spread = gram_c[pair, pair].diagonal().clamp(min=0)

    def candidates(kept: torch.Tensor):
        """Models on the ``kept`` pairs for every penalty (closed form through one eigen-decomposition)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(schur[kept][:, kept])
        projected = eigenvectors.T @ remainder[kept]
        scale = float(spread[kept].mean()) or 1.0
        for alpha in alphas:
            pair_weight = torch.zeros(n_pairs, fit.d_out, dtype=torch.float64, device=device)
            weight = a_inv_c
            if not np.isinf(alpha) and len(kept):
                pair_weight[kept] = eigenvectors @ (projected / (eigenvalues.clamp(min=0) + alpha * scale)[:, None])
                weight = a_inv_c - a_inv_b[:, kept] @ pair_weight[kept]  # the other pairs' weights are zero
            bias = y_mean - z_mean[code] @ weight - z_mean[pair] @ pair_weight
            yield PairRidgeModel(weight, pair_weight, bias, design.pairs, n, alpha, design.lookup)

    # every candidate is scored on the same tune batches, with the same pairs: read and look them up once (the
    # numbers are residual_fvu's: the same batches, in order, into one accumulator)
    tune_batches = []
    for batch in tune.batches(8192):
        batch = batch._replace(inputs=batch.inputs[:0]).to(device)  # a pair ridge does not read the activation
        tune_batches.append((batch, design.lookup.active(batch.values, batch.indices)))

    @torch.no_grad()
    def tune_fvu(model: PairRidgeModel) -> float:
        accumulator = VarianceAccumulator(tune.d_out)
        for batch, active in tune_batches:
            accumulator.add(batch.target, model.predict(batch, active))
        return accumulator.fvu()

    def scored(models) -> list[tuple[float, int, PairRidgeModel]]:
        return [(tune_fvu(model), i, model) for i, model in enumerate(models)]

    everything = scored(candidates(torch.arange(n_pairs, device=device)))
    best = min(everything, key=lambda item: item[:2])  # ties go to the earlier: "no pairs" comes first
    finite = [item for item in everything if not np.isinf(item[2].alpha)]
    if finite and n_pairs:  # rank the pairs by their standardised coefficients at the best finite penalty
        ranking = min(finite, key=lambda item: item[:2])[2]
        order = torch.argsort(ranking.pair_weight.double().norm(dim=1) * spread.sqrt(), descending=True)
        for m in (m for m in keep if m < n_pairs):
            best = min([best] + scored(candidates(torch.sort(order[:m]).values)), key=lambda item: item[0])
    none = everything[0][2]
    if clear_gain and np.isinf(none.alpha) and best[2] is not none:
        gain = document_sse(none, tune)[0] - document_sse(best[2], tune)[0]
        if len(gain) < 2 or gain.sum() <= gain.std(ddof=1) * np.sqrt(len(gain)):
            return none
    return best[2]


class CodeMLP(nn.Module):
    """The first-order fit plus ``Linear(H, d)(ReLU(W f + c))`` on the sparse code (the first layer is an
    embedding bag). Like the nested NFM, it starts as its first-order model and keeps it fixed
    (:meth:`start_from`; the branch's output layer starts at zero), so its gain is an increment over it."""

    def __init__(self, n_latents: int, d_out: int, hidden: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.n_latents = n_latents
        self.linear_weight = nn.Parameter(torch.zeros(n_latents, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.first = nn.Parameter(torch.randn(n_latents, hidden, generator=generator) * hidden**-0.5)
        self.first_bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, d_out)
        self.register_buffer("output_scale", torch.ones(()))
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.zero_()

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor, bias: torch.Tensor) -> CodeMLP:
        self.linear_weight.copy_(weight.float())  # copy_ crosses devices
        self.bias.copy_(bias.float())
        self.linear_weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        return self

    @torch.no_grad()
    def calibrate(self, values: torch.Tensor, indices: torch.Tensor, target_rms: float) -> CodeMLP:
        """As :meth:`featint_utils.residual.nfm.NFM.calibrate`: unit-RMS hidden pre-activations on this sample, and the
        branch's output in units of ``target_rms``."""
        rms = float(F.embedding_bag(indices, self.first, per_sample_weights=values, mode="sum").square().mean().sqrt())
        if rms > 0:
            self.first.div_(rms)
        self.output_scale.fill_(target_rms)
        return self

    def linear_part(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding_bag(indices, self.linear_weight, per_sample_weights=values, mode="sum") + self.bias

    @torch.no_grad()
    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.linear_weight.copy_(weight.float())
        self.bias.copy_(bias.float())

    def predict(self, batch) -> torch.Tensor:
        hidden = F.embedding_bag(batch.indices, self.first, per_sample_weights=batch.values, mode="sum")
        return self.linear_part(batch.values, batch.indices) + self.out(torch.relu(hidden + self.first_bias)) * (
            self.output_scale
        )


def matched_hidden(n_parameters: int, n_latents: int, d_out: int) -> int:
    """Hidden width at which :class:`CodeMLP`'s branch has (about) ``n_parameters`` parameters (those of the
    NFM's pairwise branch: both models share the same first-order part)."""
    return max(1, round((n_parameters - d_out) / (n_latents + 1 + d_out)))
