"""The model zoo: registry, forward/backward, component tags, parameter counts, torch.fx tracing."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from pytei import models
from pytei.models import create, dummy_inputs, names, register
from pytei.models.dlrm import DotInteraction
from pytei.models.layers import (
    AttentionalFactorizationMachine,
    FactorizationMachine,
    RecModel,
    flat_pair_indices,
    pair_indices,
)

ALLOWED_TAGS = {"embedding", "mlp", "attention", "interaction", "linear"}
CTR_MODELS = ("fm", "dfm", "afm", "dcn", "wd")
#: The zoo's TorchRec models (KJT inputs, optional extra): tests/test_torchrec_models.py covers them.
TORCHREC_MODELS = ("dcnv2", "dlrm-torchrec")
#: The models these tests build and trace (torch.fx.symbolic_trace cannot trace a KJT's EBC lookups).
ZOO = [name for name in names() if name not in TORCHREC_MODELS]
BATCH = 6

#: Small configs that exercise every model; each field has a few values.
TINY: dict[str, dict] = {
    **{name: {"field_dims": [5, 7, 3]} for name in CTR_MODELS},
    "dlrm": {"field_dims": [5, 7, 3], "dense_dim": 4, "embed_dim": 8, "bottom_mlp": [16, 8], "top_mlp": [16]},
    "dummy": {"dense_dim": 12, "sparse_dim": 64, "mlp_depth": 2, "mlp_hidden": 16, "embed_dim": 8, "seed": 0},
}


def _indices(field_dims: list[int], gen: torch.Generator, batch: int = BATCH) -> torch.Tensor:
    cols = [torch.randint(0, d, (batch,), generator=gen) for d in field_dims]
    return torch.stack(cols, dim=1)


def make_inputs(model: nn.Module, seed: int = 0, batch: int = BATCH) -> tuple[torch.Tensor, ...]:
    """A batch of ``batch`` valid inputs for ``model``, according to its ``input_layout``."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    if model.input_layout == "categorical":
        return (_indices(cfg["field_dims"], gen, batch),)
    if model.input_layout == "dense+sparse":
        return torch.randn(batch, cfg["dense_dim"], generator=gen), _indices(cfg["field_dims"], gen, batch)
    assert model.input_layout == "dummy"
    return dummy_inputs(batch, cfg["dense_dim"], cfg["sparse_dim"], sparsity=0.1, seed=seed)


def component_of(model: nn.Module, param_name: str) -> str | None:
    """``pytei_component`` of the nearest module on the parameter's dotted path (its own module first)."""
    chain = [model]
    for part in param_name.split(".")[:-1]:
        chain.append(getattr(chain[-1], part))
    return next((m.pytei_component for m in reversed(chain) if hasattr(m, "pytei_component")), None)


@pytest.fixture(params=sorted(TINY))
def tiny_model(request: pytest.FixtureRequest) -> nn.Module:
    torch.manual_seed(0)
    return create(request.param, **TINY[request.param])


# --- registry --------------------------------------------------------------------------------------


def test_names_lists_every_model() -> None:
    assert names() == sorted([*TINY, *TORCHREC_MODELS])
    for name in ZOO:
        cls = type(create(name, **TINY[name]))
        assert cls.name == name
        assert cls.input_layout in models.INPUT_LAYOUTS


def test_unknown_name_lists_allowed() -> None:
    allowed = "afm, dcn, dcnv2, dfm, dlrm, dlrm-torchrec, dummy, fm, wd"
    with pytest.raises(ValueError, match=f"unknown model 'nope'; registered: {allowed}"):
        create("nope")


def test_unknown_config_key_is_named() -> None:
    match = r"unknown config keys \['mlp_dims'\]; accepted: field_dims, embed_dim"
    with pytest.raises(TypeError, match=match):
        create("fm", field_dims=[3, 4], mlp_dims=[8])


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        ("fm", {"field_dims": []}, "field_dims must be a non-empty sequence"),
        ("dfm", {"field_dims": [3, 0]}, r"field_dims\[1\] must be an int >= 1, got 0"),
        ("wd", {"field_dims": [3], "embed_dim": -2}, "embed_dim must be an int >= 1, got -2"),
        ("dcn", {"field_dims": [3], "num_layers": 0}, "num_layers must be an int >= 1, got 0"),
        ("dcn", {"field_dims": [3], "dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1.0"),
        ("afm", {"field_dims": [3], "dropouts": [0.1]}, "dropouts must be two probabilities"),
        ("afm", {"field_dims": [3], "attn_size": True}, "attn_size must be an int >= 1, got True"),
        ("dummy", {"mlp_depth": 0}, "mlp_depth must be an int >= 1, got 0"),
        ("dummy", {"mlp_hidden": 0}, "mlp_hidden must be an int >= 1, got 0"),
        ("dlrm", {"field_dims": [3, 4], "bottom_mlp": [64, 32]}, "bottom_mlp must end in embed_dim=16"),
        ("dlrm", {"field_dims": [3], "dense_dim": 0}, "at least two vectors"),
        ("dlrm", {"field_dims": [3], "top_mlp": "64"}, "top_mlp must be a non-empty sequence"),
    ],
)
def test_bad_config_is_refused(name: str, config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create(name, **config)


def test_missing_field_dims_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="field_dims"):
        create("dfm")


