"""The model card (``README.md``) of a saved reward model.

Written by :meth:`crome.model.RewardModel.save` from ``crome.json`` alone, and rewritten by
``crome train`` with what only training knows: the data's counts, the training summary and the
held-out figures. Hub-style YAML front matter, then: data, options, figures, and how to use the
model in transformers (the tokenization recipe that gives crome's rewards for its formatting
mode) and in crome (``crome score``, ``crome serve-rm``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from crome.backbones import PACKAGED_DECODER, default_backbone
from crome.data.schema import PairRecord
from crome.model import RewardModelMeta

CARD_FILE = "README.md"
DEFAULT_BACKBONE_ID = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def data_counts(records: Iterable[PairRecord]) -> dict[str, Any]:
    """Counts for the card: pairs, preferences, ties, text and chat prompts, and pairs per
    source and per ``source/subset``."""
    records = list(records)
    ties = sum(r.label == "tie" for r in records)
    chat = sum(r.is_chat for r in records)
    sources = Counter(r.source or "(none)" for r in records)
    subsets = Counter(f"{r.source or '(none)'}/{r.subset}" for r in records if r.subset)
    return {"pairs": len(records), "preferences": len(records) - ties, "ties": ties,
            "text_prompts": len(records) - chat, "chat_prompts": chat,
            "sources": dict(sorted(sources.items())), "subsets": dict(sorted(subsets.items()))}


def base_model_id(backbone: str) -> str | None:
    """The Hub id of the backbone for ``base_model``: the packaged MiniLM's, a Hub id as
    given, None for another local folder."""
    try:
        if backbone and Path(backbone).resolve() == Path(default_backbone()).resolve():
            return DEFAULT_BACKBONE_ID
    except ImportError:  # the packaged MiniLM is not installed
        pass
    if backbone and _HUB_ID.match(backbone) and not Path(backbone).exists():
        return backbone
    return None


def write_model_card(directory: str | os.PathLike[str], meta: RewardModelMeta,
                     train_summary: Any = None, data_counts: Mapping[str, Any] | None = None,
                     results: Mapping[str, Any] | None = None) -> Path:
    """Write ``README.md`` into ``directory``. ``train_summary`` is a ``TrainSummary`` or a
    dict; ``data_counts`` as :func:`data_counts` returns (any dict of counts will do);
    ``results`` any flat or one-level nested dict of held-out figures."""
    p = Path(directory)
    path = p / CARD_FILE
    path.write_text(render_model_card(p, meta, train_summary, data_counts, results),
                    encoding="utf-8")
    return path


def _base_lines(backbone: str) -> list[str]:
    """The recipe's line that loads the LoRA base (the packaged decoder by its builder)."""
    if backbone == PACKAGED_DECODER:
        return ["from crome.backbones import packaged_decoder  # builds its folder once",
                ("base = AutoModelForSequenceClassification.from_pretrained("
                 "packaged_decoder(), num_labels=1)")]
    return [(f"base = AutoModelForSequenceClassification.from_pretrained({backbone!r}, "
             "num_labels=1)")]


