"""Selecting tensors by component, kind and name, and describing a model."""

import pytest
import torch
from torch import nn

import pytei
from pytei.targets import components, select


def test_default_classification(tiny):
    comps = components(tiny)
    assert comps["emb.weight"] == "embedding"
    assert comps["bottom.0.weight"] == "mlp"
    assert comps["bottom.1.weight"] == "mlp"  # BatchNorm inside an MLP block belongs to it
    assert comps["top.2.bias"] == "mlp"


def test_declared_components_win(tiny):
    tiny.top.pytei_component = "interaction"
    assert components(tiny)["top.0.weight"] == "interaction"
    assert components(tiny)["bottom.0.weight"] == "mlp"
    tiny.top.pytei_component = "nonsense"
    with pytest.raises(ValueError, match="pytei_component='nonsense'"):
        components(tiny)


def test_select_by_component_kind_and_name(tiny):
    names = lambda sites: [s.name for s in sites]  # noqa: E731
    assert names(select(tiny, "embedding")) == ["emb.weight"]
    assert all(n.endswith("bias") for n in names(select(tiny, "mlp", params="bias")))
    assert names(select(tiny, "all", include="top.*", exclude="*.bias")) == ["top.0.weight", "top.2.weight"]
    assert set(names(select(tiny, ["embedding", "mlp"]))) == set(dict(tiny.named_parameters()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "mlps"}, "unknown target component 'mlps'; allowed: all, embedding, mlp"),
        ({"target": "attention"}, "target 'attention' matches no parameter of TinyRec"),
        ({"params": "weights"}, "unknown params 'weights'; allowed: weight, bias, all"),
        ({"include": "decoder.*"}, "pattern 'decoder.*' matches no parameter"),
        ({"target": "embedding", "params": "bias"}, "matches no parameter of TinyRec"),
        ({"include": ""}, "must be non-empty strings"),
    ],
)
def test_bad_selection_is_a_clear_error(tiny, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
        select(tiny, **kwargs)


def test_unsupported_dtype_names_the_parameter():
    m = nn.Module()
    m.z = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="z: unsupported dtype torch.complex64"):
        select(m)


def test_buffers_on_request():
    m = nn.Module()
    m.register_buffer("table", torch.zeros(10, 4, dtype=torch.int8))
    m.lin = nn.Linear(4, 1)
    m.register_buffer("offsets", torch.arange(3), persistent=False)  # derived, not state
    assert [s.name for s in select(m, buffers=True, include="table")] == ["table"]
    assert "offsets" not in [s.name for s in select(m, buffers=True)]
    with pytest.raises(ValueError, match="pattern 'table' matches no parameter"):
        select(m, include="table")


def test_describe_rows_and_table(tiny):
    rows = pytei.describe(tiny)
    assert len(rows) == len(list(tiny.parameters()))
    row = rows[0]
    assert (row.name, row.component, row.kind, row.dtype, row.shape, row.numel) == (
        "emb.weight",
        "embedding",
        "weight",
        "float32",
        (500, 8),
        4000,
    )
    text = str(rows)
    assert "emb.weight" in text and "embedding" in text and "4,000" in text
    assert rows.totals()["embedding"] == 4000


class Biases(nn.Module):
    """Biases registered every way a model may register them, next to weights registered alike."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True)  # in_proj_bias, bias_k, bias_v
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(2))])
        self.biases = nn.ParameterDict({"user": nn.Parameter(torch.zeros(2))})
        self.w = nn.ParameterList([nn.Parameter(torch.zeros(2))])
        self.table = nn.ParameterDict(
            {"bias": nn.Parameter(torch.zeros(2)), "scale": nn.Parameter(torch.ones(2))}
        )
        self.out_bias = nn.Parameter(torch.zeros(1))
        self.bilinear = nn.Parameter(torch.zeros(1))  # "bias" inside a word is not a bias


def test_biases_are_classified_by_their_registered_names():
    kinds = {s.name: s.kind for s in select(Biases())}
    biases = {n for n, k in kinds.items() if k == "bias"}
    assert biases == {
        "attn.in_proj_bias",
        "attn.bias_k",
        "attn.bias_v",
        "attn.out_proj.bias",
        "b.0",
        "biases.user",
        "table.bias",
        "out_bias",
    }
    assert {s.name for s in select(Biases(), params="weight")} == set(kinds) - biases


def test_dcn_cross_network_biases_are_biases():
    dcn = pytei.models.create("dcn", field_dims=[5, 6], num_layers=2)
    selected = {s.name for s in select(dcn, params="bias")}
    assert {"cn.b.0", "cn.b.1"} <= selected
    assert not any(n.startswith("cn.w.") for n in selected)  # the cross weights stay weights
    rows = {r.name: r.kind for r in pytei.describe(dcn)}
    assert rows["cn.b.0"] == rows["mlp.0.bias"] == rows["output.bias"] == "bias"
    assert rows["cn.w.0.weight"] == "weight"
