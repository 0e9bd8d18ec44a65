"""Campaign specs and plans: validation messages, determinism, grid sizes, paired seeds."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest

import pytei
from pytei import models
from pytei.campaign import Point, SpecError, Trial, build_error, load_spec, parse_spec, plan
from pytei.campaign.plan import run_seed

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

BASE = """
name = "t"
seed = 0
runs = 2
targets = [{ component = "all", params = "weight" }, { component = "mlp", params = "weight" }]
sites = ["weights", "activations"]
mitigations = ["none", "clip", "protect-bits"]
metrics = ["auc", "rmse"]

[[models]]
checkpoint = "ckpts/a"
label = "a"

[[models]]
dummy = { mlp_depth = [1, 2], mlp_hidden = 64, embed_dim = [64, 128], sparsity = 0.01 }
samples = 64

[data]
split = "test"
max_rows = 100

[errors]
model = "BitFlip"
rates = [1e-6, 1e-4, 1e-2]
"""

# BASE with keys reordered, other spacing, comments and defaults written out or left out.
REORDERED = """
# same campaign, written differently
metrics = [ "auc", "rmse" ]
mitigations = ["none", "clip", "protect-bits"]   # paired
runs = 2
name = "t"
sites = ["weights", "activations"]
targets = [
  { params = "weight", component = "all" },
  { params = "weight", component = ["mlp"] },
]

[errors]
rates = [ 0.000001, 1e-4, 1.0e-2 ]
model = "BitFlip"

[data]
max_rows = 100

[[models]]
label = "a"
checkpoint = "./ckpts/../ckpts/a"

[[models]]
samples = 64
  [models.dummy]
  sparsity = [0.01]
  embed_dim = [64, 128]
  mlp_hidden = [64]
  mlp_depth = [1, 2]
  dense_dim = 128
