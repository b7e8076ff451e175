"""crome.oracle.server: the two server engines and the ``llamaserver`` oracle.

The integration tests run llama.cpp's own ``llama-server``, built by ``crome build-llama
--server`` (README command 2 builds it), on the packaged Qwen2.5-Coder-1.5B-Instruct GGUF.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from crome.oracle import OracleOptions, OracleRequest, Sampling, make_oracle, oracle_name
from crome.oracle.build import BuildOptions, server_binary
from crome.oracle.server import LlamaServer


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="unknown engine"):
        LlamaServer("m.gguf", engine="vllm")
    with pytest.raises(ValueError, match="one request at a time"):
        LlamaServer("m.gguf", parallel=4)
    with pytest.raises(ValueError, match="spec 'ngram-simple'"):
        LlamaServer("m.gguf", spec="ngram-simple")  # the python engine has no n-gram drafts
    with pytest.raises(ValueError, match="spec 'medusa'"):
        LlamaServer("m.gguf", engine="llama-server", spec="medusa")
    with pytest.raises(ValueError, match="parallel must be at least 1"):
        LlamaServer("m.gguf", engine="llama-server", parallel=0)


def test_no_server_binary_in_an_empty_cache(tmp_path):
    assert server_binary(BuildOptions(cache_dir=str(tmp_path))) is None


def test_llama_server_command_line(tmp_path, monkeypatch):
    built = server_binary()
    if built is None:
        pytest.fail("llama-server is not built: crome build-llama --server", pytrace=False)
    s = LlamaServer("m.gguf", engine="llama-server", parallel=4, spec="ngram-simple",
                    n_ctx=2048, n_threads=2, port=12345)
    assert s.cmd[0] == str(built)
    joined = " ".join(s.cmd)
    assert "--parallel 4" in joined and "--cont-batching" in joined
    assert "--ctx-size 8192" in joined  # 2,048 tokens for each of the 4 slots
    assert "--spec-type ngram-simple" in joined and "--host 127.0.0.1" in joined


@pytest.fixture(scope="module")
def served():
    """The ``llamaserver`` oracle: 3 slots, n-gram drafts, no cache."""
    if server_binary() is None:
        pytest.fail("llama-server is not built: crome build-llama --server", pytrace=False)
    oracle = make_oracle(OracleOptions(spec="llamaserver", cache="off", concurrency=3,
                                       threads=2, n_ctx=2048))
    try:
        yield oracle
    finally:
        oracle.close()


def _rewrite(text: str) -> OracleRequest:
    return OracleRequest.make(
        [{"role": "user", "content": "Repeat this sentence exactly, changing only the city "
                                     f"to Paris:\n{text}"}],
        Sampling(max_tokens=40))


def test_llamaserver_oracle_answers_batches_in_order(served):
    assert oracle_name(served).startswith("llamaserver:qwen2.5-coder-1.5b")
    cities = ["Rome", "Oslo", "Lima", "Kyiv", "Cairo"]
    texts = [f"We flew to {c} on Monday and stayed for three nights." for c in cities]
    seen: list[int] = []
    out = served.generate([_rewrite(t) for t in texts], on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(5))
    assert all(r.ok for r in out), [r.error for r in out]
    for city, r in zip(cities, out):
        assert "Paris" in r.text and city not in r.text, (city, r.text)
    # the server really has 3 slots (its monitoring endpoint lists them)
    base = served.server.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/slots", timeout=10) as resp:
        assert len(json.loads(resp.read())) == 3


def test_llamaserver_oracle_reports_a_prompt_past_its_context_as_an_error(served):
    long = OracleRequest.make([{"role": "user", "content": "word " * 3000}],
                              Sampling(max_tokens=4))
    short = _rewrite("We drove to Bern.")
    out = served.generate([long, short])
    assert not out[0].ok and out[0].error
    assert out[1].ok and "Paris" in out[1].text


def test_the_server_stops_on_close():
    if server_binary() is None:
        pytest.fail("llama-server is not built: crome build-llama --server", pytrace=False)
    oracle = make_oracle(OracleOptions(spec="llamaserver", cache="off", concurrency=1,
                                       threads=2, n_ctx=1024))
    proc = oracle.server.proc
    assert proc is not None and proc.poll() is None
    oracle.close()
    assert proc.poll() is not None
