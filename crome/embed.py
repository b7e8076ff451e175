"""Sentence embeddings with the packaged all-MiniLM-L6-v2 (mean pooling, unit length).

Used where crome must judge meaning without an LLM: how far a rewrite moved from its source
(the augmentation guards) and whether two prompts are unrelated (neutral and RRM pairs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch

from crome.backbones import default_backbone


class Embedder:
    def __init__(self, model_dir: str | None = None, max_length: int = 256,
                 batch_size: int = 32) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = model_dir or default_backbone()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self._memo: dict[str, np.ndarray] = {}

    @torch.inference_mode()
    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[idx] = pooled.numpy()
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors, one row per text (repeated texts are embedded once)."""
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        new = {k: t for k, t in zip(keys, texts) if k not in self._memo}
        if new:
            vecs = self._encode(list(new.values()))
            self._memo.update(zip(new.keys(), vecs))
        if not texts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.stack([self._memo[k] for k in keys])

    def similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        """Cosine similarity of ``a[i]`` with ``b[i]``."""
        return (self.encode(a) * self.encode(b)).sum(-1)
