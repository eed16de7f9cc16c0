"""Fidelity of a patched encoder to its unpatched original, at lengths where the approximation is real.

Two measures, both on the offline assets:

* **agreement**: token-level and mean-pooled cosine between the patched and the original
  ``last_hidden_state`` on consecutive Hamlet windows of ``length`` tokens;
* **long-context task accuracy**: Rotten Tomatoes reviews are packed into ``length``-token
  documents; each review is embedded by mean-pooling its own token span inside the document; a
  logistic-regression head is trained once on the *original* model's span embeddings and scored on
  both models' embeddings of held-out documents.

And speed: forward time of the whole model at its own length, and of attention alone at long
synthetic lengths, each against softmax SDPA, interleaved, median of the repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "PackedDocuments",
    "agreement",
    "attention_speed",
    "hamlet_windows",
    "hidden_agreement",
    "hidden_states",
    "long_context_accuracy",
    "model_speed",
    "pack_reviews",
    "span_embeddings",
]


def hamlet_windows(tokenizer, length: int, count: int, offset: int = 0) -> torch.Tensor:
    """``(count, length)`` input ids: consecutive windows of Hamlet, each wrapped in special tokens.

    ``offset`` skips that many windows (e.g. to hold windows out of training)."""
    from .assets import load_hamlet

    if length < 8:
        raise ValueError(f"windows need at least 8 tokens, got length={length}")
    ids = tokenizer(load_hamlet(), add_special_tokens=False, verbose=False)["input_ids"]
    # Encoders get [CLS] ... [SEP] as in training; decoders take the plain token stream.
    prefix = [tokenizer.cls_token_id] if tokenizer.cls_token_id is not None else []
    suffix = [tokenizer.sep_token_id] if tokenizer.sep_token_id is not None and prefix else []
    body = length - len(prefix) - len(suffix)
    available = len(ids) // body - offset
    if available < count:
        raise ValueError(f"Hamlet holds only {max(available, 0)} windows of {length} tokens after offset {offset}")
    rows = [prefix + ids[(offset + i) * body : (offset + i + 1) * body] + suffix for i in range(count)]
    return torch.tensor(rows)


@torch.inference_mode()
def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  batch_size: int = 8) -> torch.Tensor:
    """``last_hidden_state`` ``(n, seq, hidden)`` in float32 for ``(n, seq)`` inputs, in batches."""
    outs = []
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i : i + batch_size]
        mask = attention_mask[i : i + batch_size] if attention_mask is not None else torch.ones_like(ids)
        outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state.float())
    return torch.cat(outs)


def agreement(reference: torch.Tensor, hidden: torch.Tensor) -> dict[str, float]:
    """Mean token cosine and mean-pooled cosine between two ``(n, seq, hidden)`` outputs (no padding)."""
    return {
        "token_cosine": F.cosine_similarity(reference, hidden, dim=-1).mean().item(),
        "pooled_cosine": F.cosine_similarity(reference.mean(1), hidden.mean(1), dim=-1).mean().item(),
    }


def hidden_agreement(original, patched, input_ids: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """:func:`agreement` of ``patched`` to ``original`` on ``(n, length)`` inputs."""
    return agreement(hidden_states(original, input_ids, batch_size=batch_size),
                     hidden_states(patched, input_ids, batch_size=batch_size))


@dataclass
class PackedDocuments:
    """Reviews packed into fixed-length documents.

    Attributes:
        input_ids: ``(docs, length)``; attention_mask: ``(docs, length)`` (1 = real token);
        spans: per review ``(doc, start, end)`` token positions; labels: per review.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    spans: list[tuple[int, int, int]]
    labels: np.ndarray


