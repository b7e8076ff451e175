"""``crome experiment`` (and ``crome quickstart``, its smallest preset)."""

from __future__ import annotations

import json

import pytest

from crome.data.schema import PairRecord
from crome.experiment import (
    ARMS,
    PRESETS,
    Augmented,
    arm_data,
    comparisons,
    preset_options,
    results_markdown,
)


def _rec(i: int, recipe: str = "", label: str = "chosen", **provenance: str) -> PairRecord:
    return PairRecord(id=f"{recipe or 'orig'}/{i}", prompt=f"q{i}", chosen=f"a{i}",
                      rejected=f"b{i}", label=label,  # type: ignore[arg-type]
                      provenance={"recipe": recipe, **provenance} if recipe else {})


@pytest.fixture
def pools():
    originals = [_rec(i) for i in range(10)]
    causal = [_rec(i, "causal") for i in range(6)]
    # neutral copies: every 4th of a causal rewrite, the others of an original pair
    neutral = [_rec(i, "neutral", "tie",
                    parent_recipe="causal" if i % 4 == 0 else "original") for i in range(20)]
    rrm = [_rec(i, "rrm") for i in range(30)]
    paraphrase = [_rec(i, "paraphrase", "tie") for i in range(8)]
    # 3 of the 12 kept ties come from rewrites; 5 paraphrase ties kept
    kept = causal[:4] + neutral[:12] + paraphrase[:5]
    return originals, Augmented(causal, neutral, rrm, paraphrase, kept)


def test_each_arm_adds_its_own_share_of_the_augmented_pairs(pools):
    originals, aug = pools
    sizes = {arm: len(arm_data(arm, originals, aug, 0)) - len(originals) for arm in ARMS}
    assert sizes == {"vanilla": 0, "rrm": 30, "causal-only": 4, "neutral-only": 9,
                     "crome": 16, "crome-no-rewrite-ties": 13, "crome-nofilter": 26,
                     "paraphrase-only": 5, "crome-paraphrase": 21,
                     "vanilla-pairpm": 0, "rrm-pairpm": 30, "crome-pairpm": 16}
    # neutral-only holds no oracle rewrite: its ties all come from original pairs
    neutral_only = arm_data("neutral-only", originals, aug, 0)[10:]
    assert {r.provenance["parent_recipe"] for r in neutral_only} == {"original"}
    # the ablation is crome less exactly the ties made from rewrites
    crome = arm_data("crome", originals, aug, 0)
    ablation = arm_data("crome-no-rewrite-ties", originals, aug, 0)
    assert [r for r in crome if r not in ablation] == aug.kept_rewrite_ties()
    assert ("crome-no-rewrite-ties", "crome") in comparisons(list(ARMS))
    assert arm_data("crome-pairpm", originals, aug, 0) == arm_data("crome", originals, aug, 0)
    for arm in ARMS:
        assert arm_data(arm, originals, aug, 0)[:10] == originals


def test_the_tie_sweep_samples_r_times_the_kept_causal_pairs(pools):
    originals, aug = pools
    two = arm_data("crome-ties-2x", originals, aug, seed=0)[10:]
    assert sum(r.label == "tie" for r in two) == 8 and sum(r.label != "tie" for r in two) == 4
    # capped by what the filter kept; seeded
    assert len(arm_data("crome-ties-9x", originals, aug, 0)) == 10 + 4 + 12
    assert arm_data("crome-ties-2x", originals, aug, 0) == \
        arm_data("crome-ties-2x", originals, aug, 0)


def test_the_learning_curve_takes_nested_fractions_of_the_kept_causal_pairs(pools):
    originals, aug = pools
    causal = {f: [r for r in arm_data(f"crome-causal-{f:g}", originals, aug, seed=s)[10:]
                  if r.label != "tie"] for f, s in ((0.25, 0), (0.5, 1), (0.75, 2))}
    assert [len(c) for c in causal.values()] == [1, 2, 3]  # round(f × 4 kept causal pairs)
    assert causal[0.25] == causal[0.5][:1] and causal[0.5] == causal[0.75][:2]  # nested
    assert set(map(id, causal[0.75])) <= set(map(id, aug.kept_of("causal")))
    # every kept neutral pair, whatever the fraction
    half = arm_data("crome-causal-0.5", originals, aug, 0)[10:]
    assert sum(r.label == "tie" for r in half) == 12
    with pytest.raises(ValueError, match="between 0 and 1"):
        preset_options(causal_fractions=(1.0,))
    opts = preset_options(causal_fractions=(0.25, 0.5))
    assert opts.all_arms[-2:] == ["crome-causal-0.25", "crome-causal-0.5"]
    assert ("crome-causal-0.5", "vanilla") in comparisons(["vanilla", "crome",
                                                            "crome-causal-0.5"])


