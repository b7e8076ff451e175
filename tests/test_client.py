"""``crome.client``: RewardClient and the TRL reward function against the real server
(uvicorn on 127.0.0.1, a free port, the tiny BERT RM of ``test_serve_rm.py``), and against
``httpx.MockTransport`` for the one fault a real server cannot show on cue (a 503 with a
given ``Retry-After``, then success). ``compare`` runs against a second server that holds a
tiny pairwise preference model.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from crome.client import (
    ClientOptions,
    RewardClient,
    RewardServerError,
    group_runs,
    reward_fn,
)
from crome.evaluate.reference import Preference
from crome.pairwise import compare_texts
from crome.score import score_texts
from crome.serve_rm import RewardServer, ServeOptions, score_raw_texts

MAX_LENGTH = 64  # the rm_dir fixture's (conftest.py)
TOKEN_ENV = "CROME_TEST_CLIENT_TOKEN"


@pytest.fixture(scope="module")
def server(served):
    opts = ServeOptions(port=0, max_wait_ms=20, max_items=50, max_chars=5000)
    with RewardServer(served, opts, name="tiny-rm") as srv:
        yield srv


def score_requests(url: str) -> float:
    """``/score`` requests answered 200 so far, from the server's /metrics."""
    text = httpx.get(url + "/metrics").text
    line = 'crome_rm_requests_total{route="/score",status="200"} '
    return next((float(x[len(line):]) for x in text.splitlines() if x.startswith(line)), 0.0)


# -- the routes -------------------------------------------------------------------------

def test_score_equals_the_route_and_offline_scoring(server, offline, helpers):
    records = helpers.varied_pairs(4, seed=7, chat_every=2)
    with RewardClient(server.url) as client, httpx.Client(base_url=server.url) as raw:
        assert client.health() == {"status": "ok", "model": "tiny-rm",
                                   "max_length": MAX_LENGTH, "pairwise": False}
        for r in records:
            answers = [r.chosen, r.rejected, "a third answer"]
            got = client.score(r.prompt, answers)
            route = raw.post("/score", json={"prompt": r.prompt, "answers": answers})
            assert got == route.json()["rewards"]  # floats compared with ==
            assert got == score_texts(offline, [r.prompt] * 3, answers)
        texts = ["User: hi\n\nAssistant: hello", "User: 2+2?\n\nAssistant: 4"]
        assert client.get_reward(texts) == score_raw_texts(offline, texts)


def test_reward_fn_groups_runs_of_a_prompt_and_keeps_the_order(server, offline, helpers):
    p1, p2, p3 = (r.prompt for r in helpers.varied_pairs(3, seed=11, chat_every=0))
    prompts = [p1, p1, p1, p2, p2, p1, p3, p3]  # p1 comes back: a run of its own
    completions = [f"{helpers.sentence(random.Random(i), 3 + i)} {i}"
                   for i in range(len(prompts))]
    expected = score_texts(offline, prompts, completions)
    assert group_runs(prompts, 512) == [range(3), range(3, 5), range(5, 6), range(6, 8)]

    fn = reward_fn(server.url)
    assert fn.__name__ == "crome_reward"  # TRL logs a reward function by its __name__
    before = score_requests(server.url)
    assert fn(prompts=prompts, completions=completions, completion_ids=[[1]] * 8,
              answer=["x"] * 8) == expected
    assert score_requests(server.url) - before == 4  # one /score request per run

    # TRL's conversational format: message-list prompts, one-message completions
    chat = [[{"role": "user", "content": p}] for p in prompts]
    conv = [[{"role": "assistant", "content": c}] for c in completions]
    assert fn(prompts=chat, completions=conv) == score_texts(offline, chat, completions)

    # a run longer than max_answers is split, in order; one request at a time
    small = reward_fn(server.url, max_answers=2, concurrency=1)
    before = score_requests(server.url)
    assert small(prompts, completions) == expected
    assert score_requests(server.url) - before == 5  # runs of 3, 2, 1, 2: 3 is cut 2 + 1
    fn.client.close()  # type: ignore[attr-defined]
    small.client.close()  # type: ignore[attr-defined]


