"""Command-line interface: ``pytei demo|describe|train|inject|quantize|campaign|report|reproduce``.

Error policy. A :class:`~pytei.exceptions.PyteiError` (bad input, a detected fault) or a path that
is missing or unreadable is the user's to fix: it prints as one line ``error: <message>`` on stderr,
verbatim, with exit code 2. Any other exception is a bug (in pytei or a plugin) and shows its
traceback, exit code 1. ``--debug`` (or ``PYTEI_DEBUG=1``) shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import math
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .exceptions import PyteiError

__all__ = ["CLIError", "build_parser", "main"]

#: Builtin errors that a path given by the user causes: reported like a ``PyteiError``.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)

#: What the CLI reports as the user's mistake (one line, exit code 2).
USER_ERRORS: tuple[type[Exception], ...] = (PyteiError, *PATH_ERRORS)

#: ``OSError`` numbers of a storage that cannot take more (full disk, quota, read-only, file size):
#: the machine's state, not a bug, so reported as one line with exit code 2.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
#: How SQLite words the same conditions (it raises ``sqlite3.OperationalError``, without an errno).
_SQLITE_STORAGE = ("database or disk is full", "attempt to write a readonly database", "disk i/o error")


def _storage_error(err: BaseException) -> bool:
    """Whether ``err`` says the storage is full or read-only (see ``STORAGE_ERRNOS``)."""
    if isinstance(err, OSError):
        return err.errno in STORAGE_ERRNOS
    return isinstance(err, sqlite3.OperationalError) and any(t in str(err).lower() for t in _SQLITE_STORAGE)


#: Example values for config keys that models require, used in the hint of a missing key.
_CONFIG_EXAMPLES: dict[str, object] = {"field_dims": [6041, 3953], "dense_dim": 13}


class CLIError(PyteiError, ValueError):
    """Bad command-line input (an option's value, a JSON config, a missing optional dependency)."""


@contextmanager
def _checking(what: str) -> Iterator[None]:
    """Blame the user for a ``ValueError``/``TypeError`` raised while pytei validates ``what``.

    Used only around steps that check what the user typed (an error model's rate, a model config,
    a data set name), so that an error raised later, by the work itself, still shows as a bug.
    """
    try:
        yield
    except PyteiError:
        raise
    except (ValueError, TypeError) as err:
        raise CLIError(f"{what}: {err}") from err


def _json_object(flag: str, text: str | None) -> dict[str, Any]:
    """The JSON object given to ``flag`` (``{}`` when absent)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"{flag} is not valid JSON ({err.msg}, column {err.colno}): {text!r}") from err
    if not isinstance(value, dict):
        raise CLIError(f"{flag} must be a JSON object such as '{{\"n_rows\": 100000}}', got {text!r}")
    return value


def _missing_config(name: str, cls: type, config: dict[str, Any], flag: str) -> None:
    """Refuse a model config without a key the model requires, saying how to pass it."""
    required = [
        p.name
        for p in inspect.signature(cls).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    missing = [key for key in required if key not in config]
    if missing:
        example = json.dumps({**config, **{key: _CONFIG_EXAMPLES.get(key, "...") for key in missing}})
        keys = ", ".join(repr(key) for key in missing)
        raise CLIError(
            f"model {name!r} needs the config key{'s' if len(missing) > 1 else ''} {keys}: "
            f"pass {'them' if len(missing) > 1 else 'it'} as JSON, e.g. {flag} '{example}'"
        )


def _load_plugins(args: argparse.Namespace) -> None:
    from . import plugins

    plugins.load(tuple(getattr(args, "plugins", ())))


def _say(console: Console, text: str) -> None:
    """Print ``text`` as it is (no rich markup: a ``[confidence]`` in a name stays as written)."""
    console.print(text, markup=False, soft_wrap=True)  # soft_wrap: one line in a log, not 80 columns


def _cmd_demo(args: argparse.Namespace, console: Console) -> None:
    from .demo import run_demo

    run_demo(console, runs=args.runs, samples=args.samples)


def _cmd_describe(args: argparse.Namespace, console: Console) -> None:
    from . import models
    from .checkpoint import load_checkpoint
    from .targets import describe

    _load_plugins(args)
    if Path(args.model).is_dir():
        with _checking("checkpoint"):
            model = load_checkpoint(args.model, with_data=False).model
    else:
        config = _json_object("--config", args.config)
        cls = models.get(args.model)
        _missing_config(args.model, cls, config, "--config")
        with _checking("--config"):
            model = models.create(args.model, **config)
    rows = describe(model)
    console.print(rows)
    _say(console, "values per component: " + ", ".join(f"{k} {v:,}" for k, v in rows.totals().items()))


def _cmd_train(args: argparse.Namespace, console: Console) -> None:
    import torch

    from . import models
    from .checkpoint import save_checkpoint
    from .data import load
    from .outputs import check_output_dir
    from .train import TrainConfig, build, check_device, check_trainable, fit

    _load_plugins(args)
    check_output_dir(args.out, "--out")  # before any work: training may take hours
    check_device(args.device)
    options = _json_object("--data-options", args.data_options)
    config = _json_object("--model-config", args.model_config)
    cls = models.get(args.model)
    layout: str = getattr(cls, "input_layout", "categorical")  # every registered model has one
    with _checking("training options"):
        train_cfg = TrainConfig(
            lr=args.lr,
            batch_size=args.batch_size,
            max_epochs=args.epochs,
            patience=args.patience,
            seed=args.seed,
            device=args.device,
        )
    with _checking(f"data set {args.dataset!r}"):
        data = load(args.dataset, args.data_dir, seed=args.split_seed, layout=layout, **options)
    _say(
        console,
        f"{data.name}: {len(data.train):,} train / {len(data.valid):,} valid / {len(data.test):,} test rows, "
        f"{len(data.field_dims)} fields",
    )
    check_trainable(data)
    _say(console, f"torch threads: {torch.get_num_threads()} (--threads N sets it)")
    model_config = {"field_dims": data.field_dims, **_dense_kw(cls, data), **config}
    with _checking("--model-config"):
        model = build(args.model, train_cfg, **model_config)
    result = fit(model, data, train_cfg)
    out = save_checkpoint(
        args.out, result.model, data, data_dir=args.data_dir, data_options=options, scores=result.summary()
    )
    _say(
        console,
        f"best epoch {result.best_epoch}: valid AUC {result.valid_auc:.4f}, test AUC {result.test_auc:.4f}, "
        f"train AUC {result.train_auc:.4f} -> checkpoint {out}",
    )


def _dense_kw(cls: type, data: Any) -> dict[str, Any]:
    layout = getattr(cls, "input_layout", None)
    if layout == "dense+kjt":  # TorchRec models: the KJT keys the data set's batches carry
        return {"dense_dim": data.dense_dim, "feature_names": data.sparse_names}
    return {"dense_dim": data.dense_dim} if layout == "dense+sparse" else {}


def _cmd_inject(args: argparse.Namespace, console: Console) -> None:
    from . import metrics
    from .checkpoint import load_checkpoint
    from .errors import BitFlip
    from .injector import inject
    from .targets import select
    from .train import predict

    _load_plugins(args)
    with _checking("--ber"):
        errors = [BitFlip(ber) for ber in args.ber]
    with _checking("checkpoint"):
        ckpt = load_checkpoint(args.checkpoint, data_dir=args.data_dir)
    with _checking("--target/--params"):
        select(ckpt.model, args.target, args.params)
    test = ckpt.test
    clean = predict(ckpt.model, test)
    base = metrics.score(clean, test.labels)
    table = Table(
        title=Text(f"{ckpt.meta['model']['name']} on {ckpt.meta['data']['name']}: BitFlip into {args.target}")
    )
    for col in ("BER", "seed", "flips", "AUC", "AUC (valid outputs)", "invalid outputs", "RMSE vs clean"):
        table.add_column(col, justify="right")
    table.add_row("0", "-", "0", f"{base['auc']:.4f}", f"{base['auc_valid']:.4f}", "0", "0")
    for error in errors:
        for seed in range(args.seed, args.seed + args.runs):
            with inject(ckpt.model, error, target=args.target, params=args.params, seed=seed) as report:
                out = predict(ckpt.model, test)
            s = metrics.score(out, test.labels, golden=clean)
            table.add_row(
                f"{error.ber:.0e}",
                str(seed),
                f"{report.n_faults:,}",
                f"{s['auc']:.4f}",
                f"{s['auc_valid']:.4f}",
                f"{s['n_invalid']:,}",
                f"{s['rmse']:.3g}",
            )
    console.print(table)


def _cmd_quantize(args: argparse.Namespace, console: Console) -> None:
    from . import metrics
    from .checkpoint import load_checkpoint, save_checkpoint
    from .outputs import check_output_dir
    from .torchrec import require
    from .torchrec.quantize import quant_type, quantize
    from .train import predict

    _load_plugins(args)
    qtype = quant_type(args.dtype)  # a bad --dtype is refused before anything is loaded
    require("pytei quantize")
    source, out = Path(args.checkpoint).expanduser(), check_output_dir(args.out, "--out")
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise CLIError(f"--out {args.out} is the float checkpoint itself; write the quantized one elsewhere")
    with _checking("checkpoint"):
        ckpt = load_checkpoint(source, data_dir=args.data_dir)
    name = ckpt.meta["model"]["name"]
    model = quantize(ckpt.model, qtype.name)
    test = ckpt.test
    float_logits = predict(ckpt.model, test, batch_size=args.batch_size)
    quant_logits = predict(model, test, batch_size=args.batch_size)
    before = metrics.score(float_logits, test.labels)
    after = metrics.score(quant_logits, test.labels, golden=float_logits)
    scores = {
        "test_auc": after["auc"],
        "test_logloss": after["logloss"],
        "float_test_auc": before["auc"],
        "float_test_logloss": before["logloss"],
        "rmse_vs_float": after["rmse"],
        "float": ckpt.meta.get("scores", {}),
    }
    d, data = ckpt.meta["data"], ckpt.data
    assert data is not None  # loaded with its data (ckpt.test above)
    written = save_checkpoint(
        out,
        model,
        data,
        data_dir=args.data_dir if args.data_dir is not None else d["data_dir"],
        data_options=d["options"],
        scores=scores,
        origin={"checkpoint": str(source.resolve()), "weights_sha256": ckpt.meta["weights"]["sha256"]},
    )
    _say(
        console,
        f"{name} on {d['name']} ({len(test):,} test rows): test AUC fp32 {before['auc']:.6f}, "
        f"{qtype.name} {after['auc']:.6f} (change {after['auc'] - before['auc']:+.6f}); "
        f"logit RMSE vs fp32 {after['rmse']:.3g} -> checkpoint {written}",
    )


def _executor_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.ray_address:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise CLIError("--ray-address needs ray, which is not installed: pip install 'pytei[ray]'")
    return {"workers": args.workers, "ray_address": args.ray_address}


def _cmd_campaign_run(args: argparse.Namespace, console: Console) -> None:
    from .campaign import load_spec
    from .campaign.execute import run_campaign
    from .outputs import check_output_file

    _load_plugins(args)  # before the spec: it may name what the plugins register
    check_output_file(args.db, "--db")  # an existing database is resumed; a folder or read-only one refused
    spec = load_spec(args.spec)
    result = run_campaign(
        spec,
        args.db,
        base_dir=Path(args.spec).parent,
        plugins=tuple(args.plugins),
        confirm=args.yes,
        **_executor_options(args),
    )
    elsewhere = f", {result.elsewhere} run by another process" if result.elsewhere else ""
    if result.deferred:
        elsewhere += f", {result.deferred} of sharded models of another world size left for a launch of it"
    _say(
        console,
        f"campaign {spec.name}: {result.ran} trials run now, {result.skipped} already stored{elsewhere}, "
        f"{result.failed} failed; {result.planned} planned -> {args.db}",
    )
    result.check()  # every trial run failed: exit code 2


def _cmd_campaign_resume(args: argparse.Namespace, console: Console) -> None:
    from .campaign.execute import resume_campaign

    _load_plugins(args)
    result = resume_campaign(
        args.db, plugins=tuple(args.plugins), confirm=args.yes, **_executor_options(args)
    )
    _say(
        console,
        f"resumed: {result.ran} trials run now, {result.skipped} already stored, {result.failed} failed",
    )
    result.check()  # every trial run failed: exit code 2


def _cmd_campaign_status(args: argparse.Namespace, console: Console) -> None:
    from .campaign.store import Store

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no campaign database at {args.db}")
    with Store(args.db, create=False, readonly=True) as store:
        spec, counts, timing = store.spec(), store.counts(), store.timing()
    table = Table(title=Text(f"campaign {spec['name'] if spec else '?'} ({args.db})"))
    for col in ("done", "failed", "remaining", "planned", "trials/s", "eta"):
        table.add_column(col, justify="right")
    rate = timing.get("trials_per_s")
    eta = timing.get("eta_s")
    table.add_row(
        str(counts["ok"]),
        str(counts["failed"]),
        str(counts["remaining"]),
        str(counts["planned"]),
        f"{rate:.2f}" if rate else "-",
        f"{eta / 60:.1f} min" if eta is not None else "-",
    )
    console.print(table)


def _cmd_campaign_export(args: argparse.Namespace, console: Console) -> None:
    import importlib.util

    from .outputs import check_output_file
    from .results import export

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no campaign database at {args.db}")
    if args.format == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise CLIError("--format parquet needs pyarrow, which is not installed: pip install 'pytei[parquet]'")
    check_output_file(args.out, "--out", force=args.force)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out = export(args.db, args.out, fmt=args.format)
    _say(console, f"wrote {out}")


def _cmd_distributed(args: argparse.Namespace, console: Console) -> None:
    from .distributed import GPU_ONLY, STRATEGIES, check_strategy
    from .distributed_study import DistributedSizes, run_study
    from .outputs import check_output_dir
    from .report import write_report
    from .torchrec import require

    cpu = tuple(s for s in STRATEGIES if s not in GPU_ONLY)
    text = ",".join(cpu) if args.strategies.strip() == "cpu" else args.strategies
    strategies = tuple(s.strip() for s in text.split(",") if s.strip())
    if not strategies:
        raise CLIError(f"--strategies names no strategy; allowed: {', '.join(STRATEGIES)}")
    for s in strategies:
        check_strategy(s)
    try:
        worlds = tuple(int(w) for w in args.world_sizes.split(","))
    except ValueError:
        raise CLIError(f"--world-sizes must be comma-separated ints >= 1, got {args.world_sizes!r}") from None
    if any(w < 1 for w in worlds):
        raise CLIError(f"--world-sizes must be comma-separated ints >= 1, got {args.world_sizes!r}")
    for path, flag in ((args.checkpoint, "checkpoint"), (args.stale, "--stale")):
        if path is not None and not Path(path).is_dir():
            raise CLIError(f"{flag} {path} is not a checkpoint directory")
    out = check_output_dir(args.report, "--report") if args.report else None
    require("pytei distributed")
    sizes = DistributedSizes(
        strategies=strategies,
        world_sizes=worlds,
        ber=args.ber,
        runs=args.runs,
        test_rows=args.test_rows,
        batch_size=args.batch_size,
        latency_pooling=args.pooling,
    )
    trials = run_study(args.checkpoint, args.db, sizes, stale=args.stale, console=console)
    if out is not None:
        md = write_report(trials, out, title="pytei distributed", extras={"distributed": trials},
                          sections=("distributed", "definitions"))  # fmt: skip
        console.print(f"report: {md} and {md.with_suffix('.html')}", markup=False, soft_wrap=True)


def _cmd_report(args: argparse.Namespace, console: Console) -> None:
    from .outputs import check_output_dir
    from .report import write_report

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no campaign database at {args.db}")
    check_output_dir(args.out, "--out")  # a folder: rewriting an earlier report there is intended
    path = write_report(args.db, args.out, title=args.title)
    _say(console, f"wrote {path} and {path.with_suffix('.html')}")


def _cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from .compat import parse_flags
    from .reproduce import reproduce

    reproduce(
        args.preset,
        args.out,
        data_dir=args.data_dir,
        workers=args.workers,
        console=console,
        compat=parse_flags(args.compat),
        synthetic=args.synthetic,
    )


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"  # what argparse names in 'invalid ... value'
    return parse


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0 (``inf``, ``nan`` and ``0`` are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


_positive.__name__ = "finite number > 0"


class _HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: X)`` to the help of every option that has a default worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or not action.option_strings
            or action.required
            or default is None
            or default is False
            or default is argparse.SUPPRESS
            or default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


def _debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,  # a subcommand's flag must not reset the global one
        help="show the full traceback of every error (also: PYTEI_DEBUG=1)",
    )


def _plugin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE first (it may register models, error models, mitigations, metrics); repeatable",
    )


def _threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_count(1),
        help="torch threads of this process (default: torch's, one per core); use 1 on a shared machine",
    )


def _budget(text: str) -> str:
    """A cache budget argument, checked here and passed on as typed (workers read it again)."""
    from .incremental import parse_budget

    try:
        parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def _cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-budget",
        type=_budget,
        help="memory the incremental evaluator may keep per model, e.g. 2GiB, 512MB or 10%% "
        "(default: $PYTEI_CACHE_BUDGET, else 25%% of the memory available)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pytei`` argument parser (every option has help text showing its default)."""
    from .data import names as data_sets

    parser = argparse.ArgumentParser(
        prog="pytei",
        description="Hardware-error injection for recommendation models",
        formatter_class=_HelpFormatter,
    )
    _debug_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(
        subparsers: Any, name: str, helptext: str, func: Callable[..., None]
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = subparsers.add_parser(
            name, help=helptext, description=helptext, formatter_class=_HelpFormatter
        )
        _debug_flag(p)
        p.set_defaults(func=func)
        return p

    p = command(sub, "demo", "BER sweep on the paper's dummy DRS (a 10-second tour)", _cmd_demo)
    p.add_argument("--runs", type=_count(1), default=5, help="trials per (target, BER)")
    p.add_argument("--samples", type=_count(1), default=2048, help="input rows the dummy model scores")

    p = command(sub, "describe", "list a model's parameters with their components", _cmd_describe)
    p.add_argument("model", help="a registered model name or a checkpoint directory")
    p.add_argument(
        "--config",
        help="model config as JSON (a model name needs field_dims), e.g. '{\"field_dims\": [6041, 3953]}'",
    )
    _plugin_flag(p)

    p = command(sub, "train", "train a model with early stopping and save a checkpoint", _cmd_train)
    p.add_argument("--model", required=True, help="a registered model name (see 'pytei describe')")
    p.add_argument("--dataset", required=True, help=f"a data set: {', '.join(data_sets())}")
    p.add_argument("--data-dir", help="folder with the data set's files (not needed for synthetic-ctr)")
    p.add_argument("--data-options", help="data set options as JSON, e.g. '{\"n_rows\": 100000}'")
    p.add_argument("--model-config", help="extra model config as JSON, e.g. '{\"embed_dim\": 32}'")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--epochs", type=_count(1), default=100, help="most epochs to train")
    p.add_argument(
        "--patience", type=_count(1), default=3, help="stop after this many epochs without valid-AUC gain"
    )
    p.add_argument("--batch-size", type=_count(1), default=2048, help="training batch size")
    p.add_argument("--lr", type=_positive, default=1e-3, help="Adam learning rate, a finite number > 0")
    p.add_argument("--seed", type=_count(0), default=0, help="seed of initialisation, shuffling and dropout")
    p.add_argument("--split-seed", type=_count(0), default=0, help="seed of the 8:1:1 train/valid/test split")
    p.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda")
    _plugin_flag(p)
    _threads_flag(p)

    p = command(sub, "inject", "one-off trials on a checkpoint: clean vs injected metrics", _cmd_inject)
    p.add_argument("checkpoint", help="checkpoint directory (written by 'pytei train')")
    p.add_argument("--ber", type=float, nargs="+", required=True, help="bit error rates, each in [0, 1]")
    p.add_argument(
        "--target", default="all", help="component to corrupt: embedding, mlp, attention, ... or all"
    )
    p.add_argument("--params", default="all", choices=["weight", "bias", "all"], help="which parameters")
    p.add_argument("--runs", type=_count(1), default=1, help="trials per BER (seeds SEED, SEED+1, ...)")
    p.add_argument("--seed", type=_count(0), default=0, help="seed of the first trial")
    p.add_argument("--data-dir", help="where the data set is now, if it moved since training")
    _plugin_flag(p)

    p = command(
        sub,
        "quantize",
        "quantize a TorchRec checkpoint's embedding tables for inference; AUC before and after",
        _cmd_quantize,
    )
    p.add_argument("checkpoint", help="float checkpoint directory of a TorchRec model ('pytei train')")
    p.add_argument(
        "--dtype",
        required=True,
        metavar="DTYPE",
        help="row format of the tables: int8, int4, int2 (codes with an fp16 scale and bias per row) or fp16",
    )
    p.add_argument("--out", required=True, help="directory of the quantized checkpoint to write")
    p.add_argument("--data-dir", help="where the data set is now, if it moved since training")
    p.add_argument("--batch-size", type=_count(1), default=8192, help="rows scored per forward pass")
    _plugin_flag(p)
    _threads_flag(p)

    campaign = sub.add_parser(
        "campaign",
        help="run, resume, inspect and export fault-injection campaigns",
        formatter_class=_HelpFormatter,
    )
    _debug_flag(campaign)
    csub = campaign.add_subparsers(dest="campaign_command", required=True)
    for name, func, helptext in (
        ("run", _cmd_campaign_run, "run a campaign spec (TOML) into a results database"),
        ("resume", _cmd_campaign_resume, "continue an interrupted campaign from its database"),
    ):
        p = command(csub, name, helptext, func)
        if name == "run":
            p.add_argument("spec", help="campaign spec (TOML), see examples/")
            p.add_argument("--db", required=True, help="SQLite results database (created if missing)")
        else:
            p.add_argument("db", help="the campaign's SQLite results database")
        p.add_argument(
            "--workers",
            type=_count(0),
            default=0,
            help="local worker processes of one torch thread each (0: run in this process)",
        )
        p.add_argument("--ray-address", help="run on Ray: 'local', 'auto' or 'ray://host:port'")
        p.add_argument(
            "--yes",
            action="store_true",
            help="run a plan of more than 1,000,000 trials (refused otherwise, after printing its size)",
        )
        p.epilog = (
            "exit status: 0 when the campaign ran (some trials may have failed: see 'campaign status'), "
            "2 on bad input or when every trial run failed (one line names the first error), "
            "130 on Ctrl-C (resume with 'pytei campaign resume DB')"
        )
        _plugin_flag(p)
        _threads_flag(p)
        _cache_flag(p)
    p = command(csub, "status", "done / failed / remaining trials, rate and ETA", _cmd_campaign_status)
    p.add_argument("db", help="the campaign's SQLite results database")
    p = command(csub, "export", "write all trials to CSV or Parquet", _cmd_campaign_export)
    p.add_argument("db", help="the campaign's SQLite results database")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv", help="file format")
    p.add_argument("--out", required=True, help="file to write (an existing one only with --force)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    p = command(
        sub,
        "distributed",
        "shard a TorchRec checkpoint over processes; AUC, blast radius, latency and recovery per host fault",
        _cmd_distributed,
    )
    p.add_argument("checkpoint", help="checkpoint directory of a TorchRec model ('pytei train')")
    p.add_argument("--db", required=True, help="SQLite results database (created, or resumed)")
    p.add_argument(
        "--strategies",
        default="cpu",
        help="comma-separated sharding strategies, or 'cpu' for every one that runs on CPU "
        "(table_wise, column_wise, table_column_wise, data_parallel; row_wise needs GPUs)",
    )
    p.add_argument("--world-sizes", default="2", help="comma-separated process counts (hosts)")
    p.add_argument("--stale", help="an older checkpoint of the same model: a stale host serves it")
    p.add_argument("--ber", type=float, default=1e-3, help="BitFlip rate of global and host-SDC trials")
    p.add_argument("--runs", type=_count(1), default=2, help="seeds per fault that draws at random")
    p.add_argument("--test-rows", type=_count(1), default=2000, help="test rows scored per trial")
    p.add_argument("--batch-size", type=_count(1), default=256, help="rows per rank per step")
    p.add_argument("--pooling", type=_count(1), default=1, help="ids per bag of the timed requests")
    p.add_argument("--report", help="also write the report to this folder")

    p = command(
        sub, "report", "figures, tables, report.md and report.html from a results database", _cmd_report
    )
    p.add_argument("db", help="the campaign's SQLite results database")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--title", help="report title (default: from the campaign's name)")

    p = command(
        sub, "reproduce", "the paper's study in one resumable command, ending with the report", _cmd_reproduce
    )
    p.add_argument(
        "--preset",
        choices=["quick", "paper", "distributed"],
        default="quick",
        help="study size: quick, paper, or distributed (sharded inference; needs pytei[torchrec])",
    )
    p.add_argument("--out", default="pytei-out", help="output folder (checkpoints, databases, report)")
    p.add_argument("--data-dir", help="folder with ratings.dat / ratings.csv / train.txt (paper preset)")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="let the paper preset run on the synthetic CTR data set when --data-dir holds no data set",
    )
    p.add_argument(
        "--workers",
        type=_count(0),
        default=0,
        help="local worker processes (one torch thread each) for the campaigns",
    )
    p.add_argument(
        "--compat",
        metavar="FLAGS",
        help="also run the CTR study with the original code's defects, comma-separated: "
        "original-split, original-mask, accumulate (see docs/REPRODUCTION.md)",
    )
    _threads_flag(p)
    _cache_flag(p)
    return parser


def _debugging(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("PYTEI_DEBUG", "") not in ("", "0")


def _one_line(err: BaseException) -> str:
    """``err``'s message as one line (line breaks become spaces), its text otherwise unchanged."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command ``argv`` (default: ``sys.argv[1:]``); returns the exit code. Started by ``torchrun``,
    rank 0 runs it and the other ranks serve its sharded models (``pytei.distributed.launch``)."""
    args = build_parser().parse_args(argv)
    from .distributed import launch

    if launch.launched():
        return launch.run(lambda: _run(args))
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    console = Console()
    debug = _debugging(args)
    try:
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        if getattr(args, "cache_budget", None):
            from .incremental import BUDGET_VARIABLE

            os.environ[BUDGET_VARIABLE] = args.cache_budget  # read by every worker's evaluator
        args.func(args, console)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.OperationalError) as err:
        if not _storage_error(err):
            return _bug()
        if debug:
            traceback.print_exc()
        where = f" ({err.filename})" if isinstance(err, OSError) and err.filename else ""
        print(
            f"error: cannot write{where}: {_one_line(err)}; free space or fix the folder, then rerun "
            "(stored trials and checkpoints are kept)",
            file=sys.stderr,
        )
        return 2
    except Exception:
        return _bug()
    return 0


def _bug() -> int:
    """Report the exception being handled as a bug: its traceback, a request to report it, code 1."""
    traceback.print_exc()
    print("this is a bug in pytei or in a plugin: please report it with the traceback above", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
