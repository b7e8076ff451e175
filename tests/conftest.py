"""Shared fixtures: tiny offline backbones built once per session, and small pair sets.

The tiny models reuse the packaged MiniLM tokenizer (no network): a 2-layer BERT of width 32
for the encoder path (pair template ``[CLS] p [SEP] a [SEP]``), and a 2-layer Llama of width
32 whose tokenizer carries a Jinja chat template, a BOS and an EOS, for the decoder path.
Most of their parameters are the 30522 x 32 embedding table; a forward pass takes a few ms.

Torch runs with one thread (``CROME_TEST_THREADS`` to change): the models are too small to
gain from more, and OpenMP threads spinning on busy cores made scoring 40x slower.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
TEST_THREADS = int(os.environ.get("CROME_TEST_THREADS", "1"))
torch.set_num_threads(TEST_THREADS)

from crome.data.schema import PairRecord

REPO = Path(__file__).resolve().parents[1]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")

# Plain words that the MiniLM vocabulary holds as single tokens.
WORDS = ["the", "cat", "dog", "runs", "quickly", "over", "lazy", "fox", "answer", "question", "model", "reward", "house", "tree", "river", "blue", "green", "small", "large", "happy", "water", "music", "city", "window", "paper", "light"]


def _tokenizer():
    from transformers import AutoTokenizer

    from crome.backbones import default_backbone

    return AutoTokenizer.from_pretrained(default_backbone())


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A randomly initialised 2-layer BERT (width 32) with the MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-bert")
    tok = _tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=512)
    torch.manual_seed(1234)
    BertModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama (width 32); its tokenizer has a chat template,
    BOS ``[CLS]`` and EOS ``[SEP]``, and no token type ids (like a real decoder's)."""
    from transformers import LlamaConfig, LlamaModel

    path = tmp_path_factory.mktemp("tiny-chat")
    tok = _tokenizer()
    tok.bos_token = "[CLS]"
    tok.eos_token = "[SEP]"
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1234)
    LlamaModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model_input_names"] = ["input_ids", "attention_mask"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return str(path)


@pytest.fixture(scope="session")
def qwen05_backbone(tmp_path_factory):
    """The packaged Qwen2.5-Coder-0.5B-Instruct GGUF (the ``decoder`` extra), dequantised
    once into an HF folder in a temporary directory (deleted afterwards: 2 GB of fp32)."""
    import shutil

    from crome.backbones import decoder_parts, packaged_decoder

    try:
        decoder_parts()
    except FileNotFoundError as exc:  # CI installs the extra: fail, never skip
        pytest.fail(str(exc), pytrace=False)
    tmp = tmp_path_factory.mktemp("qwen05")
    yield packaged_decoder(tmp / "hf")
    shutil.rmtree(tmp, ignore_errors=True)


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def varied_pairs(n: int, seed: int = 0, chat_every: int = 5) -> list[PairRecord]:
    """``n`` preference pairs with prompt and answer lengths spread from 1 to ~70 words;
    every ``chat_every``-th prompt is a multi-turn chat."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if chat_every and i % chat_every == 0:
            prompt: str | list[dict[str, str]] = [
                {"role": "system", "content": sentence(rng, rng.randint(1, 5))},
                {"role": "user", "content": sentence(rng, rng.randint(1, 10))},
                {"role": "assistant", "content": sentence(rng, rng.randint(1, 10))},
                {"role": "user", "content": sentence(rng, rng.randint(1, 10))}]
        else:
            prompt = sentence(rng, rng.randint(1, 30))
        chosen = sentence(rng, rng.randint(1, 70))
        rejected = sentence(rng, rng.randint(1, 70)) + " bad"
        out.append(PairRecord(id=f"p{i}", prompt=prompt, chosen=chosen, rejected=rejected,
                              source="unit", subset=f"s{i % 3}"))
    return out


def keyword_pairs(n: int, seed: int = 0, keyword: str = "excellent") -> list[PairRecord]:
    """A toy signal: the chosen answer holds ``keyword``, the rejected one does not;
    otherwise both are random words of random length (so length predicts nothing)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a = sentence(rng, rng.randint(3, 12)).split()
        a.insert(rng.randint(0, len(a)), keyword)
        out.append(PairRecord(id=f"k{i}", prompt=f"question {sentence(rng, 3)}",
                              chosen=" ".join(a), rejected=sentence(rng, rng.randint(3, 13))))
    return out


def tie_pairs(n: int, seed: int = 0) -> list[PairRecord]:
    """Neutral pairs whose two answers differ a lot (length, words)."""
    rng = random.Random(seed)
    return [PairRecord(id=f"t{i}", prompt=f"unrelated {sentence(rng, 4)}",
                       chosen=sentence(rng, rng.randint(1, 4)),
                       rejected=sentence(rng, rng.randint(15, 30)), label="tie")
            for i in range(n)]


