"""The `ltsweep data` subcommands: `synth` (the synthetic benchmark), `stats` (long-tail and multi-label statistics,
optionally beside LVIS v1's) and `convert-openimages` (the Open Images CSVs to LVIS JSON or the annotation store).
Registered by `pipelines.cli.build_parser`; heavy imports happen inside the handlers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lt_models.data.synthetic.layout import PRESETS
from lt_models.errors import LtsweepInputError


class UserError(LtsweepInputError):
    """A problem with the command line itself."""


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from lt_models.data.synthetic.generate import generate_benchmark

    summary = generate_benchmark(args.out, preset=args.preset, seed=args.seed)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_data_stats(args: argparse.Namespace) -> int:
    from lt_models.data.stats import dataset_stats, format_stats

    stats = dataset_stats(
        args.annotations,
        lam=args.lam,
        hierarchy_file=args.hierarchy,
        plot_dir=None if args.no_plots else Path(args.annotations).parent,
        image_dir=args.images,
        skip_invalid=args.skip_invalid,
    )
    print(format_stats(stats, vs_lvis=args.vs_lvis))
    return 0


def _cmd_convert_openimages(args: argparse.Namespace) -> int:
    if args.store is None and args.out is None:
        raise UserError("convert-openimages needs --store DIR (the annotation store) and/or --out JSON")
    kw = dict(
        skip_invalid=args.skip_invalid, train_ann=args.train_ann, image_dir=args.images, image_sizes=args.image_sizes
    )
    if args.store is not None:
        from lt_models.data.openimages.streaming import convert_openimages_store

        summary = convert_openimages_store(
            args.boxes, args.labels, args.classes, args.hierarchy, args.store, out_json=args.out, **kw
        )
    else:
        from lt_models.data.openimages.convert import convert_openimages

        summary = convert_openimages(args.boxes, args.labels, args.classes, args.hierarchy, args.out, **kw)
    print(json.dumps(summary, indent=2))
    return 0


def add_data(sub) -> None:
    """`ltsweep data synth|stats|convert-openimages`."""
    data = sub.add_parser("data", help="generate, inspect and convert datasets").add_subparsers(
        dest="data_command", required=True
    )
    s = data.add_parser("synth", help="write the synthetic long-tail multi-label benchmark")
    s.add_argument(
        "--preset", choices=sorted(PRESETS), default="demo", help="which synthetic benchmark to write (default demo)"
    )
    s.add_argument(
        "--out", type=Path, required=True, help="output folder (train.json, val.json, hierarchy.json, images/)"
    )
    s.add_argument("--seed", type=int, default=0, help="random seed of the generated data (default 0)")
    s.set_defaults(func=_cmd_data_synth)
    _add_data_stats(data)
    _add_convert_openimages(data)


def _add_data_stats(data) -> None:
    """`ltsweep data stats`."""
    s = data.add_parser("stats", help="long-tail and multi-label statistics of an LVIS-format file")
    s.add_argument("annotations", type=Path, help="LVIS-format annotation JSON")
    s.add_argument(
        "--lam",
        type=float,
        default=None,
        help="also report expected views per image of head/tail classes under soft-balance λ",
    )
    s.add_argument(
        "--hierarchy",
        type=Path,
        default=None,
        help="class hierarchy JSON (names or Open Images MIDs); default hierarchy.json beside the file",
    )
    s.add_argument("--no-plots", action="store_true", help="do not write PNG plots beside the file")
    s.add_argument(
        "--images",
        type=Path,
        default=None,
        help="image folder checked for missing files (default: <annotations dir>/images if it exists)",
    )
    s.add_argument("--skip-invalid", action="store_true", help="skip invalid records and report a count")
    s.add_argument(
        "--vs-lvis",
        action="store_true",
        help="also print the file's long-tail figures beside LVIS v1 train's (lt_models.data.stats.LVIS_V1_TRAIN)",
    )
    s.set_defaults(func=_cmd_data_stats)


def _add_convert_openimages(data) -> None:
    """`ltsweep data convert-openimages`."""
    s = data.add_parser("convert-openimages", help="Open Images challenge CSVs -> LVIS-format JSON")
    s.add_argument(
        "--boxes", type=Path, required=True, help="boxes CSV (ImageID, LabelName, XMin, XMax, YMin, YMax, ...)"
    )
    s.add_argument("--labels", type=Path, required=True, help="image-level labels CSV (Confidence 0/1)")
    s.add_argument("--classes", type=Path, required=True, help="class descriptions CSV (LabelName,DisplayName)")
    s.add_argument(
        "--hierarchy", type=Path, required=True, help="class hierarchy JSON (bbox_labels_600_hierarchy.json layout)"
    )
    s.add_argument("--out", type=Path, default=None, help="output LVIS-format JSON (with --store: also write it)")
    s.add_argument(
        "--store",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the annotation store (memory-mapped columns, streaming conversion; give it as "
        "data.train / LVISDetection's file); the JSON is written only when --out is given too",
    )
    s.add_argument("--skip-invalid", action="store_true", help="skip bad rows and report a count")
    s.add_argument(
        "--train-ann",
        type=Path,
        default=None,
        metavar="TRAIN.json",
        help="the already converted training JSON: take each category's frequency bucket (r/c/f) from "
        "its training image counts (matched by MID). Pass it when converting validation/test "
        "splits (LVIS buckets come from training; a training --store DIR works too); without it "
        "the buckets come from this file's own counts, right for the training split only",
    )
    s.add_argument(
        "--images",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder of the split's images (<ImageID>.jpg): sizes the CSVs lack are read from the image "
        "headers (no decoding, in parallel); default <dir of --store, else of --out>/images",
    )
    s.add_argument(
        "--image-sizes",
        type=Path,
        default=None,
        metavar="CSV",
        help="CSV with columns ImageID,ImageWidth,ImageHeight (pixels) giving image sizes instead of "
        "reading the images; rows of other images are ignored",
    )
    s.set_defaults(func=_cmd_convert_openimages)