def test_reward_fn_refuses_what_it_cannot_score(server):
    fn = reward_fn(server.url)
    with pytest.raises(ValueError, match=r"completions\[1\]: expected a string or a list of "
                                         r"one message"):
        fn(["p", "p"], ["ok", [{"role": "assistant"}]])
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        fn(["p", "p"], ["ok"])
    with pytest.raises(TypeError, match="unknown option.*timeout; known:"):
        reward_fn(server.url, timeout=3)


# -- errors -----------------------------------------------------------------------------

def test_a_4xx_raises_at_once_naming_the_field(server):
    calls = []
    with RewardClient(server.url) as client:
        client._http.event_hooks["request"].append(calls.append)
        with pytest.raises(RewardServerError) as info:
            client.score("", ["an answer"])
        assert (info.value.status, info.value.field) == (400, "prompt")
        assert "HTTP 400" in str(info.value) and "(field prompt)" in str(info.value)
        assert len(calls) == 1  # not retried
        with pytest.raises(RewardServerError) as info:
            client.score([{"role": "bot", "content": "x"}], ["a"])
        assert info.value.field == "prompt[0].role"
        with pytest.raises(RewardServerError) as info:
            client.score("p", ["a"] * 51)
        assert (info.value.status, info.value.field, info.value.type) == (
            413, "answers", "too_many_items")
        assert "51 items exceed the limit of 50" in info.value.message


def _mock(responses: list[httpx.Response], seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return responses.pop(0)
    return httpx.MockTransport(handler)


def _busy(retry_after: str | None = "1", status: int = 503) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return httpx.Response(status, headers=headers, json={"error": {
        "message": "queue full (1 requests waiting); retry later", "field": None,
        "type": "queue_full"}})


def test_a_503_with_retry_after_is_retried_then_succeeds(caplog):
    seen: list[httpx.Request] = []
    ok = httpx.Response(200, json={"rewards": [0.5, -1.25], "truncated": 0})
    opts = ClientOptions(retries=3, backoff_s=0.01)
    with RewardClient("http://rm.test", opts, transport=_mock([_busy("1"), ok], seen)) as c, \
            caplog.at_level(logging.WARNING, logger="crome.client"):
        t0 = time.monotonic()
        assert c.score("p", ["a", "b"]) == [0.5, -1.25]
        waited = time.monotonic() - t0
    assert len(seen) == 2 and 0.9 <= waited < 3  # Retry-After: 1 honoured, not backoff_s
    assert json.loads(seen[1].content) == {"prompt": "p", "answers": ["a", "b"],
                                           "truncate": True}
    assert "HTTP 503 (queue full" in caplog.text and "retry 1 of 3 in 1.00 s" in caplog.text


def test_retry_after_is_capped_and_retries_run_out():
    seen: list[httpx.Request] = []
    opts = ClientOptions(retries=2, backoff_s=0.01, max_backoff_s=0.1)
    with RewardClient("http://rm.test", opts,
                      transport=_mock([_busy("100"), _busy(None, 504), _busy("100")],
                                      seen)) as c:
        t0 = time.monotonic()
        with pytest.raises(RewardServerError) as info:
            c.get_reward(["text"])
        assert time.monotonic() - t0 < 2  # 100 s capped at 0.1 s
    assert len(seen) == 3 and info.value.status == 503 and info.value.attempts == 3
    assert "after 3 attempts" in str(info.value)
    # a 500 is not retried
    seen = []
    with RewardClient("http://rm.test", opts,
                      transport=_mock([httpx.Response(500, text="boom")], seen)) as c, \
            pytest.raises(RewardServerError, match="HTTP 500: boom"):
        c.health()
    assert len(seen) == 1


def test_connection_errors_are_retried_then_reported(helpers):
    url = f"http://127.0.0.1:{helpers.free_port()}"  # nothing listens there
    with RewardClient(url, ClientOptions(retries=2, backoff_s=0.01)) as c, \
            pytest.raises(RewardServerError) as info:
        c.health()
    assert info.value.status is None and info.value.attempts == 3
    assert f"{url}/health: unreachable after 3 attempts: ConnectError" in str(info.value)


def test_a_real_full_queue_is_ridden_out_by_retries(served, offline):
    # max_queue=1: of 6 requests sent at once, at most 2 find room; the rest get 503 and
    # retry (Retry-After 1 s capped at 0.2 s) until each has its rewards.
    opts = ServeOptions(port=0, max_queue=1, max_wait_ms=300, max_batch=1000)
    with RewardServer(served, opts) as srv, \
            RewardClient(srv.url, ClientOptions(retries=20, max_backoff_s=0.2)) as client:
        start = threading.Barrier(6)

        def one(i: int) -> list[float]:
            start.wait()
            return client.get_reward([f"request {i}"])

        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(one, range(6)))
        assert got == [score_raw_texts(offline, [f"request {i}"]) for i in range(6)]
        text = httpx.get(srv.url + "/metrics").text
        assert 'crome_rm_errors_total{route="/get_reward",reason="queue_full"}' in text


