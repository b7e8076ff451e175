"""The ``crome`` command: one command per stage, each only wiring options to a function.

Bad input ends in one line on stderr (``crome: error: <file>:line N: field 'x': …``) and exit
status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models come from packages or local folders
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="crome: causally robust reward models (Crome, arXiv 2506.16507).")

DataOpt = Annotated[list[str], typer.Option("--data", "-d",
                    help="A source name (see `crome sources`) or a pair file; repeatable.")]
DataDirOpt = Annotated[str | None, typer.Option(
    "--data-dir", help="Folder of the public data sets (default: $CROME_DATA, ../shared/data).")]
SkipOpt = Annotated[bool, typer.Option("--skip-invalid",
                    help="Skip invalid records (counted and reported) instead of stopping.")]


def _load(names: list[str], data_dir: str | None, limit: int | None = None,
          skip_invalid: bool = False) -> list:  # type: ignore[type-arg]
    from crome.data.sources import load_named

    records = []
    for name in names:
        res = load_named(name, Path(data_dir) if data_dir else None, limit, skip_invalid)
        typer.echo(res.summary(), err=True)
        records += res.records
    return records


@app.command()
def sources() -> None:
    """List the named public data sources."""
    from crome.data.sources import SOURCES

    for name in SOURCES:
        typer.echo(name)


@app.command()
def validate(path: Path, skip_invalid: SkipOpt = False) -> None:
    """Check a pair file (JSONL, JSON, CSV, Parquet) against the record schema."""
    from crome.data.io import ReadReport, iter_pairs

    report = ReadReport()
    for _ in iter_pairs(path, skip_invalid=skip_invalid, report=report):
        pass
    typer.echo(report.summary())
    for example in report.examples:
        typer.echo(f"  skipped: {example}")


@app.command()
def export(source: str, output: Path, data_dir: DataDirOpt = None,
           limit: Annotated[int | None, typer.Option()] = None) -> None:
    """Write a named source as a pair file (format from the suffix)."""
    from crome.data.io import write_pairs

    n = write_pairs(_load([source], data_dir, limit), output)
    typer.echo(f"wrote {n} records to {output}")


SharingOpt = Annotated[bool | None, typer.Option(
    "--prefix-sharing/--no-prefix-sharing",
    help="Decoders: answers to one prompt share its encoding (crome.packing). Default: "
    "wherever the model passes the packing probe")]


@app.command("train")
def train_cmd(
    data: DataOpt,
    output_dir: Annotated[str, typer.Option("--out", "-o")] = "runs/rm",
    eval_data: Annotated[list[str] | None, typer.Option("--eval-data")] = None,
    data_dir: DataDirOpt = None,
    backbone: Annotated[str | None, typer.Option(
        help="HF model dir, or qwen2.5-coder-0.5b-instruct (the packaged decoder, "
        "decoder extra); default: packaged MiniLM")] = None,
    max_length: int = 256,
    min_prompt_tokens: int = 64,
    epochs: float = 1.0,
    batch_size: Annotated[int, typer.Option(help="Pairs per optimizer step, all processes")] = 16,
    grad_accum: int = 1,
    lr: float = 1e-4,
    tie_weight: Annotated[float, typer.Option(help="λ of the tie loss")] = 1.0,
    margin: float = 0.0,
    center_coef: float = 0.0,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="Default: auto")] = None,
    dropout: Annotated[bool, typer.Option("--dropout/--no-dropout")] = False,
    lora_r: Annotated[int, typer.Option(help="LoRA rank; 0 = full fine-tuning")] = 0,
    seed: int = 0,
    max_steps: int | None = None,
    max_train: Annotated[int | None, typer.Option(help="Use the first N pairs")] = None,
    checkpoint_every: int = 0,
    eval_every: int = 0,
    resume: bool = False,
    skip_invalid: SkipOpt = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
    prefix_sharing: SharingOpt = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing",
        help="Recompute activations in the backward pass: less memory, more compute")] = False,
    pairwise: Annotated[bool, typer.Option(
        "--pairwise/--bradley-terry",
        help="A pairwise preference model (reads the prompt and both answers; verdict A, B "
        "or Same) instead of a Bradley–Terry RM")] = False,
) -> None:
    """Train a reward model (BT on preferences, tie loss on neutral pairs), or with
    --pairwise a pairwise preference model (cross-entropy, both orders, ties as Same)."""
    from crome.model import LoraOptions, ModelOptions
    from crome.train import TrainOptions, train

    records = _load(data, data_dir, max_train, skip_invalid)
    evals = _load(eval_data, data_dir) if eval_data else None
    opts = TrainOptions(
        output_dir=output_dir,
        model=ModelOptions(backbone=backbone, max_length=max_length,
                           min_prompt_tokens=min_prompt_tokens, dropout=dropout,
                           lora=LoraOptions(r=lora_r, alpha=2 * lora_r) if lora_r else None,
                           pairwise=pairwise),
        epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
        tie_weight=tie_weight, margin=margin, center_coef=center_coef, bf16=bf16, seed=seed,
        max_steps=max_steps, checkpoint_every=checkpoint_every, eval_every=eval_every,
        resume=resume, progress=progress, prefix_sharing=prefix_sharing,
        gradient_checkpointing=gradient_checkpointing)
    summary = train(records, opts, evals)
    shared = (f", {summary.shared_tokens} prompt tokens shared" if summary.prefix_sharing
              else "")
    typer.echo(f"{summary.steps} steps, {summary.pairs_per_second:.2f} pairs/s, "
               f"non-padding {summary.non_padding_fraction:.1%}{shared}; model saved to "
               f"{output_dir}")


@app.command("score")
def score_cmd(
    input: Path,
    output: Path,
    model: Annotated[Path, typer.Option("--model", "-m")],
    batch_size: int = 64,
    bf16: Annotated[bool, typer.Option("--bf16/--no-bf16")] = False,
    skip_invalid: SkipOpt = False,
    prefix_sharing: SharingOpt = None,
) -> None:
    """Score both answers of every pair; rewards are written in input order. A pairwise
    model writes P(chosen ≻ rejected) and P(rejected ≻ chosen), both orders averaged."""
    from crome.score import ScoreOptions, score_file

    stats, report = score_file(model, input, output,
                               ScoreOptions(batch_size, bf16, prefix_sharing), skip_invalid)
    typer.echo(report.summary(), err=True)
    typer.echo(f"scored {stats.sequences} answers in {stats.seconds:.1f} s "
               f"({stats.sequences / max(stats.seconds, 1e-9):.1f}/s); "
               f"{stats.truncation.summary()}; wrote {output}")


ModelOpt = Annotated[list[Path] | None, typer.Option(
    "--model", "-m", help="A crome model dir or any HF sequence-classification RM; repeatable")]
ReferenceOpt = Annotated[list[str] | None, typer.Option(
    help="Reference scorer: longer-wins, markdown-wins; repeatable")]
EvalOutOpt = Annotated[Path, typer.Option("--out", "-o", help="Folder for the result files")]
Bf16Opt = Annotated[bool, typer.Option("--bf16/--no-bf16")]


def _scorers(model: list[Path] | None, reference: list[str] | None, batch_size: int,
             bf16: bool) -> list:  # type: ignore[type-arg]
    from crome.evaluate.reference import get_reference_scorer
    from crome.model import RewardModel
    from crome.score import ScoreOptions, model_scorer

    if not model and not reference:
        raise typer.BadParameter("give --model and/or --reference")
    scorers = [get_reference_scorer(r) for r in reference or []]
    return scorers + [model_scorer(RewardModel.load(m), ScoreOptions(batch_size, bf16),
                                   name=m.name) for m in model or []]


@app.command("eval")
def eval_cmd(
    data: DataOpt,
    model: ModelOpt = None,
    reference: ReferenceOpt = None,
    output_dir: EvalOutOpt = Path("runs/eval"),
    data_dir: DataDirOpt = None,
    max_eval: Annotated[int | None, typer.Option(help="First N pairs per subset")] = None,
    perturb: Annotated[list[str] | None, typer.Option(
        help="Perturbation suite: 'default', 'all', NAME or NAME@TARGET (prompt, both, "
             "chosen, rejected); repeatable. See `crome perturbations`.")] = None,
    oracle: Annotated[str | None, typer.Option(
        "--oracle", help="For the 'paraphrase' perturbation: rules | llamacpp | "
        "openai:BASE_URL")] = None,
    seed: int = 0,
    batch_size: int = 64,
    bf16: Bf16Opt = False,
) -> None:
    """Pairwise accuracy per subset (ties wrong), RewardBench sections, length and format
    bias; with --perturb, accuracy, drop and consistency under each perturbation."""
    from crome.evaluate.perturb import (
        PerturbOptions,
        evaluate_perturbations,
        parse_perturbations,
    )
    from crome.evaluate.run import (
        evaluate_scorer,
        load_eval_sets,
        markdown_table,
        results_table,
    )

    # bad specs fail before anything is scored
    needs = [p.id for p in parse_perturbations(perturb or [], with_oracle=bool(oracle))
             if p.transformation.fn is None]
    if needs and not oracle:
        raise typer.BadParameter(f"{', '.join(needs)} need an oracle", param_hint="--oracle")
    # made first: a local llama.cpp is checked before anything is scored
    orc = _oracle(oracle, "", "OPENAI_API_KEY", 4, None) if perturb and oracle else None
    try:
        scorers = _scorers(model, reference, batch_size, bf16)
        sets = load_eval_sets(data, data_dir, max_eval)
        results = {s.name: evaluate_scorer(s, sets, output_dir) for s in scorers}
        typer.echo(markdown_table(results_table(results)))
        (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        for s in scorers if perturb else []:
            report = evaluate_perturbations(s, sets, PerturbOptions(tuple(perturb or ()), seed),
                                            oracle=orc, output_dir=output_dir)
            typer.echo(report.table())
    finally:
        if orc is not None:
            _oracle_stats(orc)
    typer.echo(f"per-example outputs and results in {output_dir}")


@app.command("perturbations")
def perturbations_cmd() -> None:
    """List the transformations of the perturbation suite and the default suite."""
    from crome.evaluate.perturb import DEFAULT_SUITE, TRANSFORMATIONS

    for t in TRANSFORMATIONS.values():
        typer.echo(f"{t.name:20} {t.kind:8} {'/'.join(t.targets):28} {t.description}")
    typer.echo("default: " + " ".join(DEFAULT_SUITE))


@app.command("bon")
def bon_cmd(
    model: ModelOpt = None,
    reference: ReferenceOpt = None,
    n: Annotated[list[int] | None, typer.Option("--n", help="N; repeatable (default "
                                                "4, 8, 16)")] = None,
    limit: Annotated[int | None, typer.Option(help="First N GSM8K test questions")] = None,
    output_dir: EvalOutOpt = Path("runs/eval"),
    data_dir: DataDirOpt = None,
    seed: int = 0,
    batch_size: int = 64,
    bf16: Bf16Opt = False,
    selection: Annotated[list[str] | None, typer.Option(
        help="A pairwise model's pick: knockout, round-robin; repeatable, the first is the "
             "headline (default both)")] = None,
) -> None:
    """Best-of-N on GSM8K test: 4 real solutions plus rule-made wrong and bait variants;
    accuracy of the scorer's pick vs random and best, with the final-number checker. A
    pairwise model picks by a knockout tournament and by round-robin (Copeland)."""
    from crome.evaluate.bon import BoNOptions, run_bon

    try:
        opts = BoNOptions(ns=tuple(sorted(n)) if n else BoNOptions().ns, seed=seed,
                          limit=limit, selection=tuple(selection or BoNOptions().selection))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--n / --selection") from None
    for s in _scorers(model, reference, batch_size, bf16):
        report = run_bon(s, opts, data_dir=data_dir, output_dir=output_dir)
        typer.echo(report.summary())
    typer.echo(f"results in {output_dir}")


@app.command("audit")
def audit_cmd(
    model: ModelOpt = None,
    reference: ReferenceOpt = None,
    causal: Annotated[list[Path] | None, typer.Option(
        help="Causal pair file (from `crome augment`); repeatable. Default: pairs made by "
             "rules on held-out data (GSM8K correctness, helpful-base RRM relevance)")] = None,
    data: Annotated[list[str] | None, typer.Option(
        "--data", "-d", help="Held-out set for invariance (default llmbar)")] = None,
    max_eval: Annotated[int | None, typer.Option(help="First N pairs per subset")] = 50,
    probes: Annotated[int, typer.Option(help="Default causal pairs: first N of each "
                                        "source")] = 100,
    output_dir: EvalOutOpt = Path("runs/eval"),
    data_dir: DataDirOpt = None,
    seed: int = 0,
    batch_size: int = 64,
    bf16: Bf16Opt = False,
) -> None:
    """Sensitivity per quality attribute (causal pairs) and invariance per neutral
    transformation, in units of the reward's standard deviation."""
    from crome.data.io import read_pairs
    from crome.evaluate.audit import AuditOptions, audit, rules_probe_pairs
    from crome.evaluate.run import load_eval_sets

    scorers = _scorers(model, reference, batch_size, bf16)
    if causal:
        pairs = [r for path in causal for r in read_pairs(path)]
    else:
        pairs, log = rules_probe_pairs(output_dir / "probes", data_dir, probes, seed)
        for line in log:
            typer.echo(line, err=True)
    sets = load_eval_sets(data or ["llmbar"], data_dir, max_eval)
    for s in scorers:
        typer.echo(audit(s, pairs, sets, AuditOptions(seed=seed), output_dir).table())
    typer.echo(f"results in {output_dir}")