"""


def variant(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.fixture
def base(tmp_path):
    return parse_spec(BASE, tmp_path)


# --- determinism ---------------------------------------------------------------------------------


def test_parsing_twice_gives_identical_trials(tmp_path):
    a, b = plan(parse_spec(BASE, tmp_path)), plan(parse_spec(BASE, tmp_path))
    assert a == b
    assert [t.trial_id for t in a] == [t.trial_id for t in b]


def test_formatting_key_order_and_comments_do_not_change_hash_or_ids(tmp_path):
    a, b = parse_spec(BASE, tmp_path), parse_spec(REORDERED, tmp_path)
    assert a.hash == b.hash
    assert [t.trial_id for t in plan(a)] == [t.trial_id for t in plan(b)]
    assert b.text == REORDERED and a.text == BASE


@pytest.mark.parametrize(
    "old, new",
    [
        ("runs = 2", "runs = 3"),
        ("seed = 0", "seed = 1"),
        ("1e-4,", "1e-3,"),
        ('label = "a"', 'label = "b"'),
        ("samples = 64", "samples = 65"),
        ("max_rows = 100", "max_rows = 0"),
        ('"clip", ', ""),
    ],
)
def test_any_value_change_changes_the_hash(tmp_path, old, new):
    assert parse_spec(variant(old, new), tmp_path).hash != parse_spec(BASE, tmp_path).hash


def test_trial_id_is_a_hash_of_the_content(base):
    trials = plan(base)
    ids = [t.trial_id for t in trials]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    assert len({hash(t) for t in trials}) == len(trials)  # hashable despite its dict fields


# --- grid sizes and order ------------------------------------------------------------------------


def test_count_is_the_grid_product_minus_memory_mitigations_on_activations(base):
    n_models, n_targets, n_rates, n_runs = 1 + 2 * 2, 2, 3, 2
    per_site = {"weights": 3, "activations": 2}  # protect-bits is skipped for activation faults
    trials = plan(base)
    assert len(trials) == n_models * n_targets * n_rates * n_runs * sum(per_site.values())
    assert not any(t.site == "activations" and t.mitigation == "protect-bits" for t in trials)
    assert {(t.site, t.mitigation) for t in trials} == {
        ("weights", "none"),
        ("weights", "clip"),
        ("weights", "protect-bits"),
        ("activations", "none"),
        ("activations", "clip"),
    }


def test_order_groups_by_model_and_keeps_paired_mitigations_adjacent(base):
    trials = plan(base)
    models_seen = [k for k, _ in itertools.groupby(t.model for t in trials)]
    assert models_seen == list(base.model_specs())  # each model in one contiguous block
    first = [t for t in trials if t.model == models_seen[0] and t.target == "all" and t.site == "weights"]
    assert [(t.rate, t.run, t.mitigation) for t in first[:6]] == [
        (1e-6, 0, "none"),
        (1e-6, 0, "clip"),
        (1e-6, 0, "protect-bits"),
        (1e-6, 1, "none"),
        (1e-6, 1, "clip"),
        (1e-6, 1, "protect-bits"),
    ]


def test_seeds_are_common_random_numbers(base):
    trials = plan(base)
    by_run: dict[int, set[int]] = {}
    for t in trials:
        by_run.setdefault(t.run, set()).add(t.seed)
    assert all(len(seeds) == 1 for seeds in by_run.values())  # same across models/targets/rates/mitigations
    assert len({s for seeds in by_run.values() for s in seeds}) == len(by_run)  # different across runs
    assert all(0 <= t.seed < 2**62 for t in trials)
    assert run_seed(0, 0) != run_seed(1, 0)


def test_points_group_the_runs_of_one_grid_point(base):
    trials = plan(base)
    groups: dict[Point, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.point, []).append(t)
    assert len(groups) == len(trials) // base.runs
    assert all(sorted(t.run for t in g) == list(range(base.runs)) for g in groups.values())


def test_runs_override_and_confidence_plan_max_runs(tmp_path, base):
    assert len(plan(base, runs=5)) == len(plan(base)) // 2 * 5
    conf = variant("runs = 2\n", "") + "\n[confidence]\nmetric = 'rmse'\nhalfwidth = 0.01\nmax_runs = 7\n"
    spec = parse_spec(conf, tmp_path)
    assert spec.runs == 7 and spec.confidence.min_runs == 5 and spec.confidence.level == 0.95
    assert max(t.run for t in plan(spec)) == 6
    with pytest.raises(ValueError, match="runs must be an int >= 1"):
        plan(base, runs=0)


def test_dummy_models_are_scored_by_rmse_only(base):
    metrics = {t.model.split(":")[0]: t.metrics for t in plan(base)}
    assert metrics == {"ckpt": ("auc", "rmse"), "dummy": ("rmse",)}


# --- models --------------------------------------------------------------------------------------


def test_table1_dummy_grid_expands_to_64_models():
    spec = load_spec(EXAMPLES / "dummy.toml")
    specs = spec.model_specs()
    assert len(specs) == 2 * 4 * 4 * 2
    configs = {
        (s["dummy"]["mlp_depth"], s["dummy"]["mlp_hidden"], s["dummy"]["embed_dim"], s["sparsity"])
        for s in specs.values()
    }
    assert configs == set(itertools.product([1, 2], [64, 128, 256, 512], [64, 128, 256, 512], [0.001, 0.01]))
    assert all(s["dummy"]["dense_dim"] == 128 and s["dummy"]["sparse_dim"] == 8192 for s in specs.values())
    assert "dummy:depth=2,hidden=256,embed=128,sparsity=0.01,samples=2048" in specs


def test_dummy_key_shows_non_default_input_shape(tmp_path):
    text = variant("sparsity = 0.01 }", "sparsity = 0.01, dense_dim = 16, sparse_dim = 32 }")
    keys = list(parse_spec(text, tmp_path).model_specs())
    assert "dummy:depth=1,hidden=64,embed=64,dense=16,sparse=32,sparsity=0.01,samples=64" in keys


def test_checkpoint_paths_resolve_against_the_spec_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.toml").write_text(BASE)
    spec = load_spec(tmp_path / "sub" / "c.toml")
    where = str((tmp_path / "sub" / "ckpts" / "a").resolve())
    assert spec.model_specs()[f"ckpt:{where}"] == {"checkpoint": where, "split": "test", "max_rows": 100}
    assert spec.model_labels() == {f"ckpt:{where}": "a"}


# --- rates ---------------------------------------------------------------------------------------


def test_log_grid_is_inclusive_and_rounded(tmp_path):
    grid = variant("[1e-6, 1e-4, 1e-2]", "{ start = 1e-9, stop = 1e-2, per_decade = 1 }")
    assert parse_spec(grid, tmp_path).errors.rates == (1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
    fine = parse_spec(
        variant("[1e-6, 1e-4, 1e-2]", "{ start = 1e-6, stop = 1e-4, per_decade = 2 }"), tmp_path
    )
    assert fine.errors.rates == (1e-6, float(f"{10**-5.5:.12g}"), 1e-5, float(f"{10**-4.5:.12g}"), 1e-4)


def test_bit_sets_give_one_point_per_set(tmp_path):
    text = variant('model = "BitFlip"', 'model = "BitFlip"\nbit_sets = [31, [30, 29], [23]]')
    spec = parse_spec(text, tmp_path)
    bits = [e["bits"] for _, e in spec.errors.points()]
    assert bits == [[31], [29, 30], [23]] * 3
    assert len(plan(spec)) == len(plan(parse_spec(BASE, tmp_path))) * 3


# --- validation ----------------------------------------------------------------------------------

BAD = [
    # (old, new, key path, words the message must contain)
    (
        "runs = 2",
        "runs = 2\nrnus = 3",
        "rnus",
        ["unknown key", "did you mean 'runs'", "allowed: name, seed, runs"],
    ),
    (
        'model = "BitFlip"',
        'model = "BitFlp"',
        "errors.model",
        ["one of BitFlip, Burst, FlipCount", "RandomValue, StuckAt", "got 'BitFlp'"],  # plugins may add more
    ),
    ("1e-4,", "1.5,", "errors.rates[1]", ["in [0, 1]", "1.5"]),
    ("runs = 2", "runs = 0", "runs", ["int >= 1", "got 0"]),
    (
        '"clip",',
        '"clipping",',
        "mitigations[1]",
        ["abft, clip, clip-profiled, clip-zero, ecc, none, protect-bits"],
    ),
    ('component = "mlp"', 'component = "mlps"', "targets[1].component", ["all, embedding, mlp, attention"]),
    ("seed = 0", 'seed = "zero"', "seed", ["must be an int", "'zero' (str)"]),
    ("mlp_hidden = 64", 'mlp_hidden = "64"', "models[1].dummy.mlp_hidden", ["must be an int >= 1"]),
    ("mlp_hidden = 64", "mlp_hidden = [64, 0.5]", "models[1].dummy.mlp_hidden[1]", ["int >= 1"]),
    ("mlp_depth = [1, 2]", "mlp_depth = [1, 3]", "models[1].dummy.mlp_depth[1]", ["int in 1..2"]),
    ("mlp_hidden = 64", "mlp_hiden = 64", "models[1].dummy.mlp_hiden", ["did you mean 'mlp_hidden'"]),
    ('model = "BitFlip"', 'model = "BitFlip"\nbits = [31, "30"]', "errors.bits[1]", ["int in 0..63"]),
    ('model = "BitFlip"', 'model = "BitFlip"\nbits = [64]', "errors.bits[0]", ["int in 0..63"]),
    ('model = "BitFlip"', 'model = "BitFlip"\nbits = [3, 3]', "errors.bits[1]", ["repeats errors.bits[0]"]),
    ('model = "BitFlip"', 'model = "BitFlip"\nbits = [1]\nbit_sets = [[2]]', "errors.bit_sets", ["not both"]),
    ('model = "BitFlip"', 'model = "BitFlip"\nlength = 2', "errors.length", ["allowed: model, rates, bits"]),
    ('model = "BitFlip"', 'model = "StuckAt"', "errors.value", ["required"]),
    ('model = "BitFlip"', 'model = "StuckAt"\nvalue = 2', "errors.value", ["int in 0..1"]),
    ('model = "BitFlip"', 'model = "FlipCount"', "errors.rates[0]", ["int >= 0", "1e-06"]),
    ('model = "BitFlip"', 'model = "RandomValue"\nlow = 1.0\nhigh = -1.0', "errors", ["low < high"]),
    ("[1e-6, 1e-4, 1e-2]", "[1e-6, 1e-4, 1e-6]", "errors.rates[2]", ["repeats errors.rates[0]"]),
    ("[1e-6, 1e-4, 1e-2]", "{ start = 1e-9, stop = 5e-3 }", "errors.rates.stop", ["not on the grid"]),
    ("[1e-6, 1e-4, 1e-2]", "{ start = 0, stop = 1e-3 }", "errors.rates.start", ["in (0, 1]"]),
    ("[1e-6, 1e-4, 1e-2]", "[]", "errors.rates", ["must not be empty"]),
    ('sites = ["weights", "activations"]', 'sites = ["weight"]', "sites[0]", ["weights, activations"]),
    ('metrics = ["auc", "rmse"]', 'metrics = ["AUC"]', "metrics[0]", ["auc, logloss, rmse"]),
    ('metrics = ["auc", "rmse"]', 'metrics = ["auc"]', "metrics", ["dummy model", "rmse"]),
    ('params = "weight" }]', 'params = "weights" }]', "targets[1].params", ["weight, bias, all"]),
    ('component = "mlp", params = "weight"', 'component = "all"', "targets[1]", ["repeats targets[0]"]),
    ('split = "test"', 'split = "train"', "data.split", ["test, valid"]),
    ('label = "a"', 'label = "a"\ndummy = {}', "models[0]", ["exactly one of checkpoint", "dummy"]),
    ('label = "a"', 'label = "a"\nsamples = 5', "models[0].samples", ["allowed: checkpoint, label"]),
    ('name = "t"', "", "name", ["required"]),
    ('name = "t"', "name = ", "", ["not valid TOML"]),
]


@pytest.mark.parametrize("old, new, path, words", BAD, ids=[b[2] or "toml" for b in BAD])
def test_bad_specs_are_rejected_naming_the_key_and_the_allowed_values(tmp_path, old, new, path, words):
    with pytest.raises(SpecError) as info:
        parse_spec(variant(old, new), tmp_path)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(f"{path}: " if path else "not valid TOML")
    for word in words:
        assert word in message


def test_top_level_key_below_a_table_gets_a_toml_hint(tmp_path):
    with pytest.raises(
        SpecError,
        match=r"errors.sites: .*below a \[errors\] header belong to it: put sites above the first table",
    ):
        parse_spec(BASE + 'sites = ["weights"]\n', tmp_path)


def test_runs_conflicts_with_confidence_and_metric_must_be_measured(tmp_path):
    with pytest.raises(SpecError, match="^runs: conflicts with"):
        parse_spec(BASE + "\n[confidence]\nmetric = 'auc'\nhalfwidth = 0.01\n", tmp_path)
    no_runs = variant("runs = 2\n", "")
    with pytest.raises(SpecError, match="^confidence.metric: must be one of metrics"):
        parse_spec(no_runs + "\n[confidence]\nmetric = 'logloss'\nhalfwidth = 0.01\n", tmp_path)
    with pytest.raises(SpecError, match="^confidence.metric: .*dummy model"):
        parse_spec(no_runs + "\n[confidence]\nmetric = 'auc'\nhalfwidth = 0.01\n", tmp_path)
    with pytest.raises(SpecError, match=r"^confidence.max_runs: must be an int >= 5"):
        parse_spec(no_runs + "\n[confidence]\nmetric = 'rmse'\nhalfwidth = 0.01\nmax_runs = 3\n", tmp_path)


def test_duplicate_models_and_all_skipped_trials_are_rejected(tmp_path):
    twice = BASE + '\n[[models]]\ncheckpoint = "ckpts/a/../a"\n'
    with pytest.raises(SpecError, match=r"^models\[2\]: model ckpt:.* is also in models\[0\]"):
        parse_spec(twice, tmp_path)
    only_memory = variant('"none", "clip", "protect-bits"', '"protect-bits", "ecc"')
    only_memory = variant('["weights", "activations"]', '["activations"]', only_memory)
    with pytest.raises(SpecError, match="^mitigations: .*every trial would be skipped"):
        parse_spec(only_memory, tmp_path)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_every_example_parses_and_plans(path):
    spec = load_spec(path)
    trials = plan(spec)
    assert trials and len({t.trial_id for t in trials}) == len(trials)


def test_example_sizes():
    assert len(plan(load_spec(EXAMPLES / "quick.toml"))) == 4 * 3 * 2 * 4 * 3 * 2
    assert len(plan(load_spec(EXAMPLES / "dummy.toml"))) == 64 * 3 * 8 * 10
    paper = load_spec(EXAMPLES / "paper.toml")
    assert len(paper.model_specs()) == 15 and paper.errors.rates[0] == 1e-9 and paper.errors.rates[-1] == 1e-2
    assert len(plan(paper)) == 15 * 3 * 8 * 10 * 3


# --- error models --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "errors, expected",
    [
        ('model = "BitFlip"\nrates = [1e-3]\nbits = [31, 30]', pytei.BitFlip(1e-3, bits=(30, 31))),
        ('model = "StuckAt"\nrates = [1e-3]\nvalue = 1\nbits = 31', pytei.StuckAt(1e-3, 1, bits=(31,))),
        (
            'model = "RandomValue"\nrates = [0]\nlow = -2\nhigh = 2',
            pytei.RandomValue(0.0, low=-2.0, high=2.0),
        ),
        ('model = "Burst"\nrates = [1e-3]\nlength = 3', pytei.Burst(1e-3, length=3)),
        ('model = "FlipCount"\nrates = [5]', pytei.FlipCount(5)),
    ],
)
def test_build_error_round_trips_every_error_model(tmp_path, errors, expected):
    text = BASE[: BASE.index("[errors]")] + "[errors]\n" + errors + "\n"
    trial = plan(parse_spec(text, tmp_path))[0]
    assert build_error(trial) == expected
    assert build_error(json.loads(json.dumps(trial.error))) == expected  # survives a JSON store
    assert trial.error["model"] == type(expected).__name__
    assert trial.rate == next(v for k, v in trial.error.items() if k in ("ber", "rate", "k"))


def test_build_error_rejects_unknown_models():
    with pytest.raises(ValueError, match="unknown error model 'BitRates'"):
        build_error({"model": "BitRates", "rates": {31: 1e-3}})


# --- targets and the injector --------------------------------------------------------------------

SMALL = """
name = "small"
runs = 1
targets = "per-parameter"
metrics = ["rmse"]
[[models]]
dummy = { mlp_hidden = 8, embed_dim = 4, dense_dim = 8, sparse_dim = 32 }
samples = 16
[errors]
model = "BitFlip"
rates = [0.01]
"""


def _build(model_spec: dict):
    return models.create("dummy", seed=0, **model_spec["dummy"])


def test_per_parameter_targets_need_and_use_parameter_names(tmp_path):
    spec = parse_spec(SMALL, tmp_path)
    with pytest.raises(ValueError, match="per-parameter"):
        plan(spec)
    specs = spec.model_specs()

    def names(key: str) -> list[str]:
        return [n for n, _ in _build(specs[key]).named_parameters()]

    trials = plan(spec, parameter_names=names)
    model = _build(specs[trials[0].model])
    assert [t.target for t in trials] == names(trials[0].model)
    for t in trials:
        with pytei.inject(model, build_error(t), site=t.site, seed=t.seed, **t.target_spec) as report:
            assert set(report.per_parameter) == {t.target}


def test_target_specs_select_through_the_injector(tmp_path):
    text = variant(
        'targets = "per-parameter"',
        'targets = ["all", { component = "mlp", exclude = ["predictor.*"] }]',
        SMALL,
    )
    spec = parse_spec(text, tmp_path)
    trials = plan(spec)
    assert [t.target for t in trials] == ["all", "mlp[-predictor.*]"]
    model = _build(next(iter(spec.model_specs().values())))
    selected = {}
    for t in trials:
        with pytei.inject(model, build_error(t), site=t.site, seed=t.seed, **t.target_spec) as report:
            selected[t.target] = set(report.per_parameter)
    assert selected["all"] == {n for n, _ in model.named_parameters()}
    assert selected["mlp[-predictor.*]"] == {"bottom_mlp.0.weight", "bottom_mlp.0.bias"}
    assert math.isclose(trials[0].rate, 0.01)


# --- registered names with options ---------------------------------------------------------------


def test_mitigations_take_options_checked_against_the_object(tmp_path):
    text = variant(
        'mitigations = ["none", "clip", "protect-bits"]',
        'mitigations = ["none", "clip", { name = "clip", low = -4, high = 4 }, '
        '{ name = "abft", max_retries = 1, fallback = "zero", label = "abft-1" }, '
        '{ name = "ecc", on_detect = "flag" }]',
    )
    spec = parse_spec(text, tmp_path)
    labels = [m.label for m in spec.mitigations]
    assert labels == ["none", "clip", "clip(low=-4, high=4)", "abft-1", "ecc(on_detect=flag)"]
    assert spec.mitigations[2].options == (("low", -4.0), ("high", 4.0))  # ints become the hinted floats
    trials = plan(spec)
    by_label = {t.mitigation: t for t in trials if t.run == 0 and t.rate == 1e-6}
    assert by_label["clip(low=-4, high=4)"].mitigation_name == "clip"
    assert by_label["clip(low=-4, high=4)"].mitigation_options == {"low": -4.0, "high": 4.0}
    assert by_label["abft-1"].mitigation_options == {"max_retries": 1, "fallback": "zero"}
    # ecc acts on stored tensors only: no activation trials for it
    assert not [t for t in trials if t.mitigation == "ecc(on_detect=flag)" and t.site == "activations"]
    # plain names keep their trial ids: the options enter the hash only where there are some
    plain = {t.trial_id for t in plan(parse_spec(BASE, tmp_path)) if t.mitigation in ("none", "clip")}
    assert plain <= {t.trial_id for t in trials}
    assert len({t.trial_id for t in trials}) == len(trials)


@pytest.mark.parametrize(
    "entry, path, words",
    [
        (
            '{ name = "clip", hgh = 4 }',
            "mitigations[1].hgh",
            ["mitigation 'clip' has no option 'hgh'", "'high'"],
        ),
        (
            '{ name = "clip", high = "4" }',
            "mitigations[1].high",
            ["option 'high' must be float", "'4' (str)"],
        ),
        (
            '{ name = "abft", fallback = "bogus" }',
            "mitigations[1]",
            ["unknown ABFT fallback 'bogus'", "keep, zero"],
        ),
        ("{ low = 1 }", "mitigations[1].name", ["required: one of", "clip"]),
        ('{ name = "clipp" }', "mitigations[1].name", ["must be one of", "clip-profiled"]),
        ("3", "mitigations[1]", ["must be a mitigation name or a table"]),
    ],
)
def test_bad_mitigation_options_name_the_key_the_object_and_what_is_allowed(tmp_path, entry, path, words):
    text = variant('mitigations = ["none", "clip", "protect-bits"]', f'mitigations = ["none", {entry}]')
    with pytest.raises(SpecError) as info:
        parse_spec(text, tmp_path)
    assert info.value.path == path
    for word in words:
        assert word in str(info.value)


def test_repeated_mitigation_labels_are_refused(tmp_path):
    text = variant('"none", "clip", "protect-bits"', '"none", "clip", { name = "clip" }')
    with pytest.raises(SpecError, match=r"mitigations\[2\]: repeats mitigations\[1\]"):
        parse_spec(text, tmp_path)


def test_trial_kinds_are_set_at_plan_time(tmp_path):
    spec = parse_spec(
        variant("rates = [1e-6, 1e-4, 1e-2]", "rates = [1e-6]\nbit_sets = [[30], [0, 1]]"), tmp_path
    )
    assert {t.kind for t in plan(spec)} == {"bits"}
    named = variant(
        'targets = [{ component = "all", params = "weight" }, { component = "mlp", params = "weight" }]',
        'targets = [{ component = "mlp", label = "v1.2" }, "per-parameter"]',
    )
    spec = parse_spec(named, tmp_path)
    trials = plan(spec, parameter_names=lambda key: ["a.weight", "b.bias"])
    kinds = {(t.target, t.kind) for t in trials}
    assert kinds == {("v1.2", "component"), ("a.weight", "parameter"), ("b.bias", "parameter")}
    assert {t.label for t in trials if t.model.startswith("ckpt:")} == {"a"}  # the spec's label travels


# --- table fields ----------------------------------------------------------------------------------


def test_a_target_can_select_table_fields(tmp_path):
    text = variant(
        '{ component = "mlp", params = "weight" }',
        '{ component = "embedding", fields = ["scale", "bias"] }',
    )
    spec = parse_spec(text, tmp_path)
    target = spec.targets[1]
    assert target.name == "embedding.scale+bias" and target.fields == ("scale", "bias")
    assert target.selection()["fields"] == ["scale", "bias"]
    assert "fields" not in spec.targets[0].selection()  # trials of specs without fields keep their identity
    codes = variant('fields = ["scale", "bias"]', 'fields = ["codes"]', text)
    assert spec.hash != parse_spec(codes, tmp_path).hash


def test_an_unknown_field_names_the_key_and_what_is_allowed(tmp_path):
    mlp, bad = '{ component = "mlp", params = "weight" }', '{ component = "embedding", fields = ["exp"] }'
    text = variant(mlp, bad)
    with pytest.raises(SpecError, match=r"targets\[1\]\.fields.*codes, scale, bias, padding"):
        parse_spec(text, tmp_path)


def test_bounded_targets_are_planned_with_the_indices_site_only(tmp_path):
    text = variant('sites = ["weights", "activations"]', 'sites = ["weights", "indices"]')
    text = variant(
        '{ component = "mlp", params = "weight" }', '{ component = "embedding", bounds = "skip" }', text
    )
    spec = parse_spec(text, tmp_path)
    assert spec.targets[1].name == "embedding@skip" and spec.targets[1].selection()["bounds"] == "skip"
    trials = plan(spec)
    bounded = [t for t in trials if t.target == "embedding@skip"]
    assert bounded and {t.site for t in bounded} == {"indices"}
    assert {t.mitigation for t in trials if t.site == "indices"} == {"none", "clip"}  # no memory-side ones
    from pytei.campaign.plan import count_trials

    assert count_trials(spec) == len(trials)
    no_indices = variant('sites = ["weights", "indices"]', 'sites = ["weights"]', text)
    with pytest.raises(SpecError, match=r'needs "indices" in sites'):
        parse_spec(no_indices, tmp_path)


# --- sharded models and host faults (pytei.distributed) ---------------------------------------------

SHARDED = """
name = "s"
runs = 3
targets = ["embedding"]
mitigations = ["none", "clip"]
host_faults = [
    "HostSDC",
    { name = "HostLoss", fill = "mean" },
    { name = "HostLoss", recover = "xor", group = 2, ranks = [1, 3] },
    { name = "HostSlow", delay_ms = 5 },
]

