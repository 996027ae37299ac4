"""Splices: replace a layer's output at real-token positions during a forward pass, and what that does to
the model's output. The splice hooks the one module :func:`featint_utils.data.models.hook_module` names, so it
acts at exactly the point the SAE was trained on; its hook is removed however the block exits.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .activation_store import ActivationStore
from .extraction import padded_batches
from .models import LoadedModel, hook_module, mean_pool, prefix_modules


@contextmanager
def splice(model: torch.nn.Module, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]):
    """During forwards, ``hidden_states[layer]`` at positions ``state["mask"]`` ([batch, seq] bool) becomes
    ``replace(h)`` (h: [n_positions, d]); every other position is left exactly as it was. Yields ``state``."""
    state: dict = {"mask": None}

    def hook(_module, _inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = state["mask"]
        if mask is None:
            return output
        spliced = hidden.clone()
        spliced[mask] = replace(hidden[mask]).to(hidden.dtype)
        return (spliced, *output[1:]) if isinstance(output, tuple) else spliced

    handle = hook_module(model, layer).register_forward_hook(hook)
    try:
        yield state
    finally:
        handle.remove()


class PrefixCache:
    """A forward's work below a layer, kept per batch, so that a series of splices of one set of inputs (06's
    clamp conditions) runs the model below the splice once.

    The first forward over a batch (inside :meth:`forward`) records what the modules up to the layer output
    (:func:`featint_utils.data.models.prefix_modules`: the hooked module's clean output, before any splice,
    and the last block's); every later forward over the same batch skips them and is handed those recorded
    tensors, so it computes exactly what a full forward would, bit for bit. Each batch also has a ``memo``
    dict for what a splice's replacement keeps of the clean activations. One cache serves one model, layer and
    set of inputs: a batch recorded with other input ids is refused. It holds what it keeps until it is dropped
    (per token, two layer outputs and, in 06, the decomposition's parts: about ten times the layer's width)."""

    def __init__(self):
        self._batches: dict = {}

    @contextmanager
    def forward(self, model: torch.nn.Module, layer: int, key, input_ids: torch.Tensor):
        """Inside the block, a forward of ``model`` over ``input_ids`` (batch ``key``) records or replays the
        modules below ``layer``. Yields the batch's memo dict."""
        blocks, hooked = prefix_modules(model, layer)
        entry = self._batches.get(key)
        if entry is not None and (entry["layer"] != layer or not torch.equal(entry["input_ids"], input_ids)):
            raise ValueError(f"batch {key!r} of this PrefixCache was recorded at another layer or with other inputs")
        if entry is None:
            entry = {"layer": layer, "input_ids": input_ids.clone(), "outputs": {}, "memo": {}}
            watched = {"hooked": hooked, **({"block": blocks[-1]} if blocks else {})}
            with _recording(watched, entry["outputs"]):
                yield entry["memo"]
            self._batches[key] = entry  # kept only once the forward has finished
            return
        # every block hands on the last block's output (a stub ignores its input, and the modules after the
        # blocks read only the last one's); the hooked module hands on its own clean output
        stubs = {block: entry["outputs"]["block"] for block in blocks} | {hooked: entry["outputs"]["hooked"]}
        with _replaying(stubs):
            yield entry["memo"]


@contextmanager
def _recording(watched: dict[str, torch.nn.Module], into: dict):
    def record(name):
        def hook(_module, _inputs, output):
            into[name] = output

        return hook

    # prepended: the clean output, whatever a splice hooked on the same module returns
    handles = [module.register_forward_hook(record(name), prepend=True) for name, module in watched.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if set(into) != set(watched):
        raise RuntimeError("the forward did not reach the layer: nothing to replay")


@contextmanager
def _replaying(stubs: dict[torch.nn.Module, object]):
    previous = {module: module.__dict__.get("forward") for module in stubs}
    for module, output in stubs.items():
        module.forward = lambda *args, _output=output, **kwargs: _output
    try:
        yield
    finally:
        for module, forward in previous.items():
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def random_error_like(x: torch.Tensor, reconstruction: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` plus a random direction with the norm of the reconstruction's error, token by token: the control
    that separates "this error matters" from "any error this large matters"."""
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)  # host draws: same on any device
    noise *= (x - reconstruction).norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x + noise


@torch.inference_mode()
def splice_metrics(
    loaded: LoadedModel,
    store: ActivationStore,
    reconstruct: Callable[[torch.Tensor], torch.Tensor],
    split: str = "val",
    max_texts: int = 256,
    batch_size: int = 32,
    seed: int = 0,
) -> dict:
    """Effect on the model's output of replacing ``hidden_states[layer]`` by ``reconstruct(x)`` (raw units)
    at the real tokens of held-out texts, beside a random error of the same norm.

    Encoders: cosine between clean and spliced pooled embeddings. Causal LMs: next-token CE clean / spliced /
    zero-ablated / mean-ablated, CE score ``(CE_zero - CE_spliced) / (CE_zero - CE_clean)`` (and against mean
    ablation), and KL(clean || spliced) per predicted token.
    """
    manifest = store.manifest
    if not store.extracted_by(loaded) or manifest["layer"] < 0:
        raise ValueError(f"the store was extracted from {manifest['model_source']!r}, not {loaded.source!r}")
    layer = manifest["layer"]
    texts = store.texts()
    texts = texts[texts["split"] == split].head(max_texts)
    items = [(split, t) for t in texts.itertuples()]
    generator = torch.Generator().manual_seed(seed)
    mean = torch.from_numpy(store.mean).float()
    device = next(loaded.model.parameters()).device

    def run(batch, replace=None):
        with splice(loaded.model, layer, replace or (lambda h: h)) as state:
            state["mask"] = batch.keep.to(device) if replace is not None else None
            return loaded.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))

    variants = {
        "spliced": lambda h: reconstruct(h),
        "random": lambda h: random_error_like(h, reconstruct(h), generator),
        "zero": torch.zeros_like,
        "mean": lambda h: mean.to(h).expand_as(h),
    }
    sums: dict[str, float] = {}
    count = 0
    for batch in padded_batches(loaded.tokenizer, items, manifest["context_tokens"], batch_size):
        clean = run(batch)
        if loaded.is_causal_lm:
            # predict token t+1 from position t wherever t+1 is a real (stored) token
            target_mask = batch.keep[:, 1:].to(device)
            targets = batch.input_ids[:, 1:].to(device)[target_mask]
            clean_logp = F.log_softmax(clean.logits[:, :-1][target_mask].float(), -1)
            sums["ce_clean"] = sums.get("ce_clean", 0.0) + float(-clean_logp.gather(1, targets[:, None]).sum())
            for name, replace in variants.items():
                logp = F.log_softmax(run(batch, replace).logits[:, :-1][target_mask].float(), -1)
                sums[f"ce_{name}"] = sums.get(f"ce_{name}", 0.0) + float(-logp.gather(1, targets[:, None]).sum())
                if name in ("spliced", "random"):
                    kl = (clean_logp.exp() * (clean_logp - logp)).sum(-1)
                    sums[f"kl_{name}"] = sums.get(f"kl_{name}", 0.0) + float(kl.sum())
            count += len(targets)
        else:
            attention = batch.attention_mask.to(device)
            clean_pooled = mean_pool(clean.last_hidden_state, attention)
            for name in ("spliced", "random"):
                pooled = mean_pool(run(batch, variants[name]).last_hidden_state, attention)
                cosine = F.cosine_similarity(clean_pooled, pooled, dim=-1)
                sums[f"cosine_{name}"] = sums.get(f"cosine_{name}", 0.0) + float(cosine.sum())
            count += len(clean_pooled)
    if count == 0:
        raise ValueError(f"no {split} texts to splice")
    out = {k: v / count for k, v in sums.items()}
    out["n_predictions" if loaded.is_causal_lm else "n_contexts"] = count
    if loaded.is_causal_lm:
        for baseline in ("zero", "mean"):
            gap = out[f"ce_{baseline}"] - out["ce_clean"]
            out[f"ce_score_vs_{baseline}"] = (out[f"ce_{baseline}"] - out["ce_spliced"]) / gap if gap else float("nan")
    return out
