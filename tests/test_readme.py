"""The README's code examples run as written."""

import re
from pathlib import Path

import torch
from torch import nn

import pytei

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_custom_error_model_example():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "TopExponentBit" in b)
    namespace: dict = {}
    exec(block, namespace)  # noqa: S102 - our own documentation
    model = nn.Linear(64, 64)
    before = model.weight.detach().clone()
    with pytei.inject(model, namespace["TopExponentBit"](0.1), params="weight", seed=0) as report:
        changed = model.weight.detach() != before
        assert report.n_faults == int(changed.sum()) > 0
        assert report.per_bit("weight")[30] == report.n_faults  # float32: highest exponent bit is 30
    assert torch.equal(model.weight.detach(), before)


def test_setup_commands_match_ci():
    """The README's two set-up commands: the main job is the quick reproduction, and the test
    command is exactly what ``.ci/run`` runs."""
    main_job, tests = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    assert main_job == 'pip install -c constraints.txt -e ".[dev]" && pytei reproduce --preset quick'
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
