"""What every benchmark script does before it starts: offline mode, an importable checkout,
the options they share, and the torch thread count."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Run as a script from anywhere: make the checkout importable even when not installed.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def add_common_args(ap: argparse.ArgumentParser, out: str, threads_help: str) -> None:
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help=threads_help)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=out)


def write_result(result: dict, out: str) -> Path:
    """The figures as JSON at ``out`` (its folder made); says where."""
    import json

    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def short_helpful_pairs(n: int, max_chars: int, data_dir: str | None = None) -> list:
    """The first ``n`` held-out helpful-base pairs whose answers are at most ``max_chars``
    characters: the pairs the oracle benchmarks rewrite."""
    from crome.data.sources import load_source

    records = load_source("hh-rlhf/helpful-base",
                          data_dir=Path(data_dir) if data_dir else None).records
    return [r for r in records if max(len(r.chosen), len(r.rejected)) <= max_chars][:n]