def perturbed_rm(backbone: str, seed: int = 0, **options):
    """A fresh RM (``max_length`` 128, 16 prompt tokens kept unless given) whose weights are
    all nudged by N(0, 0.05²) noise, so rewards differ clearly between answers."""
    from crome.model import ModelOptions, RewardModel

    kw = {"max_length": 128, "min_prompt_tokens": 16, **options}
    rm = RewardModel.create(ModelOptions(backbone=backbone, seed=seed, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in rm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return rm


@pytest.fixture(scope="session")
def helpers():
    """The record builders above, for test modules (which cannot import conftest)."""
    class H:
        pass

    h = H()
    h.varied_pairs = varied_pairs
    h.keyword_pairs = keyword_pairs
    h.tie_pairs = tie_pairs
    h.sentence = sentence
    h.cli_env = cli_env
    h.free_port = free_port
    h.run_cli = run_cli
    h.perturbed_rm = perturbed_rm
    return h


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS=str(TEST_THREADS), MKL_NUM_THREADS=str(TEST_THREADS),
               PYTHONWARNINGS="ignore", NO_COLOR="1", COLUMNS="200")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, cwd: str | os.PathLike[str] | None = None, timeout: int = 300):
    """``python -m crome.cli ARGS`` in a subprocess; returns the CompletedProcess."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "crome.cli", *map(str, args)],
                          capture_output=True, text=True, env=cli_env(),
                          cwd=cwd or REPO, timeout=timeout)


def load_servers():
    """``tests/servers.py`` (LlamaServer, FaultProxy), imported once as ``crome_test_servers``;
    test modules hold a copy of this loader (they cannot import conftest)."""
    import importlib.util

    name = "crome_test_servers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "servers.py")
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    return sys.modules[name]


@pytest.fixture(scope="session")
def llama_server():
    """A started llama.cpp server (``python -m llama_cpp.server``) on the packaged
    Qwen2.5-Coder-1.5B-Instruct GGUF; ``.base_url`` is ``http://127.0.0.1:PORT/v1``.

    Fails, never skips, when llama_cpp or the model is missing: CI installs both."""
    from crome.oracle.guard import library_dir

    # Not imported here: a llama.cpp built for another CPU would take pytest down with it
    # (the server's start runs the crash guard in a child process instead).
    if library_dir() is None:
        pytest.fail("llama_cpp is not installed: crome build-llama", pytrace=False)
    try:
        from crome.oracle.llamacpp import packaged_model_path

        path = packaged_model_path()
    except Exception as exc:  # noqa: BLE001 -- ImportError, no model package, bad assembly
        pytest.fail(f"the packaged GGUF model is unavailable: {type(exc).__name__}: {exc}",
                    pytrace=False)
    if not Path(path).is_file():
        pytest.fail(f"the packaged GGUF model is missing: {path}", pytrace=False)
    # logprobs: the augmentation tests validate rewrites with the logprob judge
    server = load_servers().LlamaServer(path, n_ctx=4096, n_threads=2, logprobs=True)
    try:
        server.__enter__()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"the llama.cpp server did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.__exit__()


# -- a tiny reward model for the reward-server tests (test_serve_rm.py, test_client.py) -----

RM_MAX_LENGTH = 64


PAIR_MAX_LENGTH = 96  # the tiny pairwise model's


@pytest.fixture(scope="module")
def pair_dir(tiny_bert, tmp_path_factory):
    """A saved tiny pairwise BERT whose verdicts spread out (some orders agree, some not)."""
    rm = perturbed_rm(tiny_bert, seed=0, max_length=PAIR_MAX_LENGTH, pairwise=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in rm.model.named_parameters():
            if "embeddings" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return rm.save(tmp_path_factory.mktemp("tiny-pm") / "pm")


@pytest.fixture(scope="module")
def pair_offline(pair_dir):
    """The pairwise model loaded as offline comparisons load it."""
    from crome.model import RewardModel

    return RewardModel.load(pair_dir)


@pytest.fixture(scope="module")
def rm_dir(tiny_bert, tmp_path_factory):
    """A saved tiny BERT RM (``RM_MAX_LENGTH`` tokens) with spread-out rewards, so that a
    mix-up between requests would show."""
    from crome.model import ModelOptions, RewardModel

    rm = RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=RM_MAX_LENGTH,
                                         min_prompt_tokens=16, seed=0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in rm.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return rm.save(tmp_path_factory.mktemp("tiny-rm") / "rm")


@pytest.fixture(scope="module")
def offline(rm_dir):
    """A copy loaded as ``crome score`` loads it: the reference for every served reward."""
    from crome.model import RewardModel

    return RewardModel.load(rm_dir)


@pytest.fixture(scope="module")
def served(rm_dir):
    """The copy a server scores with."""
    from crome.model import RewardModel

    return RewardModel.load(rm_dir)