def test_presets_and_overrides():
    quick = preset_options("quickstart")
    assert quick.arms == ("vanilla", "crome") and len(quick.seeds) >= 3
    assert quick.output_dir == "runs/quickstart"
    std = preset_options("standard", seeds=(5, 6, 7), max_train=None)
    assert set(std.arms) == set(ARMS) and std.seeds == (5, 6, 7)
    assert std.max_train == PRESETS["standard"]["max_train"]  # None means "the preset's"
    assert std.all_arms[-len(std.tie_ratios):] == [f"crome-ties-{r:g}x" for r in std.tie_ratios]
    with pytest.raises(ValueError, match="unknown preset"):
        preset_options("huge")
    with pytest.raises(ValueError, match="unknown arm"):
        preset_options(arms=("vanilla", "magic"))
    with pytest.raises(ValueError, match="vanilla arm is required"):
        preset_options(arms=("crome",))
    with pytest.raises(ValueError, match="distinct"):
        preset_options(seeds=(1, 1))


def test_comparisons_are_those_whose_arms_ran():
    assert comparisons(["vanilla", "crome"]) == [("crome", "vanilla")]
    full = comparisons([*ARMS, "crome-ties-1x"])
    assert ("crome", "rrm") in full and ("causal-only", "crome") in full
    assert full[-1] == ("crome-ties-1x", "crome")


def test_results_markdown_shows_means_and_intervals():
    results = {
        "arms": {"vanilla": "", "crome": ""}, "options": {"seeds": [0, 1, 2]},
        "figures": {"acc (n=4)": {"scale": 100.0, "arms": {"vanilla": {"mean": 0.5},
                                                           "crome": {"mean": 0.625}}}},
        "differences": [{"figure": "acc (n=4)", "arm": "crome", "reference": "vanilla",
                         "diff": 0.125, "ci95": [-0.05, 0.3], "replicates": 1000}]}
    text = results_markdown(results)
    assert "| acc (n=4) | 50.0 | 62.5 |" in text
    assert "| acc (n=4) | +12.5 [-5.0, +30.0] |" in text