def test_register_refuses_duplicates_and_bad_layouts() -> None:
    with pytest.raises(ValueError, match="'fm' is already registered"):
        register("fm")(type(create("wd", field_dims=[3])))

    class NoLayout(RecModel):
        pass

    with pytest.raises(ValueError, match="input_layout must be in"):
        register("no_layout")(NoLayout)
    assert "no_layout" not in names()


# --- forward, backward, config ----------------------------------------------------------------------


def test_forward_backward(tiny_model: nn.Module) -> None:
    tiny_model.train()
    out = tiny_model(*make_inputs(tiny_model))
    assert out.shape == (BATCH,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    nn.functional.binary_cross_entropy_with_logits(out, torch.ones(BATCH)).backward()
    for name, p in tiny_model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


def test_config_round_trips_through_json(tiny_model: nn.Module) -> None:
    config = json.loads(json.dumps(tiny_model.config))
    clone = create(tiny_model.name, **config)
    assert type(clone) is type(tiny_model) and clone.config == tiny_model.config
    shapes = {n: p.shape for n, p in tiny_model.named_parameters()}
    assert {n: p.shape for n, p in clone.named_parameters()} == shapes
    clone.load_state_dict(tiny_model.state_dict())  # strict: same keys, offsets buffers not saved


def test_config_is_a_copy(tiny_model: nn.Module) -> None:
    tiny_model.config.clear()
    assert tiny_model.config == create(tiny_model.name, **TINY[tiny_model.name]).config


def test_offsets_are_non_persistent_buffers() -> None:
    model = create("dfm", field_dims=[5, 7, 3])
    buffers = dict(model.named_buffers())
    assert torch.equal(buffers["embedding.offsets"], torch.tensor([0, 5, 12]))
    assert torch.equal(buffers["linear.offsets"], torch.tensor([0, 5, 12]))
    assert not any(k.endswith("offsets") for k in model.state_dict())


def test_index_inputs_are_checked() -> None:
    model = create("wd", field_dims=[5, 7, 3])
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \[batch, 3\], got \(6, 2\)"):
        model(torch.zeros(BATCH, 2, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must hold int64"):
        model(torch.zeros(BATCH, 3))


# --- component tags -------------------------------------------------------------------------------


def test_every_parameter_has_an_allowed_component(tiny_model: nn.Module) -> None:
    for name, _ in tiny_model.named_parameters():
        assert component_of(tiny_model, name) in ALLOWED_TAGS, f"{tiny_model.name}: {name}"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "afm",
            {
                "afm.attention.weight": "attention",
                "afm.projection.bias": "attention",
                "afm.fc.weight": "interaction",
                "linear.fc.weight": "linear",
                "linear.bias": "linear",
            },
        ),
        (
            "dcn",
            {
                "cn.w.0.weight": "interaction",
                "cn.b.2": "interaction",
                "mlp.1.weight": "mlp",
                "output.weight": "mlp",
                "embedding.embedding.weight": "embedding",
            },
        ),
        ("dfm", {"mlp.8.weight": "mlp", "linear.fc.weight": "linear"}),
        ("dlrm", {"embeddings.2.weight": "embedding", "bottom_mlp.0.weight": "mlp", "top_mlp.2.bias": "mlp"}),
        ("dummy", {"embedding.weight": "embedding", "bottom_mlp.2.weight": "mlp", "predictor.2.bias": "mlp"}),
    ],
)
def test_components_follow_the_paper(name: str, expected: dict[str, str]) -> None:
    model = create(name, **TINY[name])
    assert {n: component_of(model, n) for n in expected} == expected


# --- parameter counts (paper Table 2) ---------------------------------------------------------------

ML_1M = [6041, 3953]
ML_20M = [138494, 131263]
TABLE2 = {  # model: (MovieLens-1M, MovieLens-20M) parameter counts
    "fm": (171e3, 4.59e6),
    "dfm": (170e3, 4.59e6),
    "afm": (170e3, 4.58e6),
    "dcn": (161e3, 4.32e6),
    "wd": (170e3, 4.59e6),
}