def pack_reviews(tokenizer, texts: list[str], labels, length: int, max_docs: int | None = None) -> PackedDocuments:
    """Pack consecutive reviews into documents of ``length`` tokens ([CLS] r1 r2 ... [SEP] + padding).

    A review longer than a document is truncated; the last document is padded. With ``max_docs``,
    packing stops once that many documents are full."""
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise ValueError("pack_reviews needs a tokenizer with [CLS] and [SEP] tokens (a BERT-style encoder)")
    pad_id = tokenizer.pad_token_id or 0
    capacity = length - 2
    docs, spans, kept, current = [], [], [], []
    for text, label in zip(texts, labels):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"][:capacity]
        if not ids:
            continue
        if len(current) + len(ids) > capacity:
            docs.append(current)
            current = []
            if max_docs is not None and len(docs) == max_docs:
                break
        spans.append((len(docs), 1 + len(current), 1 + len(current) + len(ids)))
        kept.append(int(label))
        current = current + ids
    if current:
        docs.append(current)
    input_ids = torch.full((len(docs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(docs), length, dtype=torch.long)
    for i, body in enumerate(docs):
        row = [cls_id, *body, sep_id]
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return PackedDocuments(input_ids, mask, spans, np.asarray(kept))


def span_embeddings(model, docs: PackedDocuments, batch_size: int = 8) -> np.ndarray:
    """``(reviews, hidden)``: each review's mean-pooled hidden states over its span in its document."""
    hidden = hidden_states(model, docs.input_ids, docs.attention_mask, batch_size)
    return np.stack([hidden[d, s:e].mean(0).numpy() for d, s, e in docs.spans])


def long_context_accuracy(
    original, patched, tokenizer, *, length: int = 512, train_reviews: int = 1000, test_reviews: int = 500,
    seed: int = 0, batch_size: int = 8,
) -> dict[str, float]:
    """Rotten Tomatoes accuracy of a head trained on the original model's span embeddings.

    Returns accuracy of the original and of the patched model on the same held-out reviews, the
    majority-class rate, and the sizes used."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from .assets import load_rotten_tomatoes

    data = load_rotten_tomatoes().shuffle(seed=seed)
    if train_reviews + test_reviews > len(data):
        raise ValueError(f"asked for {train_reviews}+{test_reviews} reviews, the dataset has {len(data)}")
    train = data.select(range(train_reviews))
    test = data.select(range(train_reviews, train_reviews + test_reviews))
    train_docs = pack_reviews(tokenizer, train["text"], train["label"], length)
    test_docs = pack_reviews(tokenizer, test["text"], test["label"], length)
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.5))
    head.fit(span_embeddings(original, train_docs, batch_size), train_docs.labels)
    y = test_docs.labels
    acc_original = float((head.predict(span_embeddings(original, test_docs, batch_size)) == y).mean())
    acc_patched = float((head.predict(span_embeddings(patched, test_docs, batch_size)) == y).mean())
    return {
        "accuracy_original": acc_original,
        "accuracy_patched": acc_patched,
        "accuracy_drop_points": 100 * (acc_original - acc_patched),
        "majority_class": float(max(y.mean(), 1 - y.mean())),
        "train_reviews": len(train_docs.labels),
        "test_reviews": len(y),
        "documents": int(len(train_docs.input_ids) + len(test_docs.input_ids)),
        "length": length,
    }


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@torch.inference_mode()
def model_speed(original, patched, input_ids: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Whole-model forward time, original vs patched, interleaved; median seconds and the ratio."""
    mask = torch.ones_like(input_ids)
    med = _interleaved(
        {
            "original": lambda: original(input_ids=input_ids, attention_mask=mask),
            "patched": lambda: patched(input_ids=input_ids, attention_mask=mask),
        },
        repeats,
    )
    return {"seconds_original": med["original"], "seconds_patched": med["patched"],
            "speedup": med["original"] / med["patched"], "tokens": int(input_ids.numel())}


@torch.inference_mode()
def attention_speed(kind: str, params: dict, *, heads: int, head_dim: int, length: int, repeats: int = 3,
                    causal: bool = False) -> dict[str, float]:
    """Attention alone at a synthetic length: the kind vs SDPA, batch 1, interleaved."""
    from .attention import get_attention_kind

    k = get_attention_kind(kind)
    p = k.make_params(**params)
    g = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(1, heads, length, head_dim, generator=g) for _ in range(3))
    med = _interleaved(
        {
            "sdpa": lambda: F.scaled_dot_product_attention(q, key, v, is_causal=causal),
            kind: lambda: k.forward(q, key, v, p, causal=causal, scale=head_dim**-0.5),
        },
        repeats,
    )
    speedup = med["sdpa"] / med[kind]
    return {"length": length, "seconds_sdpa": med["sdpa"], "seconds_kind": med[kind], "speedup": speedup}
