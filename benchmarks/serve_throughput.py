"""Serving throughput: ``crome serve-rm`` under 1, 8 and 32 concurrent clients against
offline ``crome score`` of the same texts, measured side by side in one run.

The server is the CLI (``python -m crome.cli serve-rm``) in a subprocess on 127.0.0.1, with
its default batching (``--max-batch 128``, ``--max-wait-ms 5``), serving ``--model`` or, by
default, a fresh ``RewardModel.create()`` on the packaged MiniLM (throughput does not depend
on training), fp32. The data: the first ``--pairs`` helpful-base test pairs. Each client
(a thread with a :class:`crome.client.RewardClient`, no retries, so every failure counts)
sends one pair per request to ``/score`` (the prompt, its chosen and its rejected answer)
until all ``--pairs`` are sent; an untimed warm-up runs first.

The baseline is ``crome.score.score_pairs`` on the same pairs in this process (what
``crome score`` runs), timed before and after the served levels while the server is idle;
their mean is the reference rate. Printed per level: answers/s and its fraction of the
offline rate, p50 and p99 request latency, errors, rewards that differ from the offline
ones and by how much (``--tolerance``, default 0: bit for bit), and the server's
batch-size histogram over the level (from ``/metrics``).

``--faults`` runs fault clients beside the good ones at every level: garbage bodies,
clients that disconnect mid-body or before reading their answer, and oversize requests
(body bytes, items, characters). Their outcomes are tallied against what the server should
answer (400, 413, or nothing for a dropped connection). The exit status is 1 when a good
client saw an error or a reward off by more than ``--tolerance``, or the server died.

    python benchmarks/serve_throughput.py [--pairs 120] [--concurrency 1,8,32] [--faults]

No timed assertions: it prints, and writes the figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

from _common import ROOT, add_common_args, set_threads, write_result

MAX_BODY_BYTES = 1024 * 1024  # the server's --max-body-bytes here: an oversize body is cheap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=120,
                    help="helpful-base test pairs (the first N); one /score request each")
    ap.add_argument("--concurrency", default="1,8,32",
                    help="comma-separated numbers of concurrent clients, one level each")
    ap.add_argument("--model", default=None,
                    help="a saved RM folder (default: a fresh RewardModel.create())")
    ap.add_argument("--faults", action="store_true",
                    help="run fault clients (garbage, disconnects, oversize) beside the good")
    ap.add_argument("--fault-interval", type=float, default=0.5,
                    help="seconds each fault client (one per kind) waits between its faults")
    ap.add_argument("--tolerance", type=float, default=0.0,
                    help="|served - offline| a good reward may be off by (default 0: bit for "
                         "bit; a CPU whose matrix products give a row different bits in "
                         "different batches needs ~1e-7, see crome/score.py)")
    ap.add_argument("--start-timeout", type=float, default=180.0)
    ap.add_argument("--server-args", default="",
                    help="more crome serve-rm options, e.g. '--max-wait-ms 20'")
    add_common_args(ap, "runs/bench/serve_throughput.json",
                    "torch threads, in this process and the server (default: torch's)")
    return ap.parse_args(argv)


# -- the server -------------------------------------------------------------------------

def start_server(model_dir: Path, port: int, threads: int | None, log_path: Path,
                 extra: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    env.pop("CROME_RM_TOKEN", None)  # loopback, no token: what the clients expect
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "crome.cli", "serve-rm", "--model", str(model_dir),
           "--port", str(port), "--max-body-bytes", str(MAX_BODY_BYTES), *extra]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float,
                 log_path: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            sys.exit(f"crome serve-rm exited with {proc.returncode}:\n"
                     f"{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"crome serve-rm did not answer /health within {timeout:g} s")
        time.sleep(0.2)


def wait_idle(url: str, timeout: float = 300.0) -> None:
    """Until the server has nothing queued and scores nothing more (a dropped client's
    request is still scored), so the baseline is not timed beside leftover work."""
    deadline = time.monotonic() + timeout
    last = -1.0
    while time.monotonic() < deadline:
        m = scrape(url)
        done = m.get(("crome_rm_sequences_total", ""), 0.0)
        if m.get(("crome_rm_queue_depth", ""), 0.0) == 0 and done == last:
            return
        last = done
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_SAMPLE = re.compile(r'^(crome_rm_\w+)(?:\{([^}]*)\})? (\S+)$', re.MULTILINE)


def scrape(url: str) -> dict[tuple[str, str], float]:
    """Every sample of ``/metrics`` as {(name, labels): value}."""
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return {(m[1], m[2] or ""): float(m[3]) for m in _SAMPLE.finditer(text)}


def batch_histogram(before: dict[tuple[str, str], float],
                    after: dict[tuple[str, str], float]) -> dict[str, int]:
    """Scorer calls per batch-size range over a level (the difference of two scrapes)."""
    def delta(key: tuple[str, str]) -> int:
        return int(after.get(key, 0) - before.get(key, 0))

    out: dict[str, int] = {}
    lower, below = 1, 0
    for name, labels in sorted((k for k in after if k[0] == "crome_rm_batch_size_bucket"),
                               key=lambda k: float(k[1].split('"')[1])):
        le = labels.split('"')[1]
        cum = delta((name, labels))
        if cum - below:
            top = "inf" if le == "+Inf" else str(int(float(le)))
            out[str(lower) if str(lower) == top else f"{lower}-{top}"] = cum - below
        below = cum
        if le != "+Inf":
            lower = int(float(le)) + 1
    return out


# -- the good clients -------------------------------------------------------------------

@dataclass
class Level:
    concurrency: int
    requests: int = 0
    answers: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    mismatches: int = 0  # rewards not equal (==) to the offline ones
    beyond_tolerance: int = 0  # of those, off by more than --tolerance
    max_diff: float = 0.0
    batch_sizes: dict[str, int] = field(default_factory=dict)
    scorer_calls: int = 0
    mean_batch: float = 0.0
    faults: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def answers_per_second(self) -> float:
        return self.answers / self.seconds if self.seconds else 0.0

    def quantile(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_level(url: str, records: list[Any], expected: list[list[float]],
              concurrency: int, tolerance: float = 0.0) -> Level:
    """All records through ``concurrency`` client threads, one /score request each."""
    from crome.client import ClientOptions, RewardClient, RewardServerError

    level = Level(concurrency)
    lock = threading.Lock()
    todo = iter(range(len(records)))
    start = threading.Barrier(concurrency + 1)

    def client_thread() -> None:
        with RewardClient(url, ClientOptions(retries=0, timeout_s=120)) as client:
            start.wait()
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                r = records[i]
                t0 = time.perf_counter()
                try:
                    got = client.score(r.prompt, [r.chosen, r.rejected])
                    error = None
                except RewardServerError as exc:
                    got, error = None, f"HTTP {exc.status}: {exc.message}"[:120]
                elapsed = time.perf_counter() - t0
                with lock:
                    level.requests += 1
                    if error is not None:
                        level.errors[error] += 1
                        continue
                    level.latencies.append(elapsed)
                    level.answers += 2
                    diffs = [abs(a - b) for a, b in zip(got, expected[i], strict=True)]
                    level.mismatches += sum(d != 0 for d in diffs)
                    level.beyond_tolerance += sum(d > tolerance for d in diffs)
                    level.max_diff = max(level.max_diff, *diffs)

    threads = [threading.Thread(target=client_thread) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    level.seconds = time.perf_counter() - t0
    return level


# -- the fault clients ------------------------------------------------------------------

GARBAGE = [b"{not json", b"\xff\xfe\x00\x01garbage", b'{"prompt": "p", "answers": ',
           b"[1, 2, 3]", b'{"prompt": 5, "answers": ["a"]}', b'"just a string"',
           b'{"prompt": "p", "answers": ["a"], "temperature": 0.7}',
           b'{"prompt": [{"role": "bot", "content": "x"}], "answers": ["a"]}']


def _raw(host: str, port: int, payload: bytes, read: bool) -> str:
    """Send raw bytes on a fresh connection; the status line's code when ``read``."""
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(payload)
        if not read:
            return "dropped"
        data = s.recv(64)
    parts = data.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 else "closed"