@app.command("report")
def report_cmd(
    runs: Annotated[list[Path], typer.Argument(help="Run folders (result JSON files)")],
    output_dir: Annotated[Path, typer.Option("--out", "-o")] = Path("runs/report"),
    title: str = "crome robustness report",
) -> None:
    """One self-contained HTML report (plots embedded) and a Markdown summary."""
    from crome.report import ReportOptions, build_report, collect_runs

    paths = build_report(collect_runs(runs), output_dir, ReportOptions(title=title))
    typer.echo(f"wrote {paths.html} and {paths.markdown}")


OracleOpt = Annotated[str, typer.Option(
    "--oracle", help="auto (default: the packaged 1.5B model on the local backend a probe "
    "measured fastest here; `crome doctor` shows it) | llamacpp[:MODEL.gguf] | "
    "llamaserver[:MODEL.gguf] (the same behind llama.cpp's server: batched, n-gram drafts) | "
    "hf[:FOLDER] (transformers, batched, bf16 where fast) | rules | "
    "openai:BASE_URL (e.g. openai:http://127.0.0.1:8000/v1)")]
OracleModelOpt = Annotated[str, typer.Option("--oracle-model",
                           help="openai: model name (default: the server's first)")]
KeyEnvOpt = Annotated[str, typer.Option("--oracle-key-env",
                      help="openai: environment variable that holds the API key")]
