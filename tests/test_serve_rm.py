"""``crome serve-rm``: the real server (uvicorn on 127.0.0.1, a free port) on a tiny RM.

Most tests share one in-process server; those that need other options (auth, a tiny queue,
a short timeout) start their own, and one runs the CLI in a subprocess to stop it with
SIGTERM while a request is in flight. A second shared server holds a tiny pairwise
preference model (PairPM) for ``/compare``.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from crome.model import ModelOptions, RewardModel
from crome.pairwise import compare_texts
from crome.score import ScoreOptions, score_texts
from crome.serve_rm import (
    RewardServer,
    ServeOptions,
    check_bind,
    encode_text,
    score_raw_texts,
)

MAX_LENGTH = 64  # the rm_dir fixture's (conftest.py)
TOKEN_ENV = "CROME_TEST_RM_TOKEN"


OPTS = {"port": 0, "max_wait_ms": 20, "max_items": 50, "max_chars": 5000,
        "max_body_bytes": 64 * 1024}


@pytest.fixture(scope="module")
def server(served):
    with RewardServer(served, ServeOptions(**OPTS), name="tiny-rm") as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name + (f"{{{want}}}" if labels else "")) + r" (\S+)$"
    m = re.search(pattern, text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def templated(n: int, helpers) -> list[str]:
    import random

    rng = random.Random(5)
    return [f"User: {helpers.sentence(rng, rng.randint(1, 20))}\n\nAssistant: "
            f"{helpers.sentence(rng, rng.randint(1, 25))}" for _ in range(n)]


# -- routes -----------------------------------------------------------------------------

def test_health_needs_nothing_and_names_the_model(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": "tiny-rm", "max_length": MAX_LENGTH,
                        "pairwise": False}


def test_get_reward_scores_templated_text_as_one_sequence(client, offline, helpers):
    texts = templated(6, helpers)
    r = client.post("/get_reward", json={"query": texts, "prompts": ["p"] * 6,
                                         "labels": [""] * 6})  # as OpenRLHF sends it
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rewards"] == body["scores"] == score_raw_texts(offline, texts)
    assert body["truncated"] == 0
    assert len(set(body["rewards"])) == 6
    # one sequence, as the RM's tokenizer makes it: [CLS] text [SEP], no prompt/answer split
    for t in texts:
        assert encode_text(offline, t).input_ids == offline.tokenizer(t)["input_ids"]


def test_classify_has_vllms_shape(client, offline, helpers):
    texts = templated(3, helpers)
    raw = score_raw_texts(offline, texts)
    r = client.post("/classify", json={"model": "/some/verl/path", "input": texts,
                                       "activation": False})  # verl's request
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "object", "created", "model", "data", "usage", "truncated"}
    assert body["id"].startswith("classify-") and body["object"] == "list"
    assert isinstance(body["created"], int) and body["model"] == "tiny-rm"
    assert body["data"] == [{"index": i, "label": "LABEL_0", "probs": [raw[i]], "num_classes": 1}
                            for i in range(3)]
    assert body["data"][-1]["probs"][-1] == raw[-1]  # where verl reads the reward
    tokens = sum(len(offline.tokenizer(t)["input_ids"]) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens,
                             "completion_tokens": 0, "prompt_tokens_details": None}
    # a single string; vLLM's default applies the sigmoid, use_activation=False does not
    one = client.post("/classify", json={"input": texts[0]}).json()
    assert one["data"][0]["probs"] == [pytest.approx(1 / (1 + math.exp(-raw[0])), rel=1e-12)]
    off = client.post("/classify", json={"input": texts[0], "use_activation": False}).json()
    assert off["data"][0]["probs"] == [raw[0]]


def test_score_route_formats_prompt_and_answers_like_crome_score(client, offline):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    answers = ["4", "four", "the answer is 5"]
    r = client.post("/score", json={"prompt": prompt, "answers": answers})
    assert r.status_code == 200, r.text
    assert r.json() == {"rewards": score_texts(offline, [prompt] * 3, answers), "truncated": 0}


def test_score_equals_offline_bit_for_bit_under_concurrent_requests(server, offline, helpers):
    records = helpers.varied_pairs(24, seed=21)  # several length buckets, chat prompts too
    chosen_rejected = score_texts(offline, [r.prompt for r in records] * 2,
                                  [r.chosen for r in records] + [r.rejected for r in records],
                                  ScoreOptions(batch_size=16))
    n = len(records)

    def one(i: int) -> list[float]:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            r = c.post("/score", json={"prompt": records[i].prompt,
                                       "answers": [records[i].chosen, records[i].rejected]})
            assert r.status_code == 200, r.text
            return r.json()["rewards"]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(n)))
    assert [g[0] for g in got] == chosen_rejected[:n]  # floats compared with ==
    assert [g[1] for g in got] == chosen_rejected[n:]


def test_a_chat_template_rm_scores_rendered_chats_and_messages(tiny_chat, tmp_path, helpers):
    rm_path = RewardModel.create(ModelOptions(backbone=tiny_chat, max_length=MAX_LENGTH,
                                              min_prompt_tokens=16)).save(tmp_path / "chat")
    offline, served = RewardModel.load(rm_path), RewardModel.load(rm_path)
    records = helpers.varied_pairs(6, seed=3, chat_every=2)
    prompts = [r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
               for r in records]
    tok = offline.tokenizer
    texts = [tok.apply_chat_template(p + [{"role": "assistant", "content": r.chosen}],
                                     tokenize=False) for p, r in zip(prompts, records)]
    with RewardServer(served, ServeOptions(port=0)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/get_reward", json={"query": texts})
        assert r.json()["rewards"] == score_raw_texts(offline, texts)
        for p, rec in zip(prompts, records):
            r = c.post("/score", json={"prompt": p, "answers": [rec.chosen, rec.rejected]})
            assert r.json()["rewards"] == score_texts(offline, [p, p], [rec.chosen, rec.rejected])
        # best-of-N: one prompt, N answers, read once (prefix sharing), as offline packs them
        answers = [rec.chosen for rec in records] + [rec.rejected for rec in records]
        r = c.post("/score", json={"prompt": prompts[0], "answers": answers})
        assert r.json()["rewards"] == score_texts(offline, [prompts[0]] * len(answers), answers)
        shared = [line for line in c.get("/metrics").text.splitlines()
                  if line.startswith("crome_rm_shared_prompt_tokens_total ")]
        assert int(shared[0].split()[1]) > 0


# -- limits, malformed input ------------------------------------------------------------

def test_limits(client, offline):
    before = metric(client.get("/metrics").text, "crome_rm_truncated_inputs_total")
    big = client.post("/get_reward", content=b'{"query": ["' + b"x" * 70_000 + b'"]}',
                      headers={"content-type": "application/json"})
    assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]
    many = client.post("/get_reward", json={"query": ["a"] * 51})
    assert many.status_code == 413 and many.json()["error"]["field"] == "query"
    long = client.post("/score", json={"prompt": "p", "answers": ["ok", "y" * 5001]})
    assert long.status_code == 413 and long.json()["error"]["field"] == "answers[1]"
    over = " ".join(["word"] * 200)
    strict = client.post("/get_reward", json={"query": ["short", over], "truncate": False})
    assert strict.status_code == 400
    assert strict.json()["error"]["field"] == "query[1]"
    assert "max_length of 64" in strict.json()["error"]["message"]
    strict = client.post("/score", json={"prompt": "p", "answers": [over], "truncate": False})
    assert strict.status_code == 400 and strict.json()["error"]["field"] == "answers[0]"
    cut = client.post("/get_reward", json={"query": ["short", over, over]})
    assert cut.status_code == 200 and cut.json()["truncated"] == 2
    assert cut.json()["rewards"] == score_raw_texts(offline, ["short", over, over])
    enc = encode_text(offline, over + " tail")  # the start is cut, the end and specials kept
    assert len(enc) == MAX_LENGTH and enc.prompt_truncated
    assert offline.tokenizer.decode(enc.input_ids[-3:]) == "word tail [SEP]"
    after = metric(client.get("/metrics").text, "crome_rm_truncated_inputs_total")
    assert after - before == 2


BAD = [  # (route, body, status, field)
    ("/get_reward", b"{not json", 400, None),
    ("/get_reward", b"", 400, None),
    ("/get_reward", b"[1, 2]", 400, None),
    ("/get_reward", {"query": "one string"}, 400, "query"),
    ("/get_reward", {"query": ["ok", 3]}, 400, "query[1]"),
    ("/get_reward", {"query": []}, 400, "query"),
    ("/get_reward", {"query": ["a"], "temperature": 0}, 400, "temperature"),
    ("/get_reward", {"query": ["a"], "truncate": "yes"}, 400, "truncate"),
    ("/classify", {"inputs": ["a"]}, 400, "input"),
    ("/classify", {"input": ["a"], "activation": False, "use_activation": True}, 400,
     "use_activation"),
    ("/score", {"answers": ["a"]}, 400, "prompt"),
    ("/score", {"prompt": "", "answers": ["a"]}, 400, "prompt"),
    ("/score", {"prompt": 5, "answers": ["a"]}, 400, "prompt"),
    ("/score", {"prompt": [{"role": "bot", "content": "x"}], "answers": ["a"]}, 400,
     "prompt[0].role"),
    ("/score", {"prompt": "p", "answers": "a"}, 400, "answers"),
]


def test_bad_requests_get_a_json_error_naming_the_field_and_the_server_goes_on(client, offline):
    for route, body, status, field in BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = client.post(route, **kw)
        assert r.status_code == status, (route, body, r.text)
        err = r.json()["error"]
        assert err["field"] == field, (route, body, err)
        assert err["message"]
    assert client.get("/nowhere").json()["error"]["message"] == "Not Found"
    assert client.get("/get_reward").status_code == 405
    r = client.post("/get_reward", json={"query": ["still serving"]})
    assert r.status_code == 200
    assert r.json()["rewards"] == score_raw_texts(offline, ["still serving"])


def test_metrics_count_requests_errors_batches_and_latency(client):
    client.post("/get_reward", json={"query": ["a", "b"]})
    client.post("/get_reward", json={"query": []})
    text = client.get("/metrics").text
    assert "# TYPE crome_rm_requests_total counter" in text
    assert metric(text, "crome_rm_requests_total", route="/get_reward", status="200") >= 1
    assert metric(text, "crome_rm_requests_total", route="/get_reward", status="400") >= 1
    assert metric(text, "crome_rm_errors_total", route="/get_reward", reason="invalid") >= 1
    assert metric(text, "crome_rm_batch_size_count") >= 1
    assert metric(text, "crome_rm_batch_size_bucket", le="+Inf") >= 1
    assert metric(text, "crome_rm_request_latency_seconds_count", route="/get_reward") >= 2
    assert "# TYPE crome_rm_queue_depth gauge" in text
    assert metric(text, "crome_rm_sequences_total") >= 2
    assert "crome_rm_truncated_inputs_total" in text


# -- batching, overload, timeout --------------------------------------------------------

def _post_all(url: str, bodies: list[dict], route: str = "/get_reward") -> list[httpx.Response]:
    """The bodies sent at once from as many threads (clients made before the start)."""
    start = threading.Barrier(len(bodies))

    def one(body: dict) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=30) as c:
            start.wait()
            return c.post(route, json=body)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(one, bodies))


def test_concurrent_requests_share_one_batch(served, offline):
    opts = ServeOptions(port=0, max_batch=4, max_wait_ms=3000)
    with RewardServer(served, opts) as srv:
        texts = ["one", "two words", "three small words", "four words in all"]
        t0 = time.monotonic()
        got = _post_all(srv.url, [{"query": [t]} for t in texts])
        assert time.monotonic() - t0 < 2.5  # a full batch does not wait out max_wait_ms
        assert [r.json()["rewards"][0] for r in got] == score_raw_texts(offline, texts)
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "crome_rm_batch_size_count") == 1  # 4 requests, 1 scorer call
        assert metric(text, "crome_rm_batch_size_sum") == 4


def test_a_full_queue_answers_503_with_retry_after(served, offline):
    # A batch waits up to 1.5 s for company; while it waits, one request fits in the queue.
    opts = ServeOptions(port=0, max_queue=1, max_wait_ms=1500, max_batch=1000)
    with RewardServer(served, opts) as srv:
        got = _post_all(srv.url, [{"query": [f"request {i}"]} for i in range(6)])
        codes = [r.status_code for r in got]
        assert set(codes) <= {200, 503} and 1 <= codes.count(200) <= 2, codes
        for i, r in enumerate(got):
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1"
                assert "queue full" in r.json()["error"]["message"]
            else:
                assert r.json()["rewards"] == score_raw_texts(offline, [f"request {i}"])
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "crome_rm_errors_total", route="/get_reward",
                      reason="queue_full") == codes.count(503)


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(served, offline):
    opts = ServeOptions(port=0, timeout_s=0.3, max_wait_ms=1500, max_batch=2)
    with RewardServer(served, opts) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/get_reward", json={"query": ["alone"]})  # waits 1.5 s for company
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        r = c.post("/get_reward", json={"query": ["a full", "batch"]})  # no wait
        assert r.status_code == 200
        assert r.json()["rewards"] == score_raw_texts(offline, ["a full", "batch"])


# -- auth and binding -------------------------------------------------------------------

def test_a_token_guards_every_route_but_health(served, monkeypatch, capfd):
    token = "s3cret-token-value"
    monkeypatch.setenv(TOKEN_ENV, token)
    opts = ServeOptions(port=0, token_env=TOKEN_ENV)
    with RewardServer(served, opts, log_level="info") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        body = {"query": ["hi"]}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
            r = c.post("/get_reward", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["field"] == "Authorization"
        assert c.get("/metrics").status_code == 401
        ok = {"Authorization": f"Bearer {token}"}
        assert c.post("/get_reward", json=body, headers=ok).status_code == 200
        assert c.post("/score", json={"prompt": "p", "answers": ["a"]},
                      headers=ok).status_code == 200
        assert "crome_rm_errors_total" in c.get("/metrics", headers=ok).text
    out, err = capfd.readouterr()
    assert token not in out + err


def test_binding_beyond_loopback_needs_a_token(served):
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.org"):
        with pytest.raises(ValueError, match="without a token"):
            check_bind(host, None)
        check_bind(host, "token")
    with pytest.MonkeyPatch.context() as mp:  # the server refuses before it binds anything
        mp.delenv("CROME_RM_TOKEN", raising=False)
        with pytest.raises(ValueError, match="CROME_RM_TOKEN"):
            RewardServer(served, ServeOptions(host="0.0.0.0", port=0))


def test_cli_refuses_a_public_host_without_a_token_in_one_line(rm_dir, helpers, tmp_path):
    env = helpers.cli_env()
    env.pop("CROME_RM_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "crome.cli", "serve-rm", "--model",
                           str(rm_dir), "--host", "0.0.0.0"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        ("crome: error: refusing to serve on 0.0.0.0 without a token: set CROME_RM_TOKEN "
         "(clients then send 'Authorization: Bearer <token>'), or keep --host 127.0.0.1")]


def test_cli_defaults_are_serve_options_defaults():
    import dataclasses

    import typer

    from crome.cli import app

    command = typer.main.get_command(app).commands["serve-rm"]  # type: ignore[attr-defined]
    defaults = {p.name: p.default for p in command.params if p.name != "model"}
    assert defaults == dataclasses.asdict(ServeOptions())


# -- the CLI, stopped while a request is in flight --------------------------------------

def test_cli_serves_and_finishes_the_request_in_flight_on_sigterm(rm_dir, offline, helpers,
                                                                  tmp_path):
    port = helpers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "crome.cli", "serve-rm", "--model", str(rm_dir), "--port",
         str(port), "--max-wait-ms", "1500", "--max-batch", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=helpers.cli_env(),
        cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()  # type: ignore[union-attr]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve-rm did not start"
            time.sleep(0.1)
        result: dict[str, httpx.Response] = {}

        def request() -> None:
            result["r"] = httpx.post(url + "/get_reward", json={"query": ["in flight"]},
                                     timeout=30)

        t = threading.Thread(target=request)
        t.start()
        time.sleep(0.5)  # the request now waits in its batch (max_wait_ms 1500)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200
        assert result["r"].json()["rewards"] == score_raw_texts(offline, ["in flight"])
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()  # type: ignore[union-attr]
    assert f"crome serve-rm: rm (max_length {MAX_LENGTH}) on http://127.0.0.1:{port}" in out
    assert "Finished server process" in out


def test_a_client_gone_mid_upload_is_counted_as_disconnected_not_a_server_error(server, client):
    """A real socket announces a body it never finishes sending, then closes."""
    import socket
    from urllib.parse import urlsplit

    before = client.get("/metrics").text
    url = urlsplit(server.url)
    for _ in range(3):
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
                         b'{"query": ["half')
    deadline = time.monotonic() + 10
    while True:
        text = client.get("/metrics").text
        gone = (metric(text, "crome_rm_errors_total", route="/get_reward",
                       reason="disconnected")
                - metric(before, "crome_rm_errors_total", route="/get_reward",
                         reason="disconnected"))
        if gone >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert gone == 3
    assert metric(text, "crome_rm_errors_total", route="/get_reward", reason="internal") == \
        metric(before, "crome_rm_errors_total", route="/get_reward", reason="internal")
    assert client.post("/get_reward", json={"query": ["still serving"]}).status_code == 200


def test_a_request_whose_client_left_is_not_scored(served):
    """The client sends a whole request and leaves while it waits in the batching window:
    its job is cancelled and never reaches the model."""
    import socket
    from urllib.parse import urlsplit

    opts = ServeOptions(**{**OPTS, "max_wait_ms": 1500, "max_batch": 1000})
    with RewardServer(served, opts, name="tiny-rm") as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        before = client.get("/metrics").text
        body = json.dumps({"query": ["left before the answer", "a second text"]}).encode()
        url = urlsplit(srv.url)
        with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
            sock.sendall(b"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            time.sleep(0.3)  # read, parsed and queued: then the client goes
        time.sleep(2.5)  # past the batching window
        text = client.get("/metrics").text
        assert metric(text, "crome_rm_sequences_total") == \
            metric(before, "crome_rm_sequences_total")
        assert metric(text, "crome_rm_errors_total", route="/get_reward",
                      reason="disconnected") == 1
        # a client that stays gets its rewards
        r = client.post("/get_reward", json={"query": ["stayed"]})
        assert r.status_code == 200
        assert metric(client.get("/metrics").text, "crome_rm_sequences_total") == \
            metric(before, "crome_rm_sequences_total") + 1


# -- a pairwise model: /compare (pair_dir, pair_offline: conftest.py) --------------------

PAIR_MAX_LENGTH = 96  # conftest.py's pair_dir


@pytest.fixture(scope="module")
def pair_served(pair_dir):
    return RewardModel.load(pair_dir)


@pytest.fixture(scope="module")
def pair_server(pair_served):
    with RewardServer(pair_served, ServeOptions(**OPTS), name="tiny-pm") as srv:
        yield srv


@pytest.fixture()
def pair_client(pair_server):
    with httpx.Client(base_url=pair_server.url, timeout=30) as c:
        yield c


def verdicts(prefs) -> list[dict]:
    return [{"a": p.first, "b": p.second, "tie": p.tie, "consistent": p.consistent}
            for p in prefs]


def test_compare_answers_both_orders_averaged_and_health_says_pairwise(pair_client,
                                                                       pair_offline):
    assert pair_client.get("/health").json() == {
        "status": "ok", "model": "tiny-pm", "max_length": PAIR_MAX_LENGTH, "pairwise": True}
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    r = pair_client.post("/compare", json={"prompt": prompt, "a": "4", "b": "the answer is 5"})
    assert r.status_code == 200, r.text
    (want,) = verdicts(compare_texts(pair_offline, [prompt], ["4"], ["the answer is 5"]))
    assert r.json() == {**want, "truncated": 0}  # floats compared with ==
    assert sum(r.json()[k] for k in ("a", "b", "tie")) == pytest.approx(1, abs=1e-12)
    # swapping a and b swaps the two probabilities (both orders are always run)
    swapped = pair_client.post("/compare", json={"prompt": prompt, "a": "the answer is 5",
                                                 "b": "4"}).json()
    assert (swapped["a"], swapped["b"]) == pytest.approx((want["b"], want["a"]), abs=1e-12)
    # the batch form: several pairs under one prompt, in order
    pairs = [("4", "the answer is 5"), ("four", "4"), ("", "blue cat")]
    r = pair_client.post("/compare", json={"prompt": prompt,
                                           "pairs": [{"a": a, "b": b} for a, b in pairs]})
    assert r.status_code == 200, r.text
    assert r.json() == {"comparisons": verdicts(compare_texts(
        pair_offline, [prompt] * 3, [a for a, _ in pairs], [b for _, b in pairs])),
        "truncated": 0}


def test_compare_equals_compare_texts_bit_for_bit_under_concurrent_requests(
        pair_server, pair_offline, helpers):
    records = helpers.varied_pairs(24, seed=21)  # several length buckets, chat prompts too
    want = verdicts(compare_texts(pair_offline, [r.prompt for r in records],
                                  [r.chosen for r in records], [r.rejected for r in records],
                                  ScoreOptions(batch_size=16)))
    assert len({v["a"] for v in want}) == 24  # a mix-up between requests would show
    assert {v["consistent"] for v in want} == {True, False}

    def one(i: int) -> dict:
        rec = records[i]
        with httpx.Client(base_url=pair_server.url, timeout=30) as c:
            if i % 2:  # the single form and the batch form, interleaved
                r = c.post("/compare", json={"prompt": rec.prompt, "a": rec.chosen,
                                             "b": rec.rejected})
                assert r.status_code == 200, r.text
                return {k: v for k, v in r.json().items() if k != "truncated"}
            r = c.post("/compare", json={"prompt": rec.prompt, "pairs": [
                {"a": rec.chosen, "b": rec.rejected}]})
            assert r.status_code == 200, r.text
            return r.json()["comparisons"][0]

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(len(records))))
    assert got == want


def test_compare_requests_share_the_score_batcher(pair_served, pair_offline):
    """Four /compare requests (two sequences each, one per order) arrive together and are
    scored in one scorer call, as /score requests would be."""
    opts = ServeOptions(port=0, max_batch=8, max_wait_ms=3000)
    pairs = [("one", "two words"), ("three small words", "one"), ("four words in all", "x"),
             ("y", "z z")]
    with RewardServer(pair_served, opts) as srv:
        t0 = time.monotonic()
        got = _post_all(srv.url, [{"prompt": "which?", "a": a, "b": b} for a, b in pairs],
                        route="/compare")
        assert time.monotonic() - t0 < 2.5  # a full batch does not wait out max_wait_ms
        assert [{k: v for k, v in r.json().items() if k != "truncated"} for r in got] == \
            verdicts(compare_texts(pair_offline, ["which?"] * 4, [a for a, _ in pairs],
                                   [b for _, b in pairs]))
        text = httpx.get(srv.url + "/metrics").text
        assert metric(text, "crome_rm_batch_size_count") == 1  # 4 requests, 1 scorer call
        assert metric(text, "crome_rm_batch_size_sum") == 8
        assert metric(text, "crome_rm_sequences_total") == 8
        assert metric(text, "crome_rm_comparisons_total") == 4
        assert metric(text, "crome_rm_requests_total", route="/compare", status="200") == 4
        assert metric(text, "crome_rm_request_latency_seconds_count", route="/compare") == 4


def test_a_compare_request_past_its_timeout_gets_504(pair_served):
    opts = ServeOptions(port=0, timeout_s=0.3, max_wait_ms=1500, max_batch=100)
    with RewardServer(pair_served, opts) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/compare", json={"prompt": "p", "a": "alone", "b": "waits"})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"


def test_each_kind_of_model_refuses_the_other_kinds_routes(client, pair_client):
    """A PairPM gives no reward to one answer; a BT RM gives no tie: 400 wrong_model, even
    before the body is read (an empty body gets the same answer)."""
    before = pair_client.get("/metrics").text
    for route, body in (("/score", {"prompt": "p", "answers": ["a"]}),
                        ("/get_reward", {"query": ["User: p\n\nAssistant: a"]}),
                        ("/classify", {"input": "text"}), ("/score", None)):
        r = pair_client.post(route, json=body)
        assert r.status_code == 400, (route, r.text)
        err = r.json()["error"]
        assert err["type"] == "wrong_model" and err["field"] is None
        assert "pairwise preference model" in err["message"] and "/compare" in err["message"]
    text = pair_client.get("/metrics").text
    assert metric(text, "crome_rm_errors_total", route="/score", reason="wrong_model") - \
        metric(before, "crome_rm_errors_total", route="/score", reason="wrong_model") == 2
    assert metric(text, "crome_rm_sequences_total") == metric(before, "crome_rm_sequences_total")
    for body in ({"prompt": "p", "a": "x", "b": "y"}, None):
        r = client.post("/compare", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "wrong_model" and "Bradley-Terry" in err["message"]
        assert "/score" in err["message"]
    assert metric(client.get("/metrics").text, "crome_rm_errors_total", route="/compare",
                  reason="wrong_model") >= 2


def test_compare_limits(pair_client, pair_offline):
    """OPTS: 64 KiB bodies, 50 answers (25 pairs), 5000 characters a text."""
    big = pair_client.post("/compare", content=b'{"prompt": "p", "a": "' + b"x" * 70_000
                           + b'", "b": "y"}', headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "body_too_large"
    assert "bytes" in big.json()["error"]["message"]
    many = pair_client.post("/compare", json={"prompt": "p",
                                              "pairs": [{"a": "x", "b": "y"}] * 26})
    assert many.status_code == 413
    assert many.json()["error"] == {
        "message": "26 pairs (52 answers) exceed the limit of 50 answers per request",
        "field": "pairs", "type": "too_many_items"}
    assert pair_client.post("/compare", json={"prompt": "p", "pairs": [
        {"a": "x", "b": "y"}] * 25}).status_code == 200  # 50 answers: at the limit
    for body, field in (({"prompt": "p", "a": "y" * 5001, "b": "ok"}, "a"),
                        ({"prompt": "p", "a": "ok", "b": "y" * 5001}, "b"),
                        ({"prompt": "p", "pairs": [{"a": "x", "b": "y"},
                                                   {"a": "x", "b": "y" * 5001}]}, "pairs[1].b"),
                        ({"prompt": "p" * 5001, "a": "x", "b": "y"}, "prompt")):
        r = pair_client.post("/compare", json=body)
        assert r.status_code == 413 and r.json()["error"]["type"] == "too_long", r.text
        assert r.json()["error"]["field"] == field
    # past the model's max_length: cut (both orders alike, as offline), or refused on demand
    before = metric(pair_client.get("/metrics").text, "crome_rm_truncated_inputs_total")
    over = " ".join(["word"] * 200)
    strict = pair_client.post("/compare", json={"prompt": "p", "pairs": [
        {"a": "x", "b": "y"}, {"a": over, "b": "y"}], "truncate": False})
    assert strict.status_code == 400 and strict.json()["error"]["field"] == "pairs[1]"
    assert f"max_length of {PAIR_MAX_LENGTH}" in strict.json()["error"]["message"]
    strict = pair_client.post("/compare", json={"prompt": "p", "a": "x", "b": over,
                                                "truncate": False})
    assert strict.status_code == 400
    assert strict.json()["error"]["type"] == "too_many_tokens"
    assert strict.json()["error"]["field"] is None  # one pair: the request as a whole
    cut = pair_client.post("/compare", json={"prompt": "p", "pairs": [
        {"a": "x", "b": "y"}, {"a": over, "b": "y"}, {"a": "x", "b": over}]})
    assert cut.status_code == 200 and cut.json()["truncated"] == 2
    assert cut.json()["comparisons"] == verdicts(compare_texts(
        pair_offline, ["p"] * 3, ["x", over, "x"], ["y", "y", over]))
    after = metric(pair_client.get("/metrics").text, "crome_rm_truncated_inputs_total")
    assert after - before == 4  # sequences: two cut comparisons, each in both orders


COMPARE_BAD = [  # (body, field)
    (b"{not json", None),
    (b"[1, 2]", None),
    ({"a": "x", "b": "y"}, "prompt"),
    ({"prompt": "", "a": "x", "b": "y"}, "prompt"),
    ({"prompt": 5, "a": "x", "b": "y"}, "prompt"),
    ({"prompt": [{"role": "bot", "content": "x"}], "a": "x", "b": "y"}, "prompt[0].role"),
    ({"prompt": "p", "a": "x"}, "b"),
    ({"prompt": "p"}, "a"),
    ({"prompt": "p", "a": 3, "b": "y"}, "a"),
    ({"prompt": "p", "a": "x", "b": "y", "answers": ["z"]}, "answers"),
    ({"prompt": "p", "a": "x", "pairs": [{"a": "x", "b": "y"}]}, "a"),
    ({"prompt": "p", "pairs": []}, "pairs"),
    ({"prompt": "p", "pairs": [["x", "y"]]}, "pairs[0]"),
    ({"prompt": "p", "pairs": [{"a": "x", "b": "y"}, {"a": "x"}]}, "pairs[1].b"),
    ({"prompt": "p", "pairs": [{"a": "x", "b": "y", "tie": True}]}, "pairs[0].tie"),
    ({"prompt": "p", "a": "x", "b": "y", "truncate": "no"}, "truncate"),
]


def test_bad_compare_requests_get_a_json_error_naming_the_field(pair_client, pair_offline):
    for body, field in COMPARE_BAD:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        r = pair_client.post("/compare", **kw)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["field"] == field, (body, err)
        assert err["message"]
    assert pair_client.get("/compare").status_code == 405
    r = pair_client.post("/compare", json={"prompt": "p", "a": "still", "b": "serving"})
    assert r.status_code == 200
    assert {k: v for k, v in r.json().items() if k != "truncated"} == \
        verdicts(compare_texts(pair_offline, ["p"], ["still"], ["serving"]))[0]


def test_a_token_guards_compare(pair_served, monkeypatch):
    token = "pm-s3cret-token-value"
    monkeypatch.setenv(TOKEN_ENV, token)
    opts = ServeOptions(port=0, token_env=TOKEN_ENV)
    with RewardServer(pair_served, opts) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health").json()["pairwise"] is True  # no token needed
        body = {"prompt": "p", "a": "x", "b": "y"}
        r = c.post("/compare", json=body)
        assert r.status_code == 401 and r.json()["error"]["field"] == "Authorization"
        ok = {"Authorization": f"Bearer {token}"}
        assert c.post("/compare", json=body, headers=ok).status_code == 200
        # the token is checked first: no hint of the model's kind without it
        assert c.post("/score", json={"prompt": "p", "answers": ["a"]}).status_code == 401