# -- auth -------------------------------------------------------------------------------

def test_the_token_is_sent_as_a_bearer_and_never_shown(served, offline, monkeypatch, caplog):
    token = "client-s3cret-value"
    monkeypatch.setenv(TOKEN_ENV, token)
    opts = ServeOptions(port=0, token_env=TOKEN_ENV)
    with RewardServer(served, opts) as srv, caplog.at_level(logging.DEBUG):
        with RewardClient(srv.url, ClientOptions(token_env=TOKEN_ENV)) as client:
            seen: list[httpx.Request] = []
            client._http.event_hooks["request"].append(seen.append)
            assert client.score("p", ["a"]) == score_texts(offline, ["p"], ["a"])
            assert seen[0].headers["authorization"] == f"Bearer {token}"
        monkeypatch.delenv(TOKEN_ENV)
        with RewardClient(srv.url, ClientOptions(token_env=TOKEN_ENV, retries=0)) as client, \
                pytest.raises(RewardServerError) as info:
            client.score("p", ["a"])
    assert (info.value.status, info.value.field) == (401, "Authorization")
    assert token not in str(info.value) and token not in caplog.text


def test_the_default_token_variable_is_the_servers():
    assert ClientOptions().token_env == ServeOptions().token_env


def test_trl_grpo_trains_a_step_on_the_servers_rewards(server, offline, tiny_chat, tmp_path):
    """TRL's GRPOTrainer with ``reward_funcs=[reward_fn(url)]``: a tiny random Llama policy
    generates 4 completions for each of 2 conversational prompts; every reward it trains on
    is the offline reward of that completion, and each prompt's group is one request."""
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    fn = reward_fn(server.url)
    calls: list[tuple[list, list, list[float]]] = []

    def crome_rm(prompts, completions, **kwargs):
        rewards = fn(prompts, completions, **kwargs)
        calls.append((list(prompts), list(completions), rewards))
        return rewards

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"tell me of {w}"}]}
                              for w in ("rivers", "bread")])
    args = GRPOConfig(output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=8,
                      num_generations=4, max_completion_length=6, max_steps=1, report_to=[],
                      use_cpu=True, bf16=False, save_strategy="no", logging_steps=1)
    before = score_requests(server.url)
    policy = LlamaForCausalLM.from_pretrained(tiny_chat)  # the tiny Llama with an LM head
    trainer = GRPOTrainer(model=policy, reward_funcs=[crome_rm], args=args,
                          train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(tiny_chat))
    trainer.train()
    ((prompts, completions, rewards),) = calls
    assert len(completions) == 8 and len({str(p) for p in prompts}) == 2
    assert isinstance(completions[0], list) and completions[0][0]["role"] == "assistant"
    answers = [c[0]["content"] for c in completions]
    assert rewards == score_texts(offline, prompts, answers)
    assert score_requests(server.url) - before == 2  # one /score request per prompt's group
    assert trainer.state.global_step == 1


# -- a pairwise model: compare (pair_dir, pair_offline: conftest.py) ---------------------

PAIR_MAX_LENGTH = 96  # conftest.py's pair_dir


@pytest.fixture(scope="module")
def pair_server(pair_dir):
    from crome.model import RewardModel

    opts = ServeOptions(port=0, max_wait_ms=20, max_items=50, max_chars=5000)
    with RewardServer(RewardModel.load(pair_dir), opts, name="tiny-pm") as srv:
        yield srv