def test_help_documents_arms_seeds_and_presets(helpers):
    proc = helpers.run_cli("experiment", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for word in [*ARMS, *PRESETS, "--seeds", "--tie-ratios", "crome-ties-<r>x"]:
        assert word in text, word


@pytest.mark.slow
def test_quickstart_runs_arms_and_seeds_and_resumes(helpers, tmp_path):
    """The quickstart preset, small, with the packaged local oracle; a second run of the same
    command finds every stage done."""
    out = tmp_path / "qs"
    args = ("quickstart", "--out", out, "--max-train", "40", "--max-eval", "4",
            "--augment-pairs", "2", "--neutral-pairs", "12", "--tau", "0.99", "--seeds", "0,1",
            "--arms", "vanilla,rrm,crome,crome-pairpm", "--no-rewardbench", "--perturb-eval", "2",
            "--bon-questions", "6", "--audit-probes", "4", "--bootstrap", "200",
            "--no-progress")
    proc = helpers.run_cli(*args, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for n in range(1, 10):
        assert f"[{n}/9]" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    aug = results["augment"]
    assert aug["causal"]["tasks"] == 2 * 2  # 2 pairs × 1 attribute × 2 directions
    assert aug["causal"]["n_produced"] + aug["causal"]["n_failed"] == 4
    # the default --oracle auto: the backend its probe picked on this machine
    from crome.oracle.auto import cached_choice

    picked = cached_choice()
    assert picked is not None and aug["causal"]["oracle"].startswith(f"{picked.spec}:")
    assert not aug["causal"]["oracle_errors"]  # e.g. prompt lookup failing every long prompt
    n_causal = aug["causal"]["n_produced"]
    assert aug["neutral"]["n_produced"] == 12 + n_causal
    f = aug["filter"]
    assert f["kept"] + f["dropped"] == n_causal + aug["neutral"]["n_produced"]
    train = results["train"]
    for seed in ("0", "1"):
        assert train["vanilla"][seed]["pairs"] == 40
        assert train["crome"][seed]["pairs"] == 40 + f["kept"]
        assert train["rrm"][seed]["pairs"] == 40 + aug["rrm"]["n_produced"]
        assert train["crome-pairpm"][seed]["pairs"] == train["crome"][seed]["pairs"]
    pm = json.loads((out / "models" / "crome-pairpm" / "seed-0" / "crome.json").read_text())
    assert pm["pairwise"] and pm["max_length"] == 2 * 128
    figures = results["figures"]
    assert any(name.startswith("GSM8K best-of-16") for name in figures)
    assert any(name.startswith("GSM8K best-of-16, PairPMs by round-robin") for name in figures)
    assert any(name.startswith("perturbations, both sides") for name in figures)
    for fig in figures.values():
        assert set(fig["arms"]) == {"vanilla", "rrm", "crome", "crome-pairpm"}
        for cell in fig["arms"].values():
            assert len(cell["per_seed"]) == 2
            assert cell["mean"] == pytest.approx(sum(cell["per_seed"]) / 2)
    pairs = {(d["arm"], d["reference"]) for d in results["differences"]}
    assert pairs == {("crome", "vanilla"), ("crome", "rrm"), ("rrm", "vanilla"),
                     ("crome-pairpm", "crome")}
    for d in results["differences"]:
        assert d["ci95"][0] <= d["ci95"][1]
        assert d["replicates"] == 200 and d["seeds"] == 2
    md = (out / "results.md").read_text()
    assert "crome − vanilla" in md
    html = (out / "report" / "report.html").read_text()
    assert "Experiment: arms and confidence intervals" in html and "crome" in html
    for kind in ("results", "perturb", "bon", "audit"):
        for name in ("longer-wins", "vanilla", "crome"):
            assert (out / "seed-0" / "eval" / f"{kind}-{name}.json").exists(), (kind, name)
        assert (out / "seed-1" / "eval" / f"{kind}-rrm.json").exists()
        assert (out / "seed-1" / "eval" / f"{kind}-crome-pairpm.json").exists()
    bon = json.loads((out / "seed-0" / "eval" / "bon-crome-pairpm.json").read_text())
    assert bon["call"] == "comparison" and set(bon["methods"]) == {"knockout", "round-robin"}
    ev = json.loads((out / "seed-0" / "eval" / "results-crome-pairpm.json").read_text())
    assert all(0 <= v["consistency"] <= 1 for v in ev["sets"].values())
    again = helpers.run_cli(*args, timeout=1800)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training on" not in again.stdout + again.stderr
    assert "(0 done by an earlier run)" not in again.stdout
    assert json.loads((out / "results.json").read_text())["figures"] == figures


def test_the_shortcut_preset_plants_the_feature_and_reports_its_fall(helpers, tmp_path):
    """The shortcut preset, tiny, with the rules oracle (no causal rewrite applies to hh-rlhf,
    so crome adds ties only): the feature is planted, the twins are scored, and each arm's
    fall from clean to anti comes with paired differences."""
    out = tmp_path / "sc"
    proc = helpers.run_cli(
        "experiment", "--preset", "shortcut", "--out", out, "--oracle", "rules",
        "--max-train", "40", "--max-eval", "6", "--augment-pairs", "2", "--neutral-pairs", "12",
        "--seeds", "0,1", "--arms", "vanilla,neutral-only,crome", "--bootstrap", "100",
        "--no-progress", timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert "planted on the chosen answer of 38 and the rejected answer of 2" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["options"]["shortcut"] == "preamble"
    assert {"shortcut-anti", "shortcut-pro"} <= set(results["held_out"])
    names = list(results["figures"])
    fall = next(n for n in names if n.startswith("shortcut: fall from clean to anti"))
    anti = next(n for n in names if n.startswith("shortcut-anti"))
    assert not any(n.startswith(("perturbations", "GSM8K")) for n in names)  # no robustness
    cell = results["figures"][fall]["arms"]["vanilla"]
    clean = next(n for n in names if n.startswith("helpful-base (n="))
    for s, seed in enumerate(cell["per_seed"]):  # the fall is clean minus anti, per seed
        assert seed == pytest.approx(results["figures"][clean]["arms"]["vanilla"]["per_seed"][s]
                                     - results["figures"][anti]["arms"]["vanilla"]["per_seed"][s])
    diffs = {(d["figure"], d["arm"], d["reference"]) for d in results["differences"]}
    assert (fall, "crome", "vanilla") in diffs and (fall, "neutral-only", "crome") in diffs
    assert not (out / "seed-0" / "eval" / "perturb-vanilla.json").exists()


def test_a_run_folder_resumes_only_with_the_same_settings(tmp_path):
    from dataclasses import asdict

    from crome.experiment import check_resumable

    opts = preset_options(output_dir=str(tmp_path))
    (tmp_path / "options.json").write_text(json.dumps(asdict(opts)))
    check_resumable(tmp_path / "options.json", opts)
    check_resumable(tmp_path / "options.json",
                    preset_options(output_dir=str(tmp_path), seeds=(0, 1, 2, 3),
                                   arms=("vanilla", "rrm", "crome"), bootstrap=50))
    with pytest.raises(ValueError, match=r"max_train: 600 -> 900"):
        check_resumable(tmp_path / "options.json",
                        preset_options(output_dir=str(tmp_path), max_train=900))


def test_a_folder_made_before_an_option_existed_resumes_with_its_default(tmp_path):
    from dataclasses import asdict

    from crome.experiment import check_resumable

    opts = preset_options(output_dir=str(tmp_path))
    old = asdict(opts)
    del old["lora_r"], old["backbone"]  # options added later
    (tmp_path / "options.json").write_text(json.dumps(old))
    check_resumable(tmp_path / "options.json", opts)
    with pytest.raises(ValueError, match=r"lora_r: 0 -> 8"):
        check_resumable(tmp_path / "options.json",
                        preset_options(output_dir=str(tmp_path), lora_r=8))


def test_the_causal_subset_has_no_length_limit_unless_asked(helpers):
    from crome.experiment import augment_subset

    records = helpers.varied_pairs(30, seed=1)
    records[0].chosen = "long " * 400
    log: list[str] = []
    every = augment_subset(records, 30, None, 0, log)
    assert len(every) == 30 and log[-1] == "causal subset: 30 of 30 preference pairs"
    short = augment_subset(records, 30, 600, 0, log)
    assert len(short) == 29 and "(1 longer pairs not eligible)" in log[-1]
    assert preset_options("quickstart").augment_max_chars == 600
    assert preset_options("standard").augment_max_chars is None
    assert preset_options("large").augment_max_chars is None


def test_tie_tau_is_an_option_checked_before_any_work():
    assert preset_options(tie_tau=0.7).tie_tau == 0.7
    with pytest.raises(ValueError, match="tie_tau"):
        preset_options(tie_tau=0.3)


def test_a_seed_changes_the_initial_head_and_the_same_seed_gives_the_same_model(
        tmp_path, helpers, tiny_bert):
    """Every arm's seed reaches the model's initialisation, not only the data order."""
    import torch
    from safetensors.torch import load_file

    from crome.experiment import arm_train_options
    from crome.train import train

    records = helpers.varied_pairs(4, seed=2)
    opts = preset_options(output_dir=str(tmp_path), backbone=tiny_bert, max_length=32,
                          batch_size=4, lr=0.0, progress=False)

    def head(seed: int, name: str) -> dict[str, torch.Tensor]:
        to = arm_train_options(tmp_path / name, seed, opts)
        assert to.model.seed == 0  # the model options do not carry it: train() passes it on
        train(records, to)
        weights = load_file(tmp_path / name / "model.safetensors")
        return {k: v for k, v in weights.items() if k.startswith(("classifier", "score"))}

    first, again, other = head(0, "a"), head(0, "b"), head(1, "c")
    assert first and set(first) == set(other)
    assert all(torch.equal(first[k], again[k]) for k in first)  # lr 0: the initial head
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_every_arm_trains_the_chosen_backbone_with_lora(tmp_path):
    from crome.experiment import arm_train_options

    opts = preset_options(output_dir=str(tmp_path), backbone="some/decoder", lora_r=8,
                          batch_size=4)
    to = arm_train_options(tmp_path / "m", 1, opts)
    assert to.model.backbone == "some/decoder" and to.seed == 1 and to.batch_size == 4
    assert (to.model.lora.r, to.model.lora.alpha) == (8, 16)
    assert arm_train_options(tmp_path / "m", 0, preset_options()).model.lora is None
    pm = arm_train_options(tmp_path / "m", 0, preset_options(max_length=100), pairwise=True)
    assert pm.model.pairwise and pm.model.max_length == 200
    pm = arm_train_options(tmp_path / "m", 0, preset_options(pairwise_max_length=96),
                           pairwise=True)
    assert pm.model.max_length == 96
    assert not arm_train_options(tmp_path / "m", 0, preset_options()).model.pairwise
