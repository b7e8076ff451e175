"""The ``hf`` oracle backend: batched generation and choice scoring in transformers.

A tiny random causal LM checks the batching itself (a request's greedy text does not depend
on what shares its batch or how long the others' prompts are; results come back in order;
stop strings cut as in the other backends; one bad request fails alone). The packaged
Qwen2.5-Coder-0.5B, a real decoder, checks the same on real text, and that the choice
scores read what the model would write.
"""

from __future__ import annotations

import json

import pytest
import torch

from crome.oracle import OracleOptions, make_backend
from crome.oracle.base import OracleRequest, Sampling, choice_logprobs
from crome.oracle.hf import HFOptions, HFOracle, resolve_dtype

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> str:
    """A 2-layer Llama causal LM (width 32, tied head) with the MiniLM tokenizer and a chat
    template whose end of turn is ``[SEP]``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from crome.backbones import default_backbone

    path = tmp_path_factory.mktemp("tiny-lm")
    tok = AutoTokenizer.from_pretrained(default_backbone())
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(7)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def ask(text: str, max_tokens: int = 12, **kw) -> OracleRequest:
    return OracleRequest.make([{"role": "user", "content": text}],
                              Sampling(max_tokens=max_tokens, **kw))


TEXTS = ["the cat runs", "a small blue house by the river with a tree", "dog",
         "music city window paper light water happy green"]


def test_a_greedy_text_does_not_depend_on_its_batch(tiny_lm):
    oracle = HFOracle(HFOptions(model=tiny_lm, batch_size=4, dtype="fp32"))
    batched = oracle.generate([ask(t) for t in TEXTS])
    alone = [oracle.generate([ask(t)])[0] for t in TEXTS]
    assert all(r.ok for r in batched)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert all(0 < r.usage["completion_tokens"] <= 12 for r in batched)
    # batches of two, sorted by length: the same texts
    oracle.options.batch_size = 2
    assert [r.text for r in oracle.generate([ask(t) for t in TEXTS])] == \
        [r.text for r in alone]


def test_results_arrive_in_order_and_each_is_reported(tiny_lm):
    oracle = HFOracle(HFOptions(model=tiny_lm, batch_size=2, dtype="fp32"))
    seen: dict[int, str] = {}
    reqs = [ask(t, max_tokens=4) for t in TEXTS] + [ask("word " * 400, max_tokens=4)]
    oracle.options.max_prompt_tokens = 300
    out = oracle.generate(reqs, on_result=lambda i, r: seen.__setitem__(i, r.text))
    assert sorted(seen) == list(range(len(reqs)))
    assert [seen[i] for i in range(len(reqs))] == [r.text for r in out]
    # the over-long prompt fails alone
    assert not out[-1].ok and "exceeds 300" in out[-1].error
    assert all(r.ok for r in out[:-1])


def test_stop_strings_cut_the_text(tiny_lm):
    oracle = HFOracle(HFOptions(model=tiny_lm, batch_size=4, dtype="fp32"))
    [full] = oracle.generate([ask("the cat runs", max_tokens=12)])
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = words[2]
    [cut] = oracle.generate([ask("the cat runs", max_tokens=12, stop=(stop,))])
    assert stop not in cut.text and full.text.startswith(cut.text)


def test_choices_are_the_log_softmax_at_the_last_position(tiny_lm):
    oracle = HFOracle(HFOptions(model=tiny_lm, batch_size=4, dtype="fp32"))
    reqs = [ask(t, max_tokens=1, choices=("A", "B")) for t in TEXTS]
    out = oracle.generate(reqs)
    for req, resp in zip(reqs, out):
        ids = oracle._prompt_ids(req)
        with torch.inference_mode():
            logits = oracle.lm(input_ids=torch.tensor([ids])).logits[0, -1]
        logp = torch.log_softmax(logits.float(), -1)
        want = {c: float(logp[oracle.choice_ids(c)].logsumexp(0)) for c in ("A", "B")}
        assert choice_logprobs(resp) == pytest.approx(want, abs=1e-4)
    bad = oracle.generate([ask("x", choices=("A", "antidisestablishmentarianism"))])[0]
    assert not bad.ok and "not a single token" in bad.error


def test_the_spec_and_the_dtype_setting(tiny_lm):
    oracle = make_backend(OracleOptions(spec=f"hf:{tiny_lm}", batch_size=3, dtype="fp32"))
    assert oracle.backend == "hf" and oracle.options.batch_size == 3
    assert oracle.lm.dtype == torch.float32
    assert resolve_dtype("bf16") == "bf16"
    with pytest.raises(ValueError, match="auto, bf16 or fp32"):
        resolve_dtype("fp8")


@pytest.mark.slow
def test_the_real_decoder_batches_and_scores(qwen05_backbone):
    oracle = HFOracle(HFOptions(model=qwen05_backbone, batch_size=4, dtype="fp32"))
    questions = ["What is the capital of France? One word.", "Name a primary colour. One word.",
                 "Rewrite, fixing the spelling only: 'I recieved teh letter.'"]
    batched = oracle.generate([ask(q, max_tokens=16) for q in questions])
    alone = [oracle.generate([ask(q, max_tokens=16)])[0] for q in questions]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert "paris" in batched[0].text.lower()
    letter = ask("Which letter comes first in the alphabet, A or B? Answer with one letter.",
                 max_tokens=1, choices=("A", "B"))
    lp = json.loads(oracle.generate([letter])[0].text)
    assert lp["A"] > lp["B"]