def render_model_card(directory: Path, meta: RewardModelMeta, train_summary: Any = None,
                      data_counts: Mapping[str, Any] | None = None,
                      results: Mapping[str, Any] | None = None) -> str:
    summary = _as_dict(train_summary)
    base = base_model_id(meta.backbone)
    front = ["---", f"library_name: {'peft' if meta.lora else 'transformers'}",
             "pipeline_tag: text-classification", "tags:", "- reward-model", "- crome"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    what = (("A pairwise preference model trained with [crome](https://arxiv.org/abs/2506.16507) "
             "(causally robust reward modelling): it reads a prompt and two answers and gives "
             "the probabilities of the verdicts \"A is better\", \"B is better\" and "
             "\"Same\". crome runs each comparison in both orders and averages them.")
            if meta.pairwise else
            ("A reward model trained with [crome](https://arxiv.org/abs/2506.16507) (causally "
             "robust reward modelling): a sequence-classification model with one output, the "
             "reward of an answer to a prompt. Higher is better; only differences between "
             "answers to the same prompt are meaningful."))
    out = front + [
        "", f"# {directory.resolve().name}", "", what, "",
        f"Backbone: `{meta.backbone}`" + (f" ({base})" if base else "") + ".", ""]
    out += _data_section(data_counts, summary)
    out += _options_section(meta)
    out += _figures_section(summary, results)
    out += _usage_section(directory, meta)
    return "\n".join(out).rstrip() + "\n"


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return dict(value)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif value is None:
        text = "—"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: Iterable[tuple[str, Any]], head: tuple[str, str]) -> list[str]:
    rows = list(rows)
    if not rows:
        return []
    lines = [f"| {head[0]} | {head[1]} |", "| --- | --- |"]
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]
    return lines + [""]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def _data_section(counts: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> list[str]:
    counts = dict(counts or {})
    if not counts and "pairs" in summary:
        counts = {"pairs": summary["pairs"], "ties": summary.get("ties", 0)}
    if not counts:
        return []
    out = ["## Training data", ""]
    groups = {k: v for k, v in counts.items() if isinstance(v, Mapping)}
    out += _table([(k, v) for k, v in counts.items() if k not in groups], ("", "count"))
    for name, group in groups.items():
        if group:
            out += _table(group.items(), (name.rstrip("s") if name.endswith("s") else name,
                                          "pairs"))
    return out


def _options_section(meta: RewardModelMeta) -> list[str]:
    model = [("backbone", meta.backbone), ("max_length", meta.max_length),
             ("min_prompt_tokens", meta.min_prompt_tokens), ("dropout", meta.dropout),
             ("lora", meta.lora), ("formatting", meta.formatting),
             ("chat_template", meta.chat_template or "none")]
    train = dict(meta.extra.get("train_options") or {})
    rows = [(f"model.{k}", v) for k, v in model]
    model_opts = train.pop("model", None)
    if isinstance(model_opts, Mapping):  # what crome.json's own fields do not hold (the seed)
        rows += [(f"model.{k}", v) for k, v in model_opts.items() if f"model.{k}" not in
                 dict(rows)]
    rows += list(train.items())
    return ["## Options", "", "`ModelOptions` (`model.*`)" +
            (" and `TrainOptions`" if train else "") + ", as recorded in `crome.json`:", ""
            ] + _table(rows, ("option", "value"))


def _figures_section(summary: Mapping[str, Any], results: Mapping[str, Any] | None,
                     ) -> list[str]:
    out: list[str] = []
    if summary:
        keep = {k: v for k, v in summary.items() if k != "evals"}
        out += ["## Training", ""] + _table(_flatten(keep), ("", "value"))
        evals = [e for e in summary.get("evals") or [] if "accuracy" in e]
        if evals:
            out += ["Held-out accuracy during training (ties count as wrong):", "",
                    "| step | accuracy | pairs |", "| --- | --- | --- |"]
            out += [f"| {e.get('step')} | {_cell(e.get('accuracy'))} | {e.get('n', '—')} |"
                    for e in evals] + [""]
    if results:
        out += ["## Held-out results", ""] + _table(_flatten(results), ("", "value"))
    return out


def _pairwise_usage(where: str, meta: RewardModelMeta) -> list[str]:
    from crome.model import COMPARE_FRAME, COMPARE_SUFFIX, ENCODER_FRAME, LABELS

    if meta.label_ids:
        form = (f"a causal LM: the frame `{COMPARE_FRAME!r}` is the user turn of the chat "
                f"template (without one, followed by `{COMPARE_SUFFIX!r}`), and the verdict is "
                f"the next token: the logits of token ids {meta.label_ids} "
                f"({', '.join(LABELS)})")
    else:
        form = (f"a cross-encoder with a 3-way head (outputs {', '.join(LABELS)}); its input is "
                f"the pair `{ENCODER_FRAME!r}`, split at `|` into the tokenizer's two "
                "segments")
    return ["## Use it", "",
            (f"crome: `crome eval --model {where}`, `crome bon --model {where}` (knockout and "
             f"round-robin), `crome serve-rm --model {where}` (`POST /compare`); in Python, "
             f"`crome.model.RewardModel.load({where!r})` and "
             "`crome.pairwise.compare_texts`. This model is " + form + ". Past "
             f"{meta.max_length} tokens crome cuts the start of the prompt, then the two "
             "answers fairly (a short one whole, else half the room each)."), ""]


def _usage_section(directory: Path, meta: RewardModelMeta) -> list[str]:
    where = str(directory)
    if meta.pairwise:
        return _pairwise_usage(where, meta)
    out = ["## Use it", "",
           (f"crome itself: `crome score pairs.jsonl scores.jsonl --model {where}` scores both "
           f"answers of every pair; `crome serve-rm --model {where}` serves it over HTTP "
           "(OpenRLHF `/get_reward`, vLLM-style `/classify`, `/score`); in Python, "
           f"`crome.model.RewardModel.load({where!r})` and `crome.score.score_texts`."), ""]
    if meta.lora:
        out += [("This is a LoRA checkpoint: the adapter and the reward head are in "
                f"`{where}/adapter`, on top of the backbone `{meta.backbone}`; peft loads it."),
                ""]
        model = [
            "from peft import PeftModel",
            "",
            f"path = {where!r}",
            "tok = AutoTokenizer.from_pretrained(path)",
            *_base_lines(meta.backbone),
            "if len(tok) > base.get_input_embeddings().num_embeddings:  # crome's pad token",
            "    base.resize_token_embeddings(len(tok))",
            "base.config.pad_token_id = tok.pad_token_id",
            "model = PeftModel.from_pretrained(base, f\"{path}/adapter\").eval()"]
    else:
        model = [
            f"path = {where!r}",
            "tok = AutoTokenizer.from_pretrained(path)",
            "model = AutoModelForSequenceClassification.from_pretrained(path).eval()"]
    out += [f"In transformers (no `trust_remote_code`), the formatting is `{meta.formatting}`:",
            ""]
    load = [
        "```python",
        "import torch",
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
        "",
        *model,
        "messages = [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]",
        "answer = \"Paris.\"",
        ("full = tok.apply_chat_template(messages + [{\"role\": \"assistant\", \"content\": "
        "answer}],"),
        "                               tokenize=False)",
    ]
    head = ("head = tok.apply_chat_template(messages, tokenize=False, "
            "add_generation_prompt=True)")
    renders = ("The chat template renders crome's text (a lone user message as its bare "
               "content, like a text prompt; other chats as `Role: content` turns; pass "
               "`role_labels=True` to render a lone user message as `User: …`, as crome does "
               "for a one-turn chat prompt) with the separator token between prompt and "
               "answer, so `tok(full)` gives crome's token ids")
    if meta.formatting == "pair_template" and not meta.answer_type_ids:
        inputs = ["inputs = tok(full, return_tensors=\"pt\")"]
        note = (f"{renders} and token types, as reward-bench, TRL and vLLM tokenize it. "
                "BERT-style positions are absolute: pad on the right (the tokenizer's "
                "default).")
    elif meta.formatting == "pair_template":
        inputs = [head, "inputs = tok(head, answer, return_tensors=\"pt\")  # exact: ids and "
                        "token types"]
        note = (f"{renders}. It cannot give its token type ids: this model was made when crome "
                "encoded prompt and answer as a pair (the answer has type 1) and one string "
                "has type 0 throughout, so only the pair call above gives crome's rewards. A "
                "tool that tokenizes the rendered string alone gets other rewards from this "
                "model; one that passes a text pair (cross-encoder style, or the "
                "text-classification pipeline's `{\"text\": head, \"text_pair\": answer}`) "
                "gets crome's.")
    elif meta.formatting == "plain_join":
        inputs = [head, "tail = full[len(head):]  # the answer and the closing EOS",
                  "inputs = tok(head, tail, add_special_tokens=False, return_tensors=\"pt\")",
                  "inputs.pop(\"token_type_ids\", None)"]
        note = ("crome tokenizes the text before the answer and the answer separately; "
                "`tok(full, add_special_tokens=False)` may merge the tokens where they meet "
                "and then differ slightly.")
    else:
        inputs = ["inputs = tok(full, add_special_tokens=False, return_tensors=\"pt\")"]
        note = ("This is the backbone's own chat template, as reward-bench, TRL and vLLM "
                "apply it. The template already holds BOS and the turn markers, hence "
                "`add_special_tokens=False`. The pad token is not the EOS, so the head reads "
                "the last real token under left or right padding.")
    load += [*inputs, "with torch.inference_mode():",
             "    reward = model(**inputs).logits[0, 0].item()", "```", "", note]
    out += load + ["",
                   (f"Past {meta.max_length} tokens crome cuts the start of the prompt (keeping "
                   f"at least its last {meta.min_prompt_tokens} tokens), then the end of the "
                   "answer; other tools truncate their own way, so rewards agree when nothing "
                   "is cut."), ""]
    return out
