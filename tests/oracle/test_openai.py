"""The ``openai`` oracle backend against a real llama.cpp server, with faults injected by a
proxy in front of it (``tests/servers.py``).

Every answer that comes back is compared with what the clean server answers for the same
request (temperature 0, fixed seed): a retried request must end with exactly that text, and
a request that never succeeds must come back as ``text=None`` with an error, never as some
fault body mislabelled as an answer.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from crome.oracle.base import OracleRequest, Sampling
from crome.oracle.cache import CachedOracle, OracleCache
from crome.oracle.openai import OpenAIOptions, OpenAIOracle, retry_after_seconds


def _load_servers():
    """``tests/servers.py``, shared with conftest under one module name."""
    name = "crome_test_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).resolve().parents[1] / "servers.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


servers = _load_servers()
FaultProxy, schedule = servers.FaultProxy, servers.schedule

SAMPLING = Sampling(temperature=0.0, max_tokens=6, seed=7)
# Questions with answers of one or two tokens: each call costs about a second on 2 cores.
QUESTIONS = ["What is 2 + 3? Answer with a number.", "Name a planet.", "Say hello in French.",
             "Give one word that rhymes with cat.", "What is the capital of Italy? One word.",
             "Name one primary color. One word."]
REQUESTS = [OracleRequest.make([{"role": "user", "content": q}], SAMPLING) for q in QUESTIONS]
POISON = "(never answered)"


def oracle(base_url: str, **kw) -> OpenAIOracle:
    opts = {"concurrency": 1, "timeout": 120.0, "max_retries": 4, "backoff_base": 0.05,
            "backoff_max": 2.0}
    opts.update(kw)
    return OpenAIOracle(OpenAIOptions(base_url=base_url, **opts))


def poisoned(i: int = 0) -> OracleRequest:
    return OracleRequest.make([{"role": "user", "content": f"{QUESTIONS[i]} {POISON}"}],
                              SAMPLING)


@pytest.fixture(scope="module")
def reference(llama_server) -> list[str]:
    """What the clean server answers to REQUESTS, one at a time."""
    with oracle(llama_server.base_url) as o:
        out = o.generate(REQUESTS)
    assert all(r.ok and r.attempts == 1 for r in out), [r.error for r in out]
    return [r.text for r in out]  # type: ignore[misc]


# ---- no server -----------------------------------------------------------------------------

def test_retry_after_seconds():
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("") is None
    assert retry_after_seconds("  ") is None
    assert retry_after_seconds("1") == 1.0
    assert retry_after_seconds(" 2.5 ") == 2.5
    assert retry_after_seconds("-3") == 0.0
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("soon") is None
    later = retry_after_seconds(formatdate(time.time() + 60, usegmt=True))
    assert later is not None and 55 <= later <= 61
    assert retry_after_seconds(formatdate(time.time() - 60, usegmt=True)) == 0.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_connection_refused_is_an_error_not_an_exception():
    port = servers.free_port()
    with oracle(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_base=0.01) as o:
        assert o.model == "default"  # /models failed too
        out = o.generate(REQUESTS[:2])
    assert [r.text for r in out] == [None, None]
    assert all(r.attempts == 3 and r.error and "after 3 attempts" in r.error for r in out)


def test_backoff_bounds_and_no_retry_on_a_bad_url():
    with oracle("127.0.0.1:9/v1", model="m", backoff_base=0.5, backoff_max=3.0) as o:
        assert all(0 <= o._delay(0, None) <= 0.5 and 0 <= o._delay(5, None) <= 3.0
                   for _ in range(200))  # full jitter, capped
        assert o._delay(0, 1.0) == 1.0 and o._delay(0, 3600.0) == 3.0  # Retry-After, capped
        [r] = o.generate(REQUESTS[:1])
    assert r.text is None and r.attempts == 1 and r.error and "base_url" in r.error


# ---- the real llama.cpp server -------------------------------------------------------------

@pytest.mark.slow
def test_plain_success(llama_server, reference):
    with oracle(llama_server.base_url) as o:
        assert o.model and o.model != "default"  # taken from GET /models
        [r] = o.generate([REQUESTS[1]])
    assert r.ok and r.error is None and r.attempts == 1 and r.seconds > 0
    assert r.text == reference[1]
    assert 0 < r.usage["completion_tokens"] <= SAMPLING.max_tokens
    assert r.usage["prompt_tokens"] > 0


@pytest.mark.slow
def test_order_preserved_with_concurrency(llama_server, reference):
    seen: dict[int, str | None] = {}
    threads: set[str] = set()

    def on_result(i, resp):
        assert i not in seen
        seen[i] = resp.text
        threads.add(threading.current_thread().name)

    with oracle(llama_server.base_url, concurrency=4) as o:
        out = o.generate(REQUESTS, on_result=on_result)
    assert [r.text for r in out] == reference
    assert seen == dict(enumerate(reference))


@pytest.mark.slow
def test_no_retry_on_other_4xx(llama_server):
    root = llama_server.base_url.removesuffix("/v1")  # POST /chat/completions: 404
    with oracle(root, model="m") as o:
        [r] = o.generate(REQUESTS[:1])
    assert r.text is None and r.attempts == 1 and r.error == "http 404 after 1 attempt"


@pytest.mark.slow
def test_seed_and_sampling_are_sent(llama_server):
    warm = Sampling(temperature=1.0, max_tokens=6, top_p=0.95, seed=1234, stop=("\n\n",))
    req = OracleRequest.make([{"role": "user", "content": "Invent a name for a cat."}], warm)
    with FaultProxy(llama_server.base_url) as proxy, oracle(proxy.base_url) as o:
        # The same KV-cache state before each seeded call (see the report on seeds below).
        out = o.generate([REQUESTS[0], req, REQUESTS[0], req])
    body = proxy.bodies[1]
    assert body["seed"] == 1234 and body["temperature"] == 1.0 and body["top_p"] == 0.95
    assert body["max_tokens"] == 6 and body["stop"] == ["\n\n"] and body["model"] == o.model
    assert body["messages"] == [{"role": "user", "content": "Invent a name for a cat."}]
    assert proxy.bodies[0]["seed"] == SAMPLING.seed and "stop" not in proxy.bodies[0]
    plain = o._payload(OracleRequest.make([{"role": "user", "content": "x"}], Sampling()))
    assert "seed" not in plain and "stop" not in plain
    # llama.cpp reseeds its sampler per request: the same seed draws the same sample.
    assert out[1].ok and out[1].text == out[3].text


@pytest.mark.slow
def test_429_then_ok_honours_retry_after(llama_server, reference):
    with FaultProxy(llama_server.base_url, ["429"]) as proxy, oracle(proxy.base_url) as o:
        t0 = time.monotonic()
        [r] = o.generate(REQUESTS[:1])
        elapsed = time.monotonic() - t0
    assert r.text == reference[0] and r.attempts == 2
    assert elapsed >= 0.95  # Retry-After: 1, not the 0.05 s backoff
    assert proxy.injected == {"429": 1} and proxy.forwarded == 1


@pytest.mark.slow
def test_500_then_ok(llama_server, reference):
    with FaultProxy(llama_server.base_url, ["500", "500"]) as proxy, \
            oracle(proxy.base_url) as o:
        [r] = o.generate(REQUESTS[2:3])
    assert r.text == reference[2] and r.attempts == 3 and r.error is None
    assert proxy.injected == {"500": 2} and proxy.forwarded == 1


@pytest.mark.slow
def test_stall_times_out_then_retries(llama_server, reference):
    # 5 s: far above a one-word answer's second, so only the stall times out.
    with FaultProxy(llama_server.base_url, ["stall"], stall_seconds=60) as proxy, \
            oracle(proxy.base_url, timeout=5.0) as o:
        t0 = time.monotonic()
        [r] = o.generate(REQUESTS[3:4])
        elapsed = time.monotonic() - t0
    assert r.text == reference[3] and r.attempts == 2
    assert 5.0 <= elapsed < 30
    assert proxy.injected == {"stall": 1} and proxy.forwarded == 1


@pytest.mark.slow
def test_garbage_and_bad_json_bodies_are_retried(llama_server, reference):
    with FaultProxy(llama_server.base_url, ["garbage", "bad_json", "garbage"]) as proxy, \
            oracle(proxy.base_url) as o:
        [r] = o.generate(REQUESTS[4:5])
    assert r.text == reference[4] and r.attempts == 4
    assert proxy.injected == {"garbage": 2, "bad_json": 1} and proxy.forwarded == 1


@pytest.mark.slow
def test_bodies_that_never_parse_end_as_errors(llama_server):
    with FaultProxy(llama_server.base_url, always={POISON: "garbage"}) as proxy, \
            oracle(proxy.base_url, max_retries=1) as o:
        [r] = o.generate([poisoned()])
    assert r.text is None and r.error == "non-JSON body after 2 attempts"
    assert proxy.injected == {"garbage": 2} and proxy.forwarded == 0


@pytest.mark.slow
def test_one_request_always_failing_does_not_stop_the_batch(llama_server, reference):
    batch = [REQUESTS[0], poisoned(1), REQUESTS[2], REQUESTS[3]]
    seen: list[int] = []
    with FaultProxy(llama_server.base_url, always={POISON: "500"}) as proxy, \
            oracle(proxy.base_url, concurrency=3, max_retries=2) as o:
        out = o.generate(batch, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3]
    bad = out[1]
    assert bad.text is None and bad.error == "http 500 after 3 attempts" and bad.attempts == 3
    assert [out[i].text for i in (0, 2, 3)] == [reference[0], reference[2], reference[3]]
    assert proxy.injected == {"500": 3} and proxy.forwarded == 3


@pytest.mark.slow
def test_seeded_fault_schedule_with_concurrency(llama_server, reference):
    faults = schedule(seed=3, n=10, rate=0.6, kinds=("429", "500", "garbage", "bad_json"))
    n_faults = sum(f != "ok" for f in faults)
    assert n_faults >= 4
    with FaultProxy(llama_server.base_url, faults) as proxy, \
            oracle(proxy.base_url, concurrency=3, max_retries=len(faults)) as o:
        out = o.generate(REQUESTS)
    assert [r.text for r in out] == reference  # each answer is the clean one, in order
    assert sum(proxy.injected.values()) == n_faults == sum(r.attempts - 1 for r in out)
    assert proxy.forwarded == len(REQUESTS)


@pytest.mark.slow
def test_with_cache(llama_server, reference, tmp_path):
    batch = [REQUESTS[0], REQUESTS[5], poisoned(2)]
    db = tmp_path / "oracle.sqlite3"
    with FaultProxy(llama_server.base_url, always={POISON: "500"}) as proxy:
        first = CachedOracle(oracle(proxy.base_url, max_retries=1), OracleCache(db))
        out1 = first.generate(batch)
        first.close()
        assert (first.stats.misses, first.stats.stored, first.stats.failed) == (3, 2, 1)
        assert [r.text for r in out1[:2]] == [reference[0], reference[5]]
        assert out1[2].text is None

        second = CachedOracle(oracle(proxy.base_url, max_retries=1), OracleCache(db))
        out2 = second.generate(batch)
        second.close()
    # The failure was not cached: it is asked again (and fails again behind the proxy).
    assert (second.stats.hits, second.stats.misses, second.stats.failed) == (2, 1, 1)
    assert [r.text for r in out2[:2]] == [reference[0], reference[5]]
    assert all(r.cached and r.attempts == 0 for r in out2[:2])

    third = CachedOracle(oracle(llama_server.base_url), OracleCache(db))
    assert third.model == first.model
    out3 = third.generate(batch)  # the clean server answers the one that failed
    assert (third.stats.hits, third.stats.misses, third.stats.stored) == (2, 1, 1)
    again = third.generate(batch)
    third.close()
    assert third.stats.misses == 1  # no new call on the second run
    assert [r.text for r in again] == [r.text for r in out3]
    assert all(r.cached for r in again) and all(r.ok for r in again)


@pytest.mark.slow
def test_api_key_never_leaks(llama_server, reference, monkeypatch):
    secret = "sk-crome-test-5e3f9a17c0ffee"
    monkeypatch.setenv("CROME_TEST_FAKE_KEY", secret)
    with FaultProxy(llama_server.base_url, always={POISON: "500"}) as proxy, \
            oracle(proxy.base_url, key_env="CROME_TEST_FAKE_KEY", max_retries=1) as o:
        good, bad = o.generate([REQUESTS[0], poisoned()])
        texts = [repr(o), str(o), repr(o.options), repr(good), repr(bad), str(bad.error)]
    assert proxy.auth == [f"Bearer {secret}"] * 4  # GET /models, then 1 + 2 chat calls
    assert good.text == reference[0]  # the llama.cpp server ignores the header
    assert bad.error == "http 500 after 2 attempts"
    assert "key=set" in repr(o)
    port = servers.free_port()
    with oracle(f"http://127.0.0.1:{port}/v1", key_env="CROME_TEST_FAKE_KEY",
                max_retries=0) as down:
        [r] = down.generate(REQUESTS[:1])
        texts += [repr(down), str(r.error)]
    assert r.text is None and r.error
    for text in texts:
        assert secret not in text and "5e3f9a17" not in text


@pytest.mark.slow
def test_choices_are_read_from_the_servers_top_logprobs(llama_server):
    from crome.oracle.base import choice_logprobs

    letter = Sampling(max_tokens=1, choices=("A", "B"))
    req = OracleRequest.make([{"role": "user", "content": "Which letter comes first in the "
                               "alphabet, A or B? Answer with one letter."}], letter)
    with FaultProxy(llama_server.base_url) as proxy, oracle(proxy.base_url) as o:
        [r] = o.generate([req])
    assert r.ok, r.error
    body = proxy.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] >= 2 and body["max_tokens"] == 1
    lp = choice_logprobs(r)
    assert set(lp) == {"A", "B"} and lp["A"] is not None and lp["A"] <= 0
    assert lp["B"] is None or lp["A"] > lp["B"]