def _head(port: int, length: int | None, extra: str = "") -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else ""
    return (f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\n{size}{extra}\r\n").encode()


def fault_round(kind: str, k: int, url: str, port: int, good_body: bytes) -> tuple[str, str]:
    """One fault of ``kind`` (the ``k``-th); returns (what was sent, the outcome)."""
    import httpx

    try:
        if kind == "garbage":
            body = GARBAGE[k % len(GARBAGE)]
            return "garbage body", str(httpx.post(url + "/score", content=body,
                                                  timeout=30).status_code)
        if kind == "disconnect":
            if k % 2 == 0:  # the body is cut off: the server waits for the rest, then not
                return "cut body", _raw("127.0.0.1", port, _head(port, len(good_body))
                                        + good_body[:len(good_body) // 2], read=False)
            # the whole request, then gone before the answer
            return "left before answer", _raw("127.0.0.1", port,
                                              _head(port, len(good_body)) + good_body,
                                              read=False)
        if kind == "oversize":
            step = k % 4
            if step == 0:  # refused on its Content-Length, before any body is read
                return "Content-Length too big", _raw(
                    "127.0.0.1", port, _head(port, MAX_BODY_BYTES + 1), read=True)
            if step == 1:  # chunked (no length): refused as the bytes come
                chunk = b"x" * 65536

                def chunks():  # type: ignore[no-untyped-def]
                    yield b'{"prompt": "p", "answers": ["'
                    for _ in range(MAX_BODY_BYTES // len(chunk) + 2):
                        yield chunk
                    yield b'"]}'

                return "chunked body too big", str(httpx.post(
                    url + "/score", content=chunks(), timeout=30).status_code)
            if step == 2:
                body = {"prompt": "p", "answers": ["a"] * 600}
                return "600 answers", str(httpx.post(url + "/score", json=body,
                                                     timeout=30).status_code)
            body = {"prompt": "p", "answers": ["y" * 250_000]}
            return "250k-char answer", str(httpx.post(url + "/score", json=body,
                                                      timeout=30).status_code)
    except httpx.TransportError as exc:  # the server hung up on a refused upload: fine
        return kind, f"closed ({type(exc).__name__})"
    except OSError as exc:
        return kind, f"closed ({type(exc).__name__})"
    raise ValueError(kind)


EXPECTED = {"garbage body": {"400"}, "cut body": {"dropped"}, "left before answer": {"dropped"},
            "Content-Length too big": {"413"}, "chunked body too big": {"413"},
            "600 answers": {"413"}, "250k-char answer": {"413"}}


class FaultClients:
    """One thread per fault kind, each sending its faults until stopped."""

    def __init__(self, url: str, port: int, good_body: bytes, interval: float) -> None:
        self.url, self.port, self.good_body, self.interval = url, port, good_body, interval
        self.tally: dict[str, Counter[str]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(kind,), daemon=True)
                         for kind in ("garbage", "disconnect", "oversize")]

    def _loop(self, kind: str) -> None:
        for k in itertools.count():
            if self._stop.is_set():
                return
            sent, outcome = fault_round(kind, k, self.url, self.port, self.good_body)
            with self._lock:
                self.tally.setdefault(sent, Counter())[outcome] += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def unexpected(self) -> int:
        return sum(n for sent, c in self.tally.items() for outcome, n in c.items()
                   if outcome not in EXPECTED.get(sent, ()) and not outcome.startswith("closed"))


# -- main -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from crome.data.sources import load_source
    from crome.doctor import cpu_name
    from crome.model import ModelOptions, RewardModel
    from crome.oracle.server import free_port
    from crome.score import ScoreOptions, score_pairs

    set_threads(args.threads)
    levels_c = [int(x) for x in args.concurrency.split(",") if x.strip()]
    source = load_source("hh-rlhf/helpful-base",
                         data_dir=Path(args.data_dir) if args.data_dir else None,
                         limit=args.pairs)
    records = source.records
    print(source.summary())
    tmp = tempfile.TemporaryDirectory(prefix="crome-serve-bench-")
    if args.model:
        model_dir = Path(args.model)
    else:
        model_dir = RewardModel.create(ModelOptions(max_length=args.max_length)).save(
            Path(tmp.name) / "rm", card=False)
    rm = RewardModel.load(model_dir)  # loaded as the server loads it
    opts = ScoreOptions()  # the server's scorer options (batch_size 64, fp32)

    offline_times: list[float] = []

    def offline() -> list[list[float]]:
        t0 = time.perf_counter()
        chosen, rejected = score_pairs(rm, records, opts)
        offline_times.append(time.perf_counter() - t0)
        print(f"  offline crome score: {2 * len(records) / offline_times[-1]:.1f} answers/s "
              f"({offline_times[-1]:.2f} s)", flush=True)
        return [[c, r] for c, r in zip(chosen, rejected, strict=True)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(tmp.name) / "server.log"
    proc = start_server(model_dir, port, args.threads, log_path, shlex.split(args.server_args))
    levels: list[Level] = []
    unexpected = 0
    try:
        wait_healthy(url, proc, args.start_timeout, log_path)
        score_pairs(rm, records[:8], opts)  # untimed warm-ups of both paths
        run_level(url, records[:16], [[0.0, 0.0]] * 16, 8)
        expected = offline()
        good_body = json.dumps({"prompt": records[0].prompt,
                                "answers": [records[0].chosen, records[0].rejected]}).encode()
        for k, c in enumerate(levels_c):
            if k:  # the baseline between the levels too: the machine's load drifts
                wait_idle(url)
                offline()
            before = scrape(url)
            faults = (FaultClients(url, port, good_body, args.fault_interval) if args.faults
                      else None)
            if faults is not None:
                with faults:
                    level = run_level(url, records, expected, c, args.tolerance)
                level.faults = {k: dict(v) for k, v in sorted(faults.tally.items())}
                unexpected += faults.unexpected()
            else:
                level = run_level(url, records, expected, c, args.tolerance)
            after = scrape(url)
            level.batch_sizes = batch_histogram(before, after)
            level.scorer_calls = int(after.get(("crome_rm_batch_size_count", ""), 0)
                                     - before.get(("crome_rm_batch_size_count", ""), 0))
            seqs = (after.get(("crome_rm_batch_size_sum", ""), 0)
                    - before.get(("crome_rm_batch_size_sum", ""), 0))
            level.mean_batch = seqs / level.scorer_calls if level.scorer_calls else 0.0
            levels.append(level)
            print(f"  {c:>3} clients: {level.answers_per_second:.1f} answers/s "
                  f"({level.seconds:.2f} s), {sum(level.errors.values())} errors, "
                  f"{level.mismatches} rewards != offline (max |diff| {level.max_diff:.3g})",
                  flush=True)
        wait_idle(url)
        offline()
        alive = proc.poll() is None and httpx_ok(url)
        server_errors = {k[1]: int(v) for k, v in scrape(url).items()
                         if k[0] == "crome_rm_errors_total"} if alive else {}
    finally:
        stop_server(proc)
    log_text = log_path.read_text(errors="replace")
    tracebacks = log_text.count("Traceback (most recent call last)")
    tmp.cleanup()

    off_aps = 2 * len(records) / statistics.median(offline_times)
    machine = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "cores": os.cpu_count()}
    print()
    print(f"CPU: {machine['cpu']}; {machine['cores']} cores; torch threads "
          f"{machine['threads']}; model {'fresh MiniLM RM' if not args.model else args.model}, "
          f"max_length {rm.formatter.max_length}, fp32")
    print(f"{len(records)} helpful-base test pairs, one /score request (2 answers) each; "
          f"offline crome score: {off_aps:.1f} answers/s (median of "
          f"{', '.join(f'{2 * len(records) / t:.1f}' for t in offline_times)})"
          + ("; with fault clients" if args.faults else ""))
    print(f"{'clients':>8} {'answers/s':>10} {'/offline':>9} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>7} {'!=offline':>9} {'max|diff|':>9} {'calls':>6} {'mean batch':>10}  "
          f"batch sizes (sequences per scorer call: calls)")
    for lv in levels:
        hist = ", ".join(f"{k}: {v}" for k, v in lv.batch_sizes.items())
        print(f"{lv.concurrency:>8} {lv.answers_per_second:>10.1f} "
              f"{lv.answers_per_second / off_aps:>9.2f} {1000 * lv.quantile(0.5):>8.0f} "
              f"{1000 * lv.quantile(0.99):>8.0f} {sum(lv.errors.values()):>7} "
              f"{lv.mismatches:>9} {lv.max_diff:>9.2g} {lv.scorer_calls:>6} "
              f"{lv.mean_batch:>10.1f}  {hist}")
        for err, n in lv.errors.most_common(5):
            print(f"{'':>8} error x{n}: {err}")
    if args.faults:
        print("fault requests (all levels) -> outcomes:")
        merged: dict[str, Counter[str]] = {}
        for lv in levels:
            for sent, outcomes in lv.faults.items():
                merged.setdefault(sent, Counter()).update(outcomes)
        for sent, outcomes in sorted(merged.items()):
            want = "/".join(sorted(EXPECTED.get(sent, set())))
            print(f"  {sent:24} {sum(outcomes.values()):>5}  "
                  f"{', '.join(f'{o}: {n}' for o, n in outcomes.most_common())}  "
                  f"(expected {want})")
        print(f"unexpected fault outcomes: {unexpected}")
    print(f"server errors_total by route/reason: {server_errors or 'none'}; "
          f"tracebacks in the server log: {tracebacks}; server alive at the end: {alive}")
    good_errors = sum(sum(lv.errors.values()) for lv in levels)
    mismatches = sum(lv.mismatches for lv in levels)
    beyond = sum(lv.beyond_tolerance for lv in levels)
    ok = good_errors == 0 and beyond == 0 and alive
    print(f"good clients: {good_errors} errors; {mismatches} of "
          f"{sum(lv.answers for lv in levels)} rewards != offline, {beyond} of them off by "
          f"more than the tolerance {args.tolerance:g} -> {'OK' if ok else 'FAILED'}")

    res = {"benchmark": "serve_throughput", "machine": machine,
           "settings": {"pairs": len(records), "concurrency": levels_c,
                        "max_length": rm.formatter.max_length, "faults": args.faults,
                        "model": args.model or "fresh MiniLM RM",
                        "max_body_bytes": MAX_BODY_BYTES},
           "offline": {"seconds": offline_times, "answers_per_second": off_aps},
           "levels": [{**{k: v for k, v in asdict(lv).items() if k != "latencies"},
                       "answers_per_second": lv.answers_per_second,
                       "fraction_of_offline": lv.answers_per_second / off_aps,
                       "p50_s": lv.quantile(0.5), "p99_s": lv.quantile(0.99)}
                      for lv in levels],
           "server_errors": server_errors, "server_tracebacks": tracebacks,
           "unexpected_fault_outcomes": unexpected, "ok": ok}
    write_result(res, args.out)
    return 0 if ok else 1


def httpx_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