def test_compare_equals_the_route_and_offline_compare_texts(pair_server, pair_offline, helpers):
    records = helpers.varied_pairs(4, seed=7, chat_every=2)
    with RewardClient(pair_server.url) as client, \
            httpx.Client(base_url=pair_server.url) as raw:
        assert client.health() == {"status": "ok", "model": "tiny-pm",
                                   "max_length": PAIR_MAX_LENGTH, "pairwise": True}
        for r in records:
            got = client.compare(r.prompt, r.chosen, r.rejected)
            assert isinstance(got, Preference)
            route = raw.post("/compare", json={"prompt": r.prompt, "a": r.chosen,
                                               "b": r.rejected}).json()
            assert (got.first, got.second, got.tie, got.consistent) == (
                route["a"], route["b"], route["tie"], route["consistent"])
            assert [got] == compare_texts(pair_offline, [r.prompt], [r.chosen], [r.rejected])
        prompt = records[0].prompt
        pairs = [(r.chosen, r.rejected) for r in records] + [("x", "y")]
        assert client.compare_many(prompt, pairs) == compare_texts(
            pair_offline, [prompt] * len(pairs), [a for a, _ in pairs], [b for _, b in pairs])


def test_compare_errors_raise_at_once(pair_server, server):
    calls: list[httpx.Request] = []
    with RewardClient(pair_server.url) as pm, RewardClient(server.url) as bt:
        pm._http.event_hooks["request"].append(calls.append)
        # a PairPM gives no reward to one answer, a BT RM no verdict on two
        for call in (lambda: pm.score("p", ["a"]), lambda: pm.get_reward(["text"]),
                     lambda: bt.compare("p", "a", "b"),
                     lambda: bt.compare_many("p", [("a", "b")])):
            with pytest.raises(RewardServerError) as info:
                call()
            assert (info.value.status, info.value.type) == (400, "wrong_model")
            assert "HTTP 400" in str(info.value)
        assert len(calls) == 2  # not retried
        with pytest.raises(RewardServerError) as info:
            pm.compare("", "a", "b")
        assert (info.value.status, info.value.field) == (400, "prompt")
        with pytest.raises(RewardServerError) as info:
            pm.compare_many("p", [("a", "b")] * 26)
        assert (info.value.status, info.value.field, info.value.type) == (
            413, "pairs", "too_many_items")
        assert "26 pairs (52 answers) exceed the limit of 50" in info.value.message
        with pytest.raises(RewardServerError) as info:
            pm.compare_many("p", [("a", "b"), ("a", "b" * 5001)])
        assert (info.value.status, info.value.field) == (413, "pairs[1].b")
    over = " ".join(["word"] * 200)
    with RewardClient(pair_server.url, ClientOptions(truncate=False)) as strict:
        with pytest.raises(RewardServerError) as info:
            strict.compare_many("p", [("a", "b"), (over, "b")])
        assert (info.value.status, info.value.field, info.value.type) == (
            400, "pairs[1]", "too_many_tokens")
        assert strict.compare("p", "a", "b").tie >= 0  # short enough: answered


def test_compare_many_checks_the_servers_answer():
    seen: list[httpx.Request] = []
    one = {"a": 0.5, "b": 0.25, "tie": 0.25, "consistent": True}
    responses = [httpx.Response(200, json={"comparisons": [one], "truncated": 0}),
                 httpx.Response(200, json={"comparisons": [{"a": 0.5}], "truncated": 0}),
                 httpx.Response(200, json={**one, "truncated": 0})]
    with RewardClient("http://rm.test", transport=_mock(responses, seen)) as c:
        with pytest.raises(RewardServerError, match="1 verdicts for 2 pairs"):
            c.compare_many("p", [("a", "b"), ("c", "d")])
        with pytest.raises(RewardServerError, match="not a verdict"):
            c.compare_many("p", [("a", "b")])
        assert c.compare("p", "a", "b") == Preference(0.5, 0.25, 0.25, True)
    assert json.loads(seen[0].content) == {"prompt": "p", "pairs": [
        {"a": "a", "b": "b"}, {"a": "c", "b": "d"}], "truncate": True}
    assert json.loads(seen[2].content) == {"prompt": "p", "a": "a", "b": "b",
                                           "truncate": True}