@pytest.mark.parametrize("name", CTR_MODELS)
def test_parameter_counts_match_table2(name: str) -> None:
    for field_dims, paper in zip((ML_1M, ML_20M), TABLE2[name], strict=True):
        count = sum(p.numel() for p in create(name, field_dims=field_dims).parameters())
        assert abs(count - paper) / paper < 0.03, f"{name} {field_dims}: {count} vs {paper:.0f}"


# --- torch.fx tracing (the campaign's incremental evaluation captures every model as a graph) ----------


def bad_inputs(model: nn.Module) -> list[tuple[torch.Tensor, ...]]:
    """Inputs that ``model``'s eager forward must refuse: wrong width, wrong dtype, unequal batches."""
    good = make_inputs(model)
    if model.input_layout == "categorical":
        (x,) = good
        return [(x[:, :-1],), (x.float(),), (x[0],)]
    dense, sparse = good
    wrong = [(dense[:, :-1], sparse), (dense, sparse[:, :-1]), (dense[:-1], sparse)]
    return wrong + ([(dense, sparse.float())] if model.input_layout == "dense+sparse" else [])


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_traces_and_matches_eager_bit_for_bit(name: str) -> None:
    torch.manual_seed(0)
    model = create(name, **TINY[name]).eval()
    assert not hasattr(model, "forward_prefix") and not hasattr(model, "suffix_modules")  # one mechanism
    traced = torch.fx.symbolic_trace(model)
    for batch in (1, 7, 64):
        inputs = make_inputs(model, seed=batch, batch=batch)
        with torch.no_grad():
            assert torch.equal(traced(*inputs), model(*inputs)), f"{name}, batch {batch}"
    model.train()
    traced.train()
    inputs = make_inputs(model, seed=3, batch=64)
    torch.manual_seed(1)
    expected = model(*inputs)
    torch.manual_seed(1)  # the same dropout masks
    assert torch.equal(traced(*inputs), expected)


@pytest.mark.parametrize("name", ZOO)
def test_the_traced_model_refuses_bad_inputs_as_eager_does(name: str) -> None:
    model = create(name, **TINY[name]).eval()
    traced = torch.fx.symbolic_trace(model)
    pruned = torch.fx.symbolic_trace(model)
    pruned.graph.eliminate_dead_code()  # the checks' outputs are unused: they must survive it
    pruned.recompile()
    for inputs in bad_inputs(model):
        with pytest.raises((ValueError, TypeError)) as eager:
            model(*inputs)
        for graph_module in (traced, pruned):
            with pytest.raises(eager.type, match=f"^{re.escape(str(eager.value))}$"):
                graph_module(*inputs)
    assert model(*make_inputs(model)).shape == (BATCH,)  # tracing left eager calls working


def test_batch_mismatch_message_names_both_sizes() -> None:
    model = create("dlrm", **TINY["dlrm"])
    dense, sparse = make_inputs(model)
    with pytest.raises(ValueError, match="dense and sparse batch sizes differ: 5 vs 6"):
        torch.fx.symbolic_trace(model)(dense[:5], sparse)


