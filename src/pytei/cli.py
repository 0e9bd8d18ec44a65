"""Command-line interface: ``pytei demo | describe | train | inject | campaign | report``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

__all__ = ["main"]


def _cmd_demo(args: argparse.Namespace, console: Console) -> None:
    from .demo import run_demo

    run_demo(console, runs=args.runs, samples=args.samples)


def _cmd_describe(args: argparse.Namespace, console: Console) -> None:
    from . import models
    from .checkpoint import load_checkpoint
    from .targets import describe

    if Path(args.model).is_dir():
        model = load_checkpoint(args.model, with_data=False).model
    else:
        config = json.loads(args.config) if args.config else {}
        model = models.create(args.model, **config)
    rows = describe(model)
    console.print(rows)
    console.print("values per component: " + ", ".join(f"{k} {v:,}" for k, v in rows.totals().items()))


def _cmd_train(args: argparse.Namespace, console: Console) -> None:
    from . import models
    from .checkpoint import save_checkpoint
    from .data import load
    from .train import TrainConfig, build, fit

    options = json.loads(args.data_options) if args.data_options else {}
    cls = models.get(args.model)
    data = load(args.dataset, args.data_dir, seed=args.split_seed, layout=cls.input_layout, **options)
    console.print(
        f"{data.name}: {len(data.train):,} train / {len(data.valid):,} valid / {len(data.test):,} test rows, "
        f"{len(data.field_dims)} fields"
    )
    config = json.loads(args.model_config) if args.model_config else {}
    train_cfg = TrainConfig(
        lr=args.lr,
        batch_size=args.batch_size,
        max_epochs=args.epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
    )
    model = build(args.model, train_cfg, field_dims=data.field_dims, **_dense_kw(cls, data), **config)
    result = fit(model, data, train_cfg)
    out = save_checkpoint(
        args.out, result.model, data, data_dir=args.data_dir, data_options=options, scores=result.summary()
    )
    console.print(
        f"best epoch {result.best_epoch}: valid AUC {result.valid_auc:.4f}, test AUC {result.test_auc:.4f} "
        f"-> checkpoint {out}"
    )


def _dense_kw(cls, data) -> dict:
    return {"dense_dim": data.dense_dim} if cls.input_layout == "dense+sparse" else {}


def _cmd_inject(args: argparse.Namespace, console: Console) -> None:
    from . import metrics
    from .checkpoint import load_checkpoint
    from .errors import BitFlip
    from .injector import inject
    from .train import predict

    ckpt = load_checkpoint(args.checkpoint, data_dir=args.data_dir)
    test = ckpt.test
    clean = predict(ckpt.model, test)
    base = metrics.score(clean, test.labels)
    table = Table(
        title=f"{ckpt.meta['model']['name']} on {ckpt.meta['data']['name']}: BitFlip into {args.target}"
    )
    for col in ("BER", "seed", "flips", "AUC", "AUC (valid outputs)", "invalid outputs", "RMSE vs clean"):
        table.add_column(col, justify="right")
    table.add_row("0", "-", "0", f"{base['auc']:.4f}", f"{base['auc_valid']:.4f}", "0", "0")
    for ber in args.ber:
        for seed in range(args.seed, args.seed + args.runs):
            with inject(
                ckpt.model, BitFlip(ber), target=args.target, params=args.params, seed=seed
            ) as report:
                out = predict(ckpt.model, test)
            s = metrics.score(out, test.labels, golden=clean)
            table.add_row(
                f"{ber:.0e}",
                str(seed),
                f"{report.n_faults:,}",
                f"{s['auc']:.4f}",
                f"{s['auc_valid']:.4f}",
                f"{s['n_invalid']:,}",
                f"{s['rmse']:.3g}",
            )
    console.print(table)


def _executor_options(args: argparse.Namespace) -> dict:
    return {"workers": args.workers, "ray_address": args.ray_address}


def _cmd_campaign_run(args: argparse.Namespace, console: Console) -> None:
    from .campaign import load_spec
    from .campaign.execute import run_campaign

    spec = load_spec(args.spec)
    result = run_campaign(spec, args.db, base_dir=Path(args.spec).parent, **_executor_options(args))
    console.print(
        f"campaign {spec.name}: {result.ran} trials run now, {result.skipped} already stored, "
        f"{result.failed} failed; {result.planned} planned -> {args.db}"
    )


def _cmd_campaign_resume(args: argparse.Namespace, console: Console) -> None:
    from .campaign.execute import resume_campaign

    result = resume_campaign(args.db, **_executor_options(args))
    console.print(
        f"resumed: {result.ran} trials run now, {result.skipped} already stored, {result.failed} failed"
    )


def _cmd_campaign_status(args: argparse.Namespace, console: Console) -> None:
    from .campaign.store import Store

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no campaign database at {args.db}")
    with Store(args.db, create=False) as store:
        spec, counts, timing = store.spec(), store.counts(), store.timing()
    table = Table(title=f"campaign {spec['name'] if spec else '?'} ({args.db})")
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
    from .results import export

    out = export(args.db, args.out, fmt=args.format)
    console.print(f"wrote {out}")


def _cmd_report(args: argparse.Namespace, console: Console) -> None:
    from .report import write_report

    if not Path(args.db).is_file():
        raise FileNotFoundError(f"no campaign database at {args.db}")
    path = write_report(args.db, args.out, title=args.title)
    console.print(f"wrote {path} and {path.with_suffix('.html')}")


def _cmd_reproduce(args: argparse.Namespace, console: Console) -> None:
    from .reproduce import reproduce

    reproduce(args.preset, args.out, data_dir=args.data_dir, workers=args.workers, console=console)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pytei", description="Hardware-error injection for recommendation models"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="BER sweep on the paper's dummy DRS (the embedded default job)")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--samples", type=int, default=2048)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("describe", help="list a model's parameters with their components")
    p.add_argument("model", help="a registered model name or a checkpoint directory")
    p.add_argument("--config", help="model config as JSON, e.g. '{\"field_dims\": [6041, 3953]}'")
    p.set_defaults(func=_cmd_describe)

    p = sub.add_parser("train", help="train a model with early stopping and save a checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir")
    p.add_argument("--data-options", help="data set options as JSON, e.g. '{\"n_rows\": 100000}'")
    p.add_argument("--model-config", help="extra model config as JSON")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("inject", help="one-off trials on a checkpoint: clean vs injected metrics")
    p.add_argument("checkpoint")
    p.add_argument("--ber", type=float, nargs="+", required=True)
    p.add_argument("--target", default="all")
    p.add_argument("--params", default="all", choices=["weight", "bias", "all"])
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", help="where the data set is now, if it moved since training")
    p.set_defaults(func=_cmd_inject)

    campaign = sub.add_parser("campaign", help="run, resume, inspect and export fault-injection campaigns")
    csub = campaign.add_subparsers(dest="campaign_command", required=True)
    for name, func, helptext in (
        ("run", _cmd_campaign_run, "run a campaign spec (TOML) into a results database"),
        ("resume", _cmd_campaign_resume, "continue an interrupted campaign from its database"),
    ):
        p = csub.add_parser(name, help=helptext)
        p.add_argument("spec" if name == "run" else "db")
        if name == "run":
            p.add_argument("--db", required=True, help="SQLite results database (created if missing)")
        p.add_argument(
            "--workers", type=int, default=0, help="local worker processes (0: run in this process)"
        )
        p.add_argument("--ray-address", help="run on Ray: 'local', 'auto' or 'ray://host:port'")
        p.set_defaults(func=func)
    p = csub.add_parser("status", help="done / failed / remaining trials, rate and ETA")
    p.add_argument("db")
    p.set_defaults(func=_cmd_campaign_status)
    p = csub.add_parser("export", help="write all trials to CSV or Parquet")
    p.add_argument("db")
    p.add_argument("--format", choices=["csv", "parquet"], default="csv")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_cmd_campaign_export)

    p = sub.add_parser("report", help="figures, tables, report.md and report.html from a results database")
    p.add_argument("db")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--title")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("reproduce", help="the paper's study in one resumable command, ending with the report")
    p.add_argument("--preset", choices=["quick", "paper"], default="quick")
    p.add_argument("--out", default="pytei-out", help="output folder (checkpoints, databases, report)")
    p.add_argument("--data-dir", help="folder with ratings.dat / ratings.csv / train.txt (paper preset)")
    p.add_argument("--workers", type=int, default=0, help="local worker processes for the campaigns")
    p.set_defaults(func=_cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, stderr = Console(), Console(stderr=True)
    try:
        args.func(args, console)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as err:
        stderr.print(f"[red]error:[/red] {err}")
        return 2
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/yellow]")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
