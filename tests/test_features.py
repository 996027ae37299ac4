import json

import numpy as np
import torch

from featint_utils.data.extraction import store_from_arrays
from featint_utils.dictionary import features


class _Tok:
    """Tokenizer stand-in: each text is its own sequence of single-character tokens."""

    def __call__(self, text, add_special_tokens=False, verbose=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_top_activations_finds_the_planted_maxima_and_their_context(tmp_path):
    val = np.zeros((50, 4), np.float32)
    val[17, 0], val[3, 0], val[40, 2] = 9.0, 5.0, 7.0
    meta = np.stack([np.zeros(50), np.arange(50), np.zeros(50)], 1).astype(np.int32)
    store = store_from_arrays(tmp_path / "s", {"train": val + 1, "val": val}, meta={"train": meta, "val": meta})
    text = "".join(chr(65 + i % 26) for i in range(50))
    record = {"index": 0, "text_id": "abc", "group": "g", "split": "val", "text": text}
    (store.path / "texts.jsonl").write_text(json.dumps(record) + "\n")

    def encode(x):  # identity "SAE": every dimension is a feature
        values, indices = x.topk(2, dim=1)
        return values, indices

    out = features.top_activations(encode, store, [0, 2], _Tok(), n=2, normalize=False, window=(2, 1))
    assert out["activation"].tolist() == [9.0, 5.0, 7.0]
    assert out["context"].iloc[0] == "PQ «R» S"  # position 17 is 'R'
    assert set(out["text_id"]) == {"abc"}


def test_pick_features_skips_dead_and_dense():
    freq = np.array([0.0, 0.5, 0.05, 0.01, 0.001, 0.0001])
    assert features.pick_features(freq, 3) == [2, 4, 5]
    assert features.pick_features(np.zeros(4), 3) == []
    assert torch.tensor(features.pick_features(freq, 10)).numel() == 4