@pytest.mark.parametrize("n", [2, 3, 5, 27])
def test_pair_gathers_equal_advanced_indexing(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(64, n, 8, generator=gen)
    row, col = torch.triu_indices(n, n, offset=1)
    assert torch.equal(pair_indices(n, x.device), torch.stack([row, col]))
    assert torch.equal(flat_pair_indices(n, x.device), row * n + col)
    assert torch.equal(DotInteraction()(x), torch.bmm(x, x.transpose(1, 2))[:, row, col])
    afm = AttentionalFactorizationMachine(8, 4, (0.0, 0.0)).eval()
    inner = x[:, row] * x[:, col]  # the advanced-index form the gather replaced
    scores = torch.softmax(afm.projection(torch.relu(afm.attention(inner))), dim=1)
    assert torch.equal(afm(x), afm.fc((scores * inner).sum(dim=1)))


def test_pair_indices_are_cached_and_need_a_concrete_n() -> None:
    cpu = torch.device("cpu")
    assert pair_indices(6, cpu) is pair_indices(6, "cpu")
    assert flat_pair_indices(6, cpu) is flat_pair_indices(6, cpu)
    assert pair_indices(1, cpu).shape == (2, 0)
    with pytest.raises(TypeError, match="pair indices need a concrete int n >= 0, got float 3.0"):
        pair_indices(3.0, cpu)  # type: ignore[arg-type]


# --- model-specific behaviour -------------------------------------------------------------------------


def test_dummy_ignores_corrupted_inactive_rows() -> None:
    model = create("dummy", **TINY["dummy"]).eval()
    dense, sparse = make_inputs(model)
    sparse[:, 0] = 1.0  # row 0 is read by every sample, so it is not inactive
    inactive = (sparse.sum(dim=0) == 0).nonzero().flatten()
    assert inactive.numel() > 0
    before = model(dense, sparse)
    with torch.no_grad():
        model.embedding.weight[inactive] = float("inf")
    after = model(dense, sparse)
    assert torch.isfinite(after).all() and torch.equal(after, before)
    with torch.no_grad():
        model.embedding.weight[0, 0] = float("inf")
    assert not torch.isfinite(model(dense, sparse)).any()  # an active row does reach the output


def test_dummy_sums_active_rows_and_handles_empty_samples() -> None:
    model = create("dummy", **TINY["dummy"]).eval()
    dense, sparse = make_inputs(model)
    sparse[0] = 0.0
    sparse[1] = 0.0
    sparse[1, [3, 17]] = 1.0
    pooled = model._pool_active(sparse)
    assert torch.equal(pooled[0], torch.zeros(TINY["dummy"]["embed_dim"]))
    torch.testing.assert_close(pooled[1], model.embedding.weight[3] + model.embedding.weight[17])
    assert torch.isfinite(model(dense, torch.zeros_like(sparse))).all()


def test_dummy_seed_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a, b = create("dummy", seed=3), create("dummy", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = create("dummy", seed=4)
    assert not torch.equal(a.embedding.weight, c.embedding.weight)


def test_dummy_init_is_kaiming_uniform() -> None:
    model = create("dummy", mlp_hidden=128, embed_dim=256, seed=0)
    # kaiming_uniform_(a=sqrt(5)) is U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for weight, fan_in in [(model.embedding.weight, 256), (model.bottom_mlp[0].weight, 128)]:
        bound = fan_in**-0.5
        assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound


def test_dummy_inputs() -> None:
    dense, sparse = dummy_inputs(200, sparsity=0.01, seed=5)
    assert dense.shape == (200, 128) and sparse.shape == (200, 8192)
    assert dense.dtype == sparse.dtype == torch.float32
    assert set(sparse.unique().tolist()) == {0.0, 1.0}
    assert 0.008 < sparse.mean().item() < 0.012 and abs(dense.std().item() - 1.0) < 0.02
    again = dummy_inputs(200, sparsity=0.01, seed=5)
    assert torch.equal(again[0], dense) and torch.equal(again[1], sparse)
    with pytest.raises(ValueError, match="sparsity must be a probability"):
        dummy_inputs(2, sparsity=1.5)


def test_dummy_default_config_matches_table1() -> None:
    model = create("dummy")
    dense, sparse = dummy_inputs(3)
    assert model(dense, sparse).shape == (3,)
    assert model.embedding.weight.shape == (8192, 64) and model.embedding.mode == "sum"


def test_dlrm_matches_a_direct_computation() -> None:
    torch.manual_seed(0)
    model = create("dlrm", **TINY["dlrm"]).eval()
    dense, sparse = make_inputs(model)
    bottom = model.bottom_mlp(dense)
    vectors = [bottom] + [table.weight[sparse[:, k]] for k, table in enumerate(model.embeddings)]
    dots = [(vectors[i] * vectors[j]).sum(1) for i in range(4) for j in range(i + 1, 4)]
    expected = model.top_mlp(torch.cat([bottom, torch.stack(dots, 1)], 1)).squeeze(1)
    torch.testing.assert_close(model(dense, sparse), expected)


def test_dlrm_without_dense_features() -> None:
    model = create("dlrm", field_dims=[5, 7, 3], dense_dim=0)
    assert model.bottom_mlp is None
    assert model.top_mlp[0].in_features == 3  # three embeddings, three pairs
    out = model(torch.zeros(BATCH, 0), _indices([5, 7, 3], torch.Generator().manual_seed(0)))
    assert out.shape == (BATCH,) and torch.isfinite(out).all()


def test_interactions_match_pairwise_loops() -> None:
    x = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    pairs = [(x[:, i] * x[:, j]).sum(1) for i in range(5) for j in range(i + 1, 5)]
    torch.testing.assert_close(DotInteraction()(x), torch.stack(pairs, 1))
    # a dense vector given apart is vector 0: the pairs of [dense, *vectors], in the same order
    torch.testing.assert_close(DotInteraction()(x[:, 1:], x[:, 0]), torch.stack(pairs, 1))
    torch.testing.assert_close(FactorizationMachine()(x), torch.stack(pairs, 1).sum(1, keepdim=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(tiny_model: nn.Module) -> None:
    tiny_model.eval()
    inputs = make_inputs(tiny_model)
    expected = tiny_model(*inputs)
    gpu = tiny_model.cuda()
    assert all(b.is_cuda for b in gpu.buffers())  # offsets follow .to(device)
    out = gpu(*(t.cuda() for t in inputs))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in ZOO if n != "fm"])
def test_output_layers_are_the_last_linear(name: str) -> None:
    """``output_layers`` name the 1-wide Linear that computes the logit (mitigations skip it)."""
    kw: dict = {} if name == "dummy" else {"field_dims": [10, 20, 30]}
    if name == "dlrm":
        kw["dense_dim"] = 4
    model = create(name, **kw).eval()
    (layer,) = model.output_layers
    module = dict(model.named_modules())[layer]
    assert isinstance(module, nn.Linear) and module.out_features == 1
    order = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
    model(*make_inputs(model))
    assert order[-1] == layer  # the last Linear to run


#: Each zoo model's config at MLP depth ``d`` (hidden layers of every MLP it has), with the number of
#: hidden MLP Linears that depth gives. fm and afm have no MLP (afm's attention is one fixed layer).
DEPTH_CONFIGS = {
    "dummy": lambda d: ({**TINY["dummy"], "mlp_depth": d}, d + 1),  # bottom MLP + the predictor's one
    "dlrm": lambda d: ({**TINY["dlrm"], "bottom_mlp": [16] * (d - 1) + [8], "top_mlp": [16] * d}, 2 * d),
    **{name: (lambda d, n=name: ({**TINY[n], "mlp_dims": [8] * d}, d)) for name in ("dfm", "dcn", "wd")},
}
NO_MLP_DEPTH = {"fm": 0, "afm": 2}  # hidden Linears of the default config (afm: attention, projection)


def _depth_cases() -> list[tuple[str, int]]:
    cases = [(name, d) for name in ZOO if name in DEPTH_CONFIGS for d in (1, 2, 3)]
    return cases + [(name, 0) for name in ZOO if name not in DEPTH_CONFIGS]


@pytest.mark.parametrize(("name", "depth"), _depth_cases())
def test_output_layer_and_hidden_linears_follow_the_mlp_depth(name: str, depth: int) -> None:
    """The output layer is the last Linear to run, and clipping covers every other MLP Linear."""
    from pytei.mitigation import ClipActivations, hidden_linears, mitigate
    from pytei.targets import components

    assert name in DEPTH_CONFIGS or name in NO_MLP_DEPTH, (
        f"add {name!r}'s MLP depth argument to DEPTH_CONFIGS"
    )
    config, n_hidden = DEPTH_CONFIGS[name](depth) if depth else (TINY[name], NO_MLP_DEPTH[name])
    model = create(name, **config).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    order: list[str] = []
    for n, m in linears.items():
        m.register_forward_hook(lambda mod, i, o, n=n: order.append(n))
    model(*make_inputs(model))
    if not linears:
        assert model.output_layers == () and hidden_linears(model) == {}
        return
    assert model.output_layers == (order[-1],)  # the last Linear to run computes the logit
    assert linears[order[-1]].out_features == 1
    comps = components(model)
    expected = {n for n in linears if n != order[-1] and comps[f"{n}.weight"] in ("mlp", "attention")}
    assert set(hidden_linears(model)) == expected and len(expected) == n_hidden
    for m in linears.values():
        m._forward_hooks.clear()
    with mitigate(model, ClipActivations()):
        assert {n for n, m in linears.items() if m._forward_hooks} == expected


def test_a_declared_output_layer_that_does_not_exist_is_an_error() -> None:
    from pytei.mitigation import ClipActivations, hidden_linears, mitigate

    model = create("dfm", field_dims=[5, 7], mlp_dims=[16])
    assert model.output_layers == ("mlp.4",)
    model.output_layers = ("mlp.8",)  # what the hard-coded name said for every depth
    match = r"DeepFactorizationMachineModel.output_layers names \['mlp.8'\].*its Linear layers: mlp.0, mlp.4"
    with pytest.raises(ValueError, match=match):
        hidden_linears(model)
    with pytest.raises(ValueError, match=match), mitigate(model, ClipActivations()):
        pass
    model.output_layers = "mlp.4"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="output_layers must be a tuple of module names, got 'mlp.4'"):
        hidden_linears(model)
