"""The `ltsweep` command.

Subcommands: demo, data synth, data stats, data convert-openimages, stage0, train, sweep, confirm, eval, compare.
Each handler is a thin wrapper: parse arguments, call one library function, print its result. Heavy imports
(torch, Ray, MLflow) happen inside the handlers so `ltsweep --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lt_models.data.synthetic.layout import PRESETS
from lt_models.errors import LtsweepInputError
from pipelines.cli_data import UserError, add_data
from pipelines.storage.location import as_location

DEFAULT_DEMO_DATA = Path("data/demo")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lt_models import evaluation

    dets = evaluation.load_detections(args.dets, gt=args.gt)
    if args.openimages:
        if not args.hierarchy:
            raise UserError(
                "ltsweep eval --openimages needs --hierarchy H.json (the class hierarchy used to "
                "expand ground truth to parent classes)"
            )
        res = evaluation.evaluate_openimages(args.gt, dets, args.hierarchy, expand_detections=args.expand_detections)
    else:
        res = evaluation.evaluate_lvis(args.gt, dets)
    if args.json:
        print(json.dumps(res))
    else:
        print(evaluation.format_results(res))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from pipelines.commands.train import run_train
    from pipelines.config.load import load_train_config

    skip = ["data.skip_invalid=true"] if args.skip_invalid else []
    cfg = load_train_config(args.config, overrides=args.set + skip)
    result = run_train(cfg, out_dir=args.out)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    import logging

    from pipelines.tune.sweep import run_sweep_from_file

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    summary = run_sweep_from_file(
        args.config,
        resume=args.resume,
        force_pretrain=args.force_pretrain,
        storage_path=args.storage_path,
        tracking_uri=args.tracking_uri,
        overrides=args.set + (["data.skip_invalid=true"] if args.skip_invalid else []),
        errored=args.errored,
        register=not args.no_register,
        model_name=args.register_model,
    )
    if summary.exit_code():
        print(f"ltsweep: error: {summary.outcome()}", file=sys.stderr)
    return summary.exit_code()


def _cmd_compare(args: argparse.Namespace) -> int:
    from pipelines.analysis.compare import compare_sweeps
    from pipelines.mlflow_io.client import open_store

    rows = compare_sweeps(open_store(args.tracking_uri), args.sweeps, out_png=args.out, quiet=args.json)
    if args.json:
        print(json.dumps(_jsonable(rows), indent=1))
    return 0


def _jsonable(obj):
    """Rows with their Stat dataclasses as dicts and NaN as null (strict JSON)."""
    import dataclasses
    import math

    if dataclasses.is_dataclass(obj):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj if isinstance(obj, (str, int, float, bool)) or obj is None else str(obj)


def _cmd_confirm(args: argparse.Namespace) -> int:
    import logging

    from pipelines.commands.confirm import confirm

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = confirm(
        args.sweep, top=args.top, seeds=args.seeds, storage_path=args.storage_path, tracking_uri=args.tracking_uri
    )
    if summary.exit_code():
        print(f"ltsweep: error: {summary.outcome()}", file=sys.stderr)
    return summary.exit_code()


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.commands.demo import run_demo

    return run_demo(data_dir=args.data, seed=args.seed)


def _cmd_stage0(args: argparse.Namespace) -> int:
    import logging

    from pipelines.commands.stage0 import run_stage0

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_stage0(
        args.preset,
        args.storage_path,
        epochs=args.epochs,
        images_per_class=args.images_per_class,
        seed=args.seed,
        force=args.force,
        as_json=args.json,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ltsweep", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"ltsweep {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    add_data(sub)
    _add_stage0(sub)
    _add_train(sub)
    _add_sweep(sub)
    _add_eval(sub)
    _add_confirm(sub)
    _add_compare(sub)
    return p


def _add_demo(sub) -> None:
    """`ltsweep demo`."""
    d = sub.add_parser("demo", help="generate the demo benchmark (if absent) and run the embedded demo")
    d.add_argument("--data", type=Path, default=DEFAULT_DEMO_DATA, help="where the demo benchmark lives")
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and of the sweep (default 0)")
    d.set_defaults(func=_cmd_demo)


def _add_stage0(sub) -> None:
    """`ltsweep stage0`."""
    s = sub.add_parser(
        "stage0",
        help="pretrain the tiny backbone on a balanced synthetic classification task (cached); use it as model.weights",
    )
    s.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="whose leaf classes to classify (default demo)"
    )
    s.add_argument(
        "--storage-path",
        type=as_location,
        default=Path("results"),
        help="where the cache <storage>/stage0/<sha256>/ lives (a local or shared directory; default results)",
    )
    s.add_argument("--epochs", type=int, default=None, help="training epochs (default: Stage0Spec's, 12)")
    s.add_argument(
        "--images-per-class", type=int, default=None, help="crops per class, 8 of them held out (default 48)"
    )
    s.add_argument("--seed", type=int, default=0, help="seed of the crops and of the training (default 0)")
    s.add_argument("--force", action="store_true", help="train it again and replace the cache entry")
    s.add_argument("--json", action="store_true", help="print one JSON document instead of the text")
    s.set_defaults(func=_cmd_stage0)


def _add_train(sub) -> None:
    """`ltsweep train`."""
    t = sub.add_parser("train", help="one training run (stage 1, stage 2 or one-stage) without Tune")
    t.add_argument("config", type=Path, help="experiment YAML (a sweep YAML; its space is ignored)")
    t.add_argument("--out", type=Path, default=None, help="output dir (default: from the config)")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set stage2.lam=0.7 (repeatable)",
    )
    t.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed annotation records (counted) instead of stopping (= data.skip_invalid: true)",
    )
    t.set_defaults(func=_cmd_train)


def _add_sweep(sub) -> None:
    """`ltsweep sweep`."""
    w = sub.add_parser("sweep", help="run a Ray Tune sweep from a search-space YAML")
    w.add_argument("config", type=Path, help="search-space YAML (see search_spaces/)")
    w.add_argument("--resume", action="store_true", help="continue an interrupted sweep")
    w.add_argument("--force-pretrain", action="store_true", help="retrain the shared stage-1 checkpoint")
    how = w.add_mutually_exclusive_group()
    how.add_argument(
        "--resume-errored",
        dest="errored",
        action="store_const",
        const="resume",
        help="with --resume: continue errored trials from their last checkpoint",
    )
    how.add_argument(
        "--restart-errored",
        dest="errored",
        action="store_const",
        const="restart",
        help="with --resume: train errored trials again from the start",
    )
    w.add_argument(
        "--storage-path",
        type=as_location,
        default=None,
        help="override run.storage_path (Tune results, stage-1 cache, default MLflow store): a directory or "
        "s3://bucket/prefix[?endpoint_override=HOST:PORT&scheme=http]",
    )
    w.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///<storage>/mlflow.db)")
    w.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set search.seeds=[0,1,2] (repeatable)",
    )
    w.add_argument(
        "--skip-invalid",
        action="store_true",
        help="skip malformed annotation records (counted) instead of stopping (= data.skip_invalid: true)",
    )
    reg = w.add_mutually_exclusive_group()
    reg.add_argument(
        "--register-model",
        metavar="NAME",
        default=None,
        help="register the best model under NAME in the MLflow model registry (default: the sweep's name)",
    )
    reg.add_argument(
        "--no-register", action="store_true", help="log the best model on the sweep's MLflow run but do not register it"
    )
    w.set_defaults(func=_cmd_sweep)


def _add_eval(sub) -> None:
    """`ltsweep eval`."""
    e = sub.add_parser("eval", help="LVIS-style (or Open Images-style) AP of a detections file")
    e.add_argument("--gt", type=Path, required=True, help="ground-truth LVIS-format JSON")
    e.add_argument("--dets", type=Path, required=True, help="COCO results JSON")
    e.add_argument(
        "--openimages",
        action="store_true",
        help="Open Images challenge AP@0.5 (hierarchy-expanded, group-of) instead of LVIS AP",
    )
    e.add_argument("--hierarchy", type=Path, default=None, help="class hierarchy JSON (needed with --openimages)")
    e.add_argument("--expand-detections", action="store_true", help="Open Images: also expand dets to parents")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    e.set_defaults(func=_cmd_eval)


def _add_confirm(sub) -> None:
    """`ltsweep confirm`."""
    f = sub.add_parser(
        "confirm",
        help="rerun the best configurations of a finished sweep with fresh seeds on held-out images (data.holdout "
        "or data.test): the independent estimate, the winner's curse and the verdicts",
    )
    f.add_argument("sweep", help="the sweep's name (its YAML `name:`)")
    f.add_argument("--top", type=int, default=3, help="how many of its best configurations to rerun (default 3)")
    f.add_argument(
        "--seeds",
        type=int,
        default=3,
        help="fresh training seeds per configuration, never the sweep's (default 3, at least 2)",
    )
    f.add_argument(
        "--storage-path",
        type=as_location,
        default=Path("results"),
        help="the sweep's run.storage_path (a directory or s3://bucket/prefix)",
    )
    f.add_argument("--tracking-uri", default=None, help="default: sqlite:///<storage-path>/mlflow.db")
    f.set_defaults(func=_cmd_confirm)


def _add_compare(sub) -> None:
    """`ltsweep compare`."""
    c = sub.add_parser("compare", help="best configuration of each sweep side by side (table + PNG)")
    c.add_argument("sweeps", nargs="+", help="sweep names (their YAML `name:`) or run ids of sweep runs")
    c.add_argument("--tracking-uri", default=None, help="MLflow store (default sqlite:///results/mlflow.db)")
    c.add_argument("--out", type=Path, default=Path("compare.png"), help="where to write the PNG of grouped bars")
    c.add_argument("--json", action="store_true", help="print one JSON document (the rows) instead of the table")
    c.set_defaults(func=_cmd_compare)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("ltsweep")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (LtsweepInputError, FileNotFoundError) as exc:
        # Input problems (bad JSON, unknown ids, bad config) carry a message naming file, field and fix. Raised in
        # a Ray task, they arrive wrapped in a RayTaskError (an instance of both) whose message is a traceback:
        # print the original one line.
        cause = getattr(exc, "cause", None)
        print(f"ltsweep: error: {cause if isinstance(cause, LtsweepInputError) else exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
