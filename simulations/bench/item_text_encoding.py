"""Encoding a catalogue's item texts: float32 against dynamic int8, wall and CPU time side by side.

    HF_HUB_OFFLINE=1 nice -n 5 python -m simulations.bench.item_text_encoding \
        --data ../shared/data/ml-1m/movies.dat --threads 1 2

Texts are exactly what ``item-features = text`` encodes (``common.item_text.item_texts``, all
titles of the metadata in item-id order), through ``common.text_encoder.encode_with``
(batches of equal token count). Reported separately: importing sentence-transformers and loading
the model (``load_s``), quantizing it (``quantize_s``), and encoding all texts for each
(precision, threads) pair (``wall_s`` and ``cpu_s``, the process CPU time of all threads;
one warm-up batch each first). The pairs run in turn in one process; on a shared machine
only their ratios and CPU seconds compare, so the 1-minute load average is recorded before and
after each. Agreement of int8 with float over the whole catalogue: cosine of each item's two
embeddings, and nearest neighbours (same nearest title; int8's nearest among float's top 5;
top-10 overlap). Token statistics show how much of the work is padding. Writes
simulations/bench/results/item_text_encoding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from common.data.loaders import load_item_titles
from common.item_text import item_texts
from common.text_encoder import available_cores, encode_with, load_encoder, quantize_encoder, token_lengths

from simulations.bench import RESULTS, write_results
from common.cli_args import non_negative_int, output_file, positive_int
from common.cli_errors import user_errors_exit


def token_stats(encoder: Any, texts: list[str], batch_size: int) -> dict:  # a SentenceTransformer
    """Real tokens per text and the padded totals of batches sorted by character length (what
    sentence-transformers' encode does) and by token count (what ``encode_with`` does)."""
    lengths = token_lengths(encoder, texts)
    out = {"texts": len(texts), "tokens_mean": round(float(lengths.mean()), 2), "tokens_max": int(lengths.max()),
           "tokens_total": int(lengths.sum())}
    for name, order in (("by_characters", np.argsort([-len(t) for t in texts])), ("by_tokens", np.argsort(-lengths, kind="stable"))):
        padded = sum(int(lengths[order[i:i + batch_size]].max()) * len(order[i:i + batch_size])
                     for i in range(0, len(texts), batch_size))
        out[f"padded_total_sorted_{name}"] = int(padded)
        out[f"padding_share_sorted_{name}"] = round(1 - lengths.sum() / padded, 4)
    return out


def agreement(ref: np.ndarray, got: np.ndarray, block: int = 1024) -> dict:
    """How close ``got`` (int8) is to ``ref`` (float): per-item cosine and nearest neighbours."""
    cos = (ref * got).sum(1)
    same, in_top5, overlap = 0, 0, 0.0
    for start in range(0, len(ref), block):
        rows = np.arange(start, min(start + block, len(ref)))
        s_ref, s_got = ref[rows] @ ref.T, got[rows] @ got.T
        s_ref[np.arange(len(rows)), rows] = -np.inf  # an item is not its own neighbour
        s_got[np.arange(len(rows)), rows] = -np.inf
        top_ref = np.argsort(-s_ref, axis=1)[:, :10]
        top_got = np.argsort(-s_got, axis=1)[:, :10]
        same += int((top_ref[:, 0] == top_got[:, 0]).sum())
        in_top5 += int(sum(g in r[:5] for g, r in zip(top_got[:, 0], top_ref)))
        overlap += sum(len(set(a) & set(b)) / 10 for a, b in zip(top_ref, top_got))
    n = len(ref)
    return {"cosine_mean": round(float(cos.mean()), 4), "cosine_min": round(float(cos.min()), 4),
            "cosine_p01": round(float(np.percentile(cos, 1)), 4), "nearest_same": round(same / n, 4),
            "nearest_in_float_top5": round(in_top5 / n, 4), "top10_overlap": round(overlap / n, 4)}


@user_errors_exit
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/ml-1m/movies.dat", help="catalogue metadata (movies.dat, u.item, movies.csv)")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[available_cores()], help="torch threads to time")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--limit", type=non_negative_int, default=0, help="encode only the first N texts (0 = all)")
    parser.add_argument("--baseline", action="store_true",
                        help="also time the previous path: one plain encode call, torch's default threads")
    parser.add_argument("--out", type=output_file, default=str(RESULTS / "item_text_encoding.json"))
    args = parser.parse_args(argv)

    meta = load_item_titles(args.data)
    catalogue = np.array(sorted(meta, key=lambda i: (len(i), i)))  # numeric ids in numeric order
    texts = item_texts(catalogue, meta)[: args.limit or None]
    settings = {"data": args.data, "model": args.model, "batch_size": args.batch_size, "cores": available_cores(),
                "command": " ".join(["python -m simulations.bench.item_text_encoding", *sys.argv[1:]]),
                "load_average_at_start": os.getloadavg()}

    start, cpu = time.perf_counter(), time.process_time()
    encoders = {"float32": load_encoder(args.model)}
    load = {"load_s": round(time.perf_counter() - start, 2), "load_cpu_s": round(time.process_time() - cpu, 2)}
    start = time.perf_counter()
    encoders["int8"] = quantize_encoder(encoders["float32"])
    load["quantize_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(load), flush=True)
    tokens = token_stats(encoders["float32"], texts, args.batch_size)
    print(json.dumps(tokens), flush=True)

    rows, embeddings = [], {}
    if args.baseline:  # what common.item_text did before: sentence-transformers' own batching and threads
        encoders["float32"].encode(texts[: args.batch_size // 4])
        before, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
        encoders["float32"].encode(texts, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)
        wall = time.perf_counter() - start
        rows.append({"precision": "float32 plain encode (before)", "threads": torch.get_num_threads(), "wall_s": round(wall, 2),
                     "cpu_s": round(time.process_time() - cpu, 2), "texts_per_s": round(len(texts) / wall, 1),
                     "load_average_1min": [round(before, 2), round(os.getloadavg()[0], 2)]})
        print(json.dumps(rows[-1]), flush=True)
    for threads in args.threads:
        for precision, encoder in encoders.items():
            encode_with(encoder, texts[: args.batch_size // 4], threads=threads)  # warm-up: first-call allocations
            before, start, cpu = os.getloadavg()[0], time.perf_counter(), time.process_time()
            embeddings[precision] = encode_with(encoder, texts, batch_size=args.batch_size, threads=threads)
            wall = time.perf_counter() - start
            rows.append({"precision": precision, "threads": threads, "wall_s": round(wall, 2),
                         "cpu_s": round(time.process_time() - cpu, 2), "texts_per_s": round(len(texts) / wall, 1),
                         "load_average_1min": [round(before, 2), round(os.getloadavg()[0], 2)]})
            print(json.dumps(rows[-1]), flush=True)
    close = agreement(embeddings["float32"], embeddings["int8"])
    print(json.dumps({"int8_vs_float32": close}), flush=True)

    print(f"\n{'threads':>7} {'float32 wall/cpu s':>20} {'int8 wall/cpu s':>17} {'int8 speed-up (cpu)':>20}")
    for threads in args.threads:
        f, q = (next(r for r in rows if r["threads"] == threads and r["precision"] == p) for p in ("float32", "int8"))
        print(f"{threads:>7} {f['wall_s']:>11.1f} / {f['cpu_s']:<6.1f} {q['wall_s']:>8.1f} / {q['cpu_s']:<6.1f} "
              f"{f['cpu_s'] / q['cpu_s']:>18.2f}x")
    settings["load_average_at_end"] = os.getloadavg()
    write_results(args.out, {"settings": settings, "load": load, "tokens": tokens, "rows": rows,
                             "int8_vs_float32": close})
    return 0


if __name__ == "__main__":
    sys.exit(main())