ConcurrencyOpt = Annotated[int, typer.Option("--oracle-concurrency",
                           help="openai: requests in flight; llamaserver: server slots")]
CacheOpt = Annotated[str | None, typer.Option(
    "--cache", help="SQLite cache of oracle calls (default: $CROME_CACHE or "
    "~/.cache/crome/oracle.sqlite3; 'off' disables it)")]


def _oracle(spec: str, model: str, key_env: str, concurrency: int, cache: str | None):  # type: ignore[no-untyped-def]
    from crome.oracle import OracleOptions, make_oracle

    return make_oracle(OracleOptions(spec=spec, model=model, key_env=key_env,
                                     concurrency=concurrency, cache=cache))


def _oracle_stats(oracle) -> None:  # type: ignore[no-untyped-def]
    stats = getattr(oracle, "stats", None)
    if stats is not None:
        typer.echo(stats.summary(), err=True)
    oracle.close()


@app.command("rubrics")
def rubrics_cmd(
    data: DataOpt,
    output: Annotated[Path, typer.Option("--out", "-o", help="Rubrics JSONL (resumable)")],
    data_dir: DataDirOpt = None,
    limit: Annotated[int | None, typer.Option(help="First N pairs of each source")] = None,
    oracle: OracleOpt = "auto",
    oracle_model: OracleModelOpt = "",
    oracle_key_env: KeyEnvOpt = "OPENAI_API_KEY",
    oracle_concurrency: ConcurrencyOpt = 4,
    cache: CacheOpt = None,
    attempts: Annotated[int, typer.Option(help="Tries per prompt before the fallback")] = 3,
    skip_invalid: SkipOpt = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Name the 2–5 causal quality attributes of every distinct prompt (JSON from the oracle)."""
    from crome.progress import progress_callback
    from crome.rubrics import RubricOptions, make_rubrics

    records = _load(data, data_dir, limit, skip_invalid)
    orc = _oracle(oracle, oracle_model, oracle_key_env, oracle_concurrency, cache)
    bar, tick = progress_callback("rubrics", progress)
    try:
        report = make_rubrics(records, orc, output, RubricOptions(attempts=attempts), tick)
    finally:
        bar.close()
        _oracle_stats(orc)
    typer.echo(report.summary())
    typer.echo(f"rubrics in {output}")


@app.command("augment")
def augment_cmd(
    data: DataOpt,
    output: Annotated[Path, typer.Option("--out", "-o", help="Pair JSONL (resumable)")],
    recipe: Annotated[str, typer.Option(help="causal | neutral | rrm | paraphrase")] = "causal",
    rubrics: Annotated[Path | None, typer.Option(help="From `crome rubrics` (causal)")] = None,
    data_dir: DataDirOpt = None,
    limit: Annotated[int | None, typer.Option(help="First N pairs of each source")] = None,
    oracle: OracleOpt = "auto",
    oracle_model: OracleModelOpt = "",
    oracle_key_env: KeyEnvOpt = "OPENAI_API_KEY",
    oracle_concurrency: ConcurrencyOpt = 4,
    cache: CacheOpt = None,
    attributes: Annotated[int, typer.Option(
        help="causal: rubric attributes per pair, round-robin over the rubric; 0 = all")] = 2,
    direction: Annotated[list[str] | None, typer.Option(
        help="causal: degrade and/or upgrade (default both)")] = None,
    candidates: Annotated[int, typer.Option(help="causal: samples tried per rewrite")] = 2,
    batch_size: Annotated[int, typer.Option(
        help="causal: rewrite tasks handed to the oracle at once (it batches inside)")] = 64,
    validate: Annotated[bool, typer.Option(
        "--validate/--no-validate", help="causal: the oracle checks each rewrite (both "
        "orders; see crome.validate)")] = True,
    judge: Annotated[str, typer.Option(
        help="causal: logprob (the verdict tokens' log-odds in both orders, one forward pass "
        "each) or generate (a written two-line verdict)")] = "logprob",
    judge_margin: Annotated[float, typer.Option(
        help="causal, logprob judge: the mean log-odds (nats) a rewrite must reach, beyond "
        "both orders naming it")] = 0.0,
    judge_oracle: Annotated[str | None, typer.Option(
        help="causal: another oracle spec to judge the rewrites (default: --oracle)")] = None,
    judge_oracle_model: Annotated[str, typer.Option(
        help="causal: the --judge-oracle server's model name")] = "",
    allow_other_changes: Annotated[bool, typer.Option(
        help="causal, generate judge: keep a validated rewrite even if the judge saw other "
        "changes")] = False,
    max_similarity: Annotated[float, typer.Option(
        "--max-prompt-similarity", help="neutral/rrm: cosine bound for an unrelated prompt")] = 0.2,
    seed: int = 0,
    skip_invalid: SkipOpt = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Make causal, neutral (tie), RRM or paraphrase (same-prompt tie) pairs; streams to --out
    and resumes after a crash."""
    from crome.augment import RECIPES, AugmentOptions, augment
    from crome.progress import progress_callback
    from crome.rubrics import read_rubrics
    from crome.validate import JUDGES

    if recipe not in RECIPES:
        raise typer.BadParameter(f"choose one of {', '.join(RECIPES)}", param_hint="--recipe")
    for d in direction or []:
        if d not in ("degrade", "upgrade"):
            raise typer.BadParameter("degrade or upgrade", param_hint="--direction")
    records = _load(data, data_dir, limit, skip_invalid)
    opts = AugmentOptions(recipe=recipe, seed=seed, attributes_per_pair=attributes,
                          directions=tuple(direction or ("degrade", "upgrade")),
                          candidates=candidates, batch_size=batch_size, validate=validate,
                          judge=judge, judge_margin=judge_margin,
                          reject_other_changes=not allow_other_changes,
                          max_prompt_similarity=max_similarity)
    if judge not in JUDGES:
        raise typer.BadParameter(f"choose one of {', '.join(JUDGES)}", param_hint="--judge")
    orc = judge_orc = None
    rubric_map = None
    if recipe == "causal":
        if rubrics is None:
            raise typer.BadParameter("the causal recipe needs --rubrics (from `crome rubrics`)")
        rubric_map = read_rubrics(rubrics)
    if recipe in ("causal", "paraphrase"):
        orc = _oracle(oracle, oracle_model, oracle_key_env, oracle_concurrency, cache)
    if recipe == "causal" and judge_oracle:
        judge_orc = _oracle(judge_oracle, judge_oracle_model, oracle_key_env,
                            oracle_concurrency, cache)
    bar, tick = progress_callback(recipe, progress and orc is not None)
    try:
        report = augment(records, output, opts, oracle=orc, rubrics=rubric_map, progress=tick,
                         judge=judge_orc)
    finally:
        bar.close()
        for used in (orc, judge_orc):
            if used is not None:
                _oracle_stats(used)
    typer.echo(report.summary())
    typer.echo(f"pairs in {output}")


@app.command("filter")
def filter_cmd(
    data: DataOpt,
    output: Annotated[Path, typer.Option("--out", "-o")],
    baseline: Annotated[Path, typer.Option(help="RM trained on the original pairs")],
    tau: Annotated[float, typer.Option(
        help="Keep preference pairs whose label the baseline gives P < tau")] = 0.95,
    tie_tau: Annotated[float, typer.Option(
        help="Keep ties where the baseline gives one answer P >= tie-tau (0.5-1; the same "
             "unit as --tau: σ of the reward margin)")] = 0.6,
    data_dir: DataDirOpt = None,
    skip_invalid: SkipOpt = False,
) -> None:
    """Keep the augmented pairs that a baseline RM gets wrong or is unsure about."""
    from crome.filter import FilterOptions, dropped_path, filter_file

    records = _load(data, data_dir, None, skip_invalid)
    report = filter_file(records, baseline, output, FilterOptions(tau=tau, tie_tau=tie_tau))
    typer.echo(report.summary())
    typer.echo(f"kept pairs in {output}; dropped in {dropped_path(output)}")


@app.command("serve")
def serve_cmd(
    model: Annotated[str | None, typer.Option(help="GGUF file (default: the packaged model)")] = None,
    port: int = 8080,
    host: Annotated[str, typer.Option(help="Bind address; keep 127.0.0.1 unless you "
                                           "mean to expose it")] = "127.0.0.1",
    threads: int = 2,
    n_ctx: Annotated[int, typer.Option(help="Context per request")] = 4096,
    engine: Annotated[str, typer.Option(
        help="python (llama-cpp-python's server, one request at a time) or llama-server "
             "(llama.cpp's own, from `crome build-llama --server`: slots, n-gram drafts)")
    ] = "python",
    parallel: Annotated[int, typer.Option(help="llama-server: slots (continuous batching)")
                        ] = 1,
    spec: Annotated[str, typer.Option(
        help="llama-server: n-gram speculative decoding, e.g. ngram-simple ('' = off)")] = "",
) -> None:
    """Serve a GGUF model (default: the packaged oracle) with llama.cpp's OpenAI-compatible
    server, for ``--oracle openai:http://HOST:PORT/v1``; Ctrl-C stops it."""
    from crome.oracle.server import LlamaServer

    with LlamaServer(model, n_ctx=n_ctx, n_threads=threads, alias="local", host=host,
                     port=port, engine=engine, parallel=parallel, spec=spec) as server:
        typer.echo(f"serving {server.model} as model 'local' at {server.base_url}; "
                   f"use --oracle openai:{server.base_url}")
        assert server.proc is not None
        server.proc.wait()


@app.command("serve-rm")
def serve_rm_cmd(
    model: Annotated[Path, typer.Option("--model", "-m", help="A crome model dir or any HF "
                                        "sequence-classification RM")],
    host: Annotated[str, typer.Option(help="Bind address; any but loopback needs a token "
                                           "in $CROME_RM_TOKEN (see --token-env)")] = "127.0.0.1",
    port: int = 8000,
    max_batch: Annotated[int, typer.Option(help="Sequences per scorer call")] = 128,
    max_wait_ms: Annotated[float, typer.Option(help="How long a batch waits to fill")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Requests waiting; more get 503")] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="Larger bodies get 413")] = 16 * 1024 * 1024,
    max_items: Annotated[int, typer.Option(help="Texts per request")] = 512,
    max_chars: Annotated[int, typer.Option(help="Characters per text")] = 200_000,
    timeout_s: Annotated[float, typer.Option(help="Per request; 504 after")] = 60.0,
    token_env: Annotated[str, typer.Option(help="Variable holding the bearer token")
                         ] = "CROME_RM_TOKEN",
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass")] = 64,
) -> None:
    """Serve a reward model over HTTP for RL loops and best-of-N: POST /get_reward
    (OpenRLHF), /classify (vLLM's API, as verl calls it), /score (prompt + answers); GET
    /health, /metrics. Rewards equal `crome score`'s bit for bit; Ctrl-C stops it."""
    from crome.serve_rm import ServeOptions, serve_rm

    serve_rm(model, ServeOptions(
        host=host, port=port, max_batch=max_batch, max_wait_ms=max_wait_ms,
        max_queue=max_queue, max_body_bytes=max_body_bytes, max_items=max_items,
        max_chars=max_chars, timeout_s=timeout_s, token_env=token_env, batch_size=batch_size))


@app.command("build-llama")
def build_llama_cmd(
    variant: Annotated[str, typer.Option(
        help="portable: the instruction sets that ran in a probe, never AMX; native: "
             "-march=native minus AMX (the benchmark's yardstick)")] = "portable",
    force: Annotated[bool, typer.Option(help="Rebuild even if a cached wheel exists")] = False,
    wheel_only: Annotated[bool, typer.Option(
        "--wheel-only", help="Build (or find) the cached wheel, print its path, install "
                             "nothing")] = False,
    jobs: Annotated[int | None, typer.Option(help="Parallel compile jobs")] = None,
    server: Annotated[bool, typer.Option(
        "--server", help="Also build llama.cpp's own llama-server with the same flags (for "
                         "--oracle llamaserver and crome serve --engine llama-server)")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Build llama-cpp-python for this CPU (instruction sets probed by running them; never
    AMX) into a cached wheel, and install it with its server extras."""
    from crome.oracle.build import (
        BuildOptions,
        build_server,
        build_wheel,
        install,
        plan,
        probe,
    )

    def log(line: str) -> None:
        if not quiet:
            typer.echo(line, err=True)

    result = probe()
    log(f"CPU probe: {result.summary()}")
    opts = BuildOptions(variant=variant, force=force, jobs=jobs)
    if wheel_only:
        typer.echo(build_wheel(opts, plan(opts, result), log).wheel)
        return
    info = install(opts, log)
    log(f"llama-cpp-python {info.version}: build {info.key} ({info.variant}), "
        f"{' '.join(a for a in info.cmake_args if a.endswith('=ON'))}")
    if server:
        log(f"llama-server: {build_server(opts, plan(opts, result), log)}")


@app.command("launch-config")
def launch_config_cmd(
    name: Annotated[str, typer.Argument(help="ddp, fsdp, zero2 or zero3")],
) -> None:
    """Print the path of a packaged accelerate config, for ``accelerate launch
    --config_file $(crome launch-config fsdp) -m crome.cli train ...``."""
    from crome.launch import config_path

    try:
        typer.echo(config_path(name))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command("doctor")
def doctor_cmd(
    data_dir: DataDirOpt = None,
    native_check: Annotated[bool, typer.Option(
        "--native-check/--no-native-check",
        help="Load the oracle model with llama.cpp in a child process")] = True,
    recheck: Annotated[bool, typer.Option(help="Ignore the cached llama.cpp check")] = False,
) -> None:
    """Check this machine for crome: versions, threads, bf16, CPU, llama.cpp, models, data,
    Chromium, disk. Exit status 1 when something the main job needs is missing."""
    from crome.doctor import DoctorOptions, exit_code, print_report, run_checks

    checks = run_checks(DoctorOptions(data_dir=data_dir, native_check=native_check,
                                      recheck=recheck))
    print_report(checks)
    raise typer.Exit(exit_code(checks))


def _csv(text: str | None, kind: type) -> tuple | None:  # type: ignore[type-arg]
    if text is None:
        return None
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated {kind.__name__}s, got {text!r}")


def experiment_cmd(
    preset: Annotated[str, typer.Option(
        help="quickstart (smallest, ~30 min on 2 cores), standard (all arms, tie:causal "
             "sweep), large (GPU cluster with a served oracle), shortcut (a planted "
             "preamble: does an arm refuse it?)")] = "quickstart",
    output_dir: Annotated[str | None, typer.Option(
        "--out", "-o", help="Run folder (default runs/<preset>); re-running resumes it")] = None,
    data_dir: DataDirOpt = None,
    arms: Annotated[str | None, typer.Option(
        help="Comma-separated arms: vanilla, rrm, causal-only, neutral-only, crome, "
             "crome-no-rewrite-ties, crome-nofilter, and the *-pairpm arms")] = None,
    seeds: Annotated[str | None, typer.Option(help="Comma-separated training seeds (≥3 for "
                                                   "CIs worth reading)")] = None,
    tie_ratios: Annotated[str | None, typer.Option(
        help="tie:causal sweep, e.g. 0.5,1,2: arms crome-ties-<r>x")] = None,
    causal_fractions: Annotated[str | None, typer.Option(
        help="learning curve over causal-pair counts, e.g. 0.25,0.5: arms "
             "crome-causal-<f>")] = None,
    max_train: Annotated[int | None, typer.Option(
        help="Original training pairs (seeded sample); 0 = all")] = None,
    max_eval: Annotated[int | None, typer.Option(
        help="First N pairs per held-out subset (RewardBench is always whole); 0 = all")] = None,
    backbone: Annotated[str | None, typer.Option(
        help="Every arm's backbone: HF folder or Hub id (default: the packaged MiniLM)")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank; 0 = full fine-tuning")] = None,
    max_length: int | None = None,
    pairwise_max_length: Annotated[int | None, typer.Option(
        help="Tokens for the prompt and both answers of the *-pairpm arms (default: 2 x "
             "--max-length)")] = None,
    epochs: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    tie_weight: Annotated[float | None, typer.Option(help="λ of the tie loss")] = None,
    shortcut: Annotated[str | None, typer.Option(
        help="Plant a feature in the training pairs: preamble or closer (the shortcut preset: "
             "preamble)")] = None,
    shortcut_rate: Annotated[float | None, typer.Option(
        help="Share of training pairs with the feature on the chosen answer (the rest: on "
             "the rejected one); default 0.95")] = None,
    oracle: Annotated[str | None, typer.Option(
        help="auto, llamacpp[:GGUF], hf[:FOLDER], openai:URL, rules (default auto)")] = None,
    oracle_model: Annotated[str | None, typer.Option("--oracle-model")] = None,
    cache: Annotated[str | None, typer.Option(help="Oracle cache (SQLite)")] = None,
    augment_pairs: Annotated[int | None, typer.Option(help="Pairs given causal rewrites")] = None,
    attributes: Annotated[int | None, typer.Option(
        help="Rubric attributes per pair (round-robin; 0 = all)")] = None,
    augment_max_chars: Annotated[int | None, typer.Option(
        help="Causal and paraphrase parents' longest answer in characters (quickstart and "
             "shortcut: 600); 0 = no limit")] = None,
    neutral_pairs: Annotated[int | None, typer.Option(help="Original pairs made neutral")] = None,
    paraphrase_pairs: Annotated[int | None, typer.Option(
        help="Original pairs whose two answers get a same-prompt paraphrase tie (paraphrase "
             "arms only; default 100)")] = None,
    tau: Annotated[float | None, typer.Option(
        help="Filter: keep preference pairs whose label the baseline gives P < tau")] = None,
    tie_tau: Annotated[float | None, typer.Option(
        help="Filter: keep ties where the baseline gives one answer P >= tie-tau "
             "(default 0.6)")] = None,
    validate: Annotated[bool | None, typer.Option(
        "--validate/--no-validate", help="The oracle checks each causal rewrite (default: "
        "on in the large preset only)")] = None,
    lookup_tokens: Annotated[int | None, typer.Option(
        help="llamacpp oracle: prompt-lookup speculative decoding, draft tokens (0 = off)")
    ] = None,
    rewardbench: Annotated[bool | None, typer.Option(
        "--rewardbench/--no-rewardbench", help="Evaluate on the full RewardBench")] = None,
    robustness: Annotated[bool | None, typer.Option(
        "--robustness/--no-robustness",
        help="Perturbations, best-of-N and the audit for every model")] = None,
    perturb_eval: Annotated[int | None, typer.Option(
        help="Perturbation suite: pairs per subset of LLMBar, helpful-base, GSM8K test")] = None,
    bon_questions: Annotated[int | None, typer.Option(help="Best-of-N: GSM8K questions")] = None,
    audit_probes: Annotated[int | None, typer.Option(help="Audit probes per source")] = None,
    bootstrap: Annotated[int | None, typer.Option(help="Bootstrap replicates")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
) -> None:
    """Arms × seeds over the same Crome stages, evaluated on held-out data with paired
    bootstrap CIs. `crome quickstart` is the quickstart preset.

    Every arm trains the same backbone on the same original pairs with the same seeds, plus:
    vanilla: nothing; rrm: RRM pairs (on-prompt answers beat an off-prompt one, two
    off-prompt answers tie); causal-only: the causal pairs the filter kept; neutral-only:
    the kept neutral pairs made from original pairs; crome: every kept causal and neutral
    pair (neutral copies of rewrites included); crome-no-rewrite-ties: crome without the
    neutral copies of rewrites; crome-nofilter: every causal and neutral pair, unfiltered;
    paraphrase-only: the kept same-prompt ties of an answer and the oracle's paraphrase of
    it; crome-paraphrase: crome plus those; crome-ties-<r>x (--tie-ratios): the kept
    causal pairs and r times as many kept neutral pairs; crome-causal-<f>
    (--causal-fractions): a nested fraction f of the kept causal pairs and every kept
    neutral pair; vanilla-pairpm, rrm-pairpm,
    crome-pairpm: pairwise preference models on the data of vanilla, rrm, crome (ties and
    neutral pairs are their "Same" class). The augmentation and the baseline
    (vanilla, first seed; also the filter's baseline) are made once and shared.

    Presets: quickstart (vanilla and crome, seeds 0,1,2, 600 training pairs, 12 pairs
    augmented by the local oracle; ~30 min on 2 CPU cores), standard (every arm, tie:causal
    sweep 1 and 4, 2,000 training pairs, 60 augmented), large (everything, 5 seeds, meant
    for `--oracle openai:URL` and `accelerate launch` on GPUs), shortcut (a polite preamble
    planted on the chosen answer of 95% of 1,000 training pairs; vanilla, neutral-only,
    paraphrase-only, causal-only, crome and crome-paraphrase, 5 seeds, evaluated on
    helpful-base clean and with the preamble on the rejected answer only).

    Writes results.json, results.md (figures and differences with CIs) and report/; every
    stage is cached, so re-running the same command resumes.
    """
    from crome.experiment import experiment, preset_options

    opts = preset_options(
        preset, output_dir=output_dir, data_dir=data_dir, arms=_csv(arms, str),
        seeds=_csv(seeds, int), tie_ratios=_csv(tie_ratios, float),
        causal_fractions=_csv(causal_fractions, float), backbone=backbone,
        lora_r=lora_r, max_length=max_length, pairwise_max_length=pairwise_max_length,
        epochs=epochs, batch_size=batch_size, lr=lr, tie_weight=tie_weight,
        shortcut=shortcut, shortcut_rate=shortcut_rate, oracle=oracle, oracle_model=oracle_model,
        cache=cache, augment_pairs=augment_pairs, attributes_per_pair=attributes,
        neutral_pairs=neutral_pairs, paraphrase_pairs=paraphrase_pairs, tau=tau,
        tie_tau=tie_tau, validate=validate,
        lookup_tokens=lookup_tokens,
        rewardbench=rewardbench, robustness=robustness, perturb_eval=perturb_eval,
        bon_questions=bon_questions, audit_probes=audit_probes, bootstrap=bootstrap,
        progress=progress)
    # 0 means "all" for the data limits, which None cannot say (it means "the preset's").
    if max_train is not None:
        opts.max_train = max_train or None
    if max_eval is not None:
        opts.max_eval = max_eval or None
    if augment_max_chars is not None:
        opts.augment_max_chars = augment_max_chars or None
    experiment(opts, echo=typer.echo)


def _reflowed(text: str) -> str:
    """Paragraphs of a docstring as single lines (rich keeps the docstring's line breaks)."""
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


app.command("experiment", help=_reflowed(experiment_cmd.__doc__ or ""))(experiment_cmd)
app.command("quickstart", help="The smallest preset of `crome experiment`: vanilla vs Crome, "
            "3 seeds, ~30 min on 2 CPU cores (same options).")(experiment_cmd)


def main(argv: list[str] | None = None) -> int:
    """Entry point: known errors become one line on stderr and exit status 2."""
    try:  # typer >= 0.2x raises its vendored copy of click's exceptions
        from typer._click.exceptions import ClickException
    except ImportError:  # older typer uses click itself
        from click.exceptions import ClickException

    from crome.data.schema import RecordError

    try:
        code = app(args=argv, standalone_mode=False)  # a typer.Exit(n) comes back as n
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("crome: aborted", err=True)
        return 130
    except ClickException as e:
        e.show()
        return e.exit_code
    except (RecordError, ValueError, OSError) as e:
        message = " ".join(str(e).split()) if isinstance(e, RecordError) else str(e)
        first = message.splitlines()[0] if message else type(e).__name__
        rest = message.splitlines()[1:]
        typer.echo(f"crome: error: {first}", err=True)
        for line in rest:  # multi-line hints (e.g. where to put the data) stay readable
            typer.echo(f"  {line}", err=True)
        return 2
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
