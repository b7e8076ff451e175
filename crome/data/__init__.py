"""Pair records: the schema, readers and writers, and adapters for the public data sets."""

from crome.data.io import (
    FORMATS,
    ReadReport,
    detect_format,
    from_dataset,
    iter_pairs,
    read_pairs,
    to_dataset,
    write_pairs,
)
from crome.data.schema import (
    LABELS,
    MAX_ANSWER_CHARS,
    PROVENANCE_KEYS,
    ROLES,
    Label,
    Message,
    PairRecord,
    Prompt,
    RecordError,
    prompt_text,
    validate_messages,
    validate_record,
)
from crome.data.sources import (
    DATA_ENV,
    DATA_SUBDIRS,
    HH_SUBSETS,
    LLMBAR_ADVERSARIAL,
    LLMBAR_FILES,
    SOURCES,
    XSTEST_SUBSETS,
    DataDirError,
    GSM8KItem,
    GSM8KItems,
    SourceResult,
    final_number,
    gsm8k_pairs,
    load_gsm8k,
    load_hh_rlhf,
    load_llmbar,
    load_rewardbench,
    load_source,
    load_xstest,
    resolve_data_dir,
)

__all__ = [
    "DATA_ENV", "DATA_SUBDIRS", "FORMATS", "HH_SUBSETS", "LABELS", "LLMBAR_ADVERSARIAL",
    "LLMBAR_FILES", "MAX_ANSWER_CHARS", "PROVENANCE_KEYS", "ROLES", "SOURCES",
    "XSTEST_SUBSETS", "DataDirError", "GSM8KItem", "GSM8KItems", "Label", "Message",
    "PairRecord", "Prompt", "ReadReport", "RecordError", "SourceResult", "detect_format",
    "final_number", "from_dataset", "gsm8k_pairs", "iter_pairs", "load_gsm8k",
    "load_hh_rlhf", "load_llmbar", "load_rewardbench", "load_source", "load_xstest",
    "prompt_text", "read_pairs", "resolve_data_dir", "to_dataset", "validate_messages",
    "validate_record", "write_pairs",
]