[[models]]
sharded = "ckpt"
strategies = ["table_wise", "data_parallel"]
world_sizes = [2, 4]

[[models]]
checkpoint = "plain"

[errors]
model = "BitFlip"
rates = [1e-4, 1e-3]
"""


def test_a_sharded_model_is_one_model_per_strategy_and_world_with_its_host_faults(tmp_path):
    from pytei.campaign.plan import count_trials, fault_label

    spec = parse_spec(SHARDED, tmp_path)
    sharded = [k for k in spec.model_specs() if k.startswith("sharded:")]
    ckpt = tmp_path / "ckpt"
    assert sharded == [f"sharded:{ckpt}:{s} x{w}" for w in (2, 4) for s in ("table_wise", "data_parallel")]
    trials = plan(spec)
    assert len(trials) == count_trials(spec) == len({t.trial_id for t in trials})
    by_model = {k: [t for t in trials if t.model == k] for k in spec.model_specs()}
    # a plain checkpoint: 2 rates x 3 runs x 2 mitigations; no host faults
    assert len(by_model[f"ckpt:{tmp_path / 'plain'}"]) == 12
    for key in sharded:
        world = spec.model_specs()[key]["world_size"]
        mine = by_model[key]
        glob_ = [t for t in mine if t.site == "weights"]
        assert len(glob_) == 2 * 3 and {t.mitigation for t in glob_} == {"none"}  # no clip on ranks
        host = [t for t in mine if t.site == "host"]
        sdc = [t for t in host if t.error["model"] == "HostSDC"]
        assert len(sdc) == world * 2 * 3  # every rank, rate and run
        assert {json.dumps(t.error["error"], sort_keys=True) for t in sdc} == {
            json.dumps(g.error, sort_keys=True) for g in glob_
        }  # the same error points as the global trials, so a host's faults are a subset of theirs
        assert {(t.run, t.seed) for t in sdc} == {(t.run, t.seed) for t in glob_}  # common seeds
        loss = [t for t in host if t.error["model"] == "HostLoss"]
        mean = [t for t in loss if t.mitigation == "none"]
        assert [(t.error["rank"], t.run, t.rate) for t in mean] == [(r, 0, 0.0) for r in range(world)]
        parity = [t for t in loss if t.mitigation == "xor/g2"]
        assert [t.error["rank"] for t in parity] == [r for r in (1, 3) if r < world]
        slow = [t for t in host if t.error["model"] == "HostSlow"]
        assert len(slow) == world * 3  # latency samples: every run
        assert fault_label(mean[0].error) == "HostLoss(rank=0, fill=mean)"
        assert fault_label(slow[0].error) == "HostSlow(rank=0, delay_ms=5, jitter_ms=0)"
        assert {t.target for t in host} == {"embedding"}


def test_a_stale_host_reads_a_checkpoint_relative_to_the_spec(tmp_path):
    (tmp_path / "old").mkdir()
    text = variant(
        '    { name = "HostSlow", delay_ms = 5 },', '    { name = "HostStale", checkpoint = "old" },', SHARDED
    )
    spec = parse_spec(text, tmp_path)
    assert spec.host_checkpoints() == [str(tmp_path / "old")]
    stale = [t for t in plan(spec) if t.error["model"] == "HostStale"]
    assert stale and {t.error["checkpoint"] for t in stale} == {str(tmp_path / "old")}
    assert spec.hash != parse_spec(SHARDED, tmp_path).hash


HOSTS = '    { name = "HostSlow", delay_ms = 5 },'
BAD_SHARDED = [
    (HOSTS, '    "HostBogus",', "host_faults[3].name", ["one of HostLoss, HostSDC, HostSlow, HostStale"]),
    (HOSTS, '    { name = "HostLoss", fill = "bogus" },', "host_faults[3]", ["fill 'bogus'", "zeros, mean"]),
    (
        HOSTS,
        '    { name = "HostLoss", colour = 1 },',
        "host_faults[3].colour",
        ["no option 'colour'", "fill"],
    ),
    (HOSTS, '    { name = "HostSlow" },', "host_faults[3]", ["HostSlow", "delay_ms"]),
    (HOSTS, '    { name = "HostSlow", delay_ms = -1 },', "host_faults[3]", ["milliseconds in [0, 60000)"]),
    (
        HOSTS,
        '    { name = "HostStale", checkpoint = "nowhere" },',
        "host_faults[3]",
        ["not a checkpoint folder"],
    ),
    (HOSTS, '    { name = "HostLoss", recover = "xor", group = 1 },', "host_faults[3]", ["int >= 2"]),
    (HOSTS, '    { name = "HostLoss", group = 2 },', "host_faults[3]", ["needs recover='xor' or 'sum'"]),
    (
        HOSTS,
        '    { name = "HostSlow", delay_ms = 5, ranks = [4] },',
        "host_faults[3].ranks",
        ["sizes up to 4"],
    ),
    ('"data_parallel"]', '"row_wise"]', "models[0].strategies[1]", ["'row_wise' needs GPUs"]),
    (
        '"data_parallel"]',
        '"diagonal"]',
        "models[0].strategies[1]",
        ["unknown sharding strategy", "table_wise"],
    ),
    ("world_sizes = [2, 4]", "world_sizes = [0]", "models[0].world_sizes[0]", ["int in 1..64"]),
    (
        HOSTS,
        '    { name = "HostLoss", hosts = 3 },',
        "host_faults[3]",
        ["hosts 3 is larger than the world of 2"],
    ),
    (
        HOSTS,
        '    { name = "HostLoss", replicas = 3 },',
        "host_faults[3]",
        ["replicas needs recover='replica'"],
    ),
    ("world_sizes = [2, 4]", "latency = { batch = 0 }", "models[0].latency.batch", [">= 1"]),
    ("world_sizes = [2, 4]", "hosts = 2", "models[0].hosts", ["allowed: sharded, strategies"]),
    ("[errors]", '[data]\nsplit = "valid"\n[errors]', "data.split", ["models[0] is sharded", "test split"]),
]


@pytest.mark.parametrize(
    "old, new, path, words", BAD_SHARDED, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_SHARDED)]
)
def test_bad_host_faults_and_sharded_models_are_rejected_naming_the_key(tmp_path, old, new, path, words):
    with pytest.raises(SpecError) as info:
        parse_spec(variant(old, new, SHARDED), tmp_path)
    assert info.value.path == path
    for word in words:
        assert word in str(info.value)


def test_host_faults_need_a_sharded_model_and_a_sharded_model_needs_trials(tmp_path):
    with pytest.raises(SpecError, match="^host_faults: host faults need a sharded model"):
        parse_spec(
            BASE.replace('metrics = ["auc", "rmse"]', 'metrics = ["auc", "rmse"]\nhost_faults = ["HostSDC"]')
        )
    alone = (
        SHARDED.split("host_faults")[0]
        + "\n[[models]]\nsharded = 'ckpt'\n[errors]\nmodel = 'BitFlip'\nrates = [1e-3]\n"
    )
    parse_spec(alone, tmp_path)  # global trials only: fine
    with pytest.raises(SpecError, match=r"^models\[0\]: a sharded model .* would get no trial"):
        parse_spec(alone.replace('mitigations = ["none", "clip"]', 'mitigations = ["clip"]'), tmp_path)
