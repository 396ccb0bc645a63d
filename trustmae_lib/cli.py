"""Command line: ``python -m trustmae_lib <command> ...`` (also installed as ``trustmae``).

Each command is a function that adds its sub-parser and sets ``func``; it is registered in
:data:`COMMANDS` with :func:`command`, so later commands (train, evaluate, score, sweep) are one function
each. Every :class:`~trustmae_lib.errors.TrustMAEError` is caught in :func:`main`: it prints
``error: <message>`` on stderr and returns 2, without a traceback; so is memory running out anywhere (naming what
to lower).

Example:
    $ python -m trustmae_lib data synthetic --profile cpu --out data/cpu/synthetic
    $ python -m trustmae_lib data info data/cpu/synthetic

Your own images (a folder ``parts/screw/train/good/*.png``, optionally ``test/`` and ``ground_truth/``):
    $ trustmae train --dataset parts --category screw --contamination 0.05 --out runs
    $ trustmae evaluate runs/parts-screw-n00-overlap-trustmae-cpu-s0-<hash>       # needs parts/screw/test/
    $ trustmae score runs/parts-screw-n00-overlap-trustmae-cpu-s0-<hash> new_images/ --out scored
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from trustmae_lib import __version__
from trustmae_lib.errors import TrustMAEError

#: ``name -> register(subparsers)``; ``register`` adds ``subparsers.add_parser(name, ...)`` with ``func`` set.
COMMANDS: dict[str, Callable[[argparse._SubParsersAction], None]] = {}


def command(name: str):
    """Decorator: register a sub-command's parser builder under ``name``."""

    def wrap(register: Callable[[argparse._SubParsersAction], None]):
        COMMANDS[name] = register
        return register

    return wrap


def _add_profile(parser: argparse.ArgumentParser, default: str = "cpu") -> None:
    text = f"profile name (smoke, cpu, paper) or a YAML file (default: {default})"
    parser.add_argument("--profile", default=default, help=text)


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def _data_build(args: argparse.Namespace) -> int:
    from trustmae_lib.config import load_profile
    from trustmae_lib.data import elpv, synthetic
    from trustmae_lib.data.embedded import dataset_root

    profile = load_profile(args.profile)
    out = Path(args.out) if args.out else dataset_root(args.dataset, profile)
    if args.dataset == "synthetic":
        current = synthetic.is_current(out, profile, args.seed, args.categories)
        build = lambda: synthetic.generate_synthetic(out, profile, args.seed, args.categories)  # noqa: E731
    else:
        current = elpv.is_current(out, profile, args.seed)
        build = lambda: elpv.write_elpv(out, profile, args.seed)  # noqa: E731
    if current and not args.force:
        print(f"{args.dataset} dataset in {out} is up to date (profile {profile.name}, seed {args.seed})")
        return 0
    root = build()
    print(f"wrote {args.dataset} dataset to {root} (profile {profile.name}, seed {args.seed})")
    return 0


def _data_info(args: argparse.Namespace) -> int:
    from trustmae_lib.data.embedded import describe

    rows = describe(args.root)
    cols = (
        "category",
        "train_good",
        "test_good",
        "test_defective",
        "masks",
        "fixed_orientation",
        "defect_types",
    )
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip())
    return 0


@command("data")
def _register_data(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "data",
        help="build an embedded dataset or describe a dataset folder",
        description="Build the embedded datasets (MVTec AD layout) or list a dataset.",
    )
    inner = parser.add_subparsers(dest="dataset", metavar="{synthetic,elpv,info}", required=True)
    builders = {
        "synthetic": "texture photos and a drawn object with painted defects and masks",
        "elpv": "real solar-cell EL images (elpv-dataset, CC BY-NC-SA 4.0), image labels",
    }
    for name, text in builders.items():
        p = inner.add_parser(name, help=text, description=f"Write the {name} dataset: {text}.")
        p.add_argument("--out", help="dataset root to write (default: <data dir>/<profile>/" + name + ")")
        _add_profile(p)
        p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
        p.add_argument("--force", action="store_true", help="rebuild even if an identical dataset exists")
        if name == "synthetic":
            p.add_argument("--categories", nargs="+", metavar="CAT", help="subset of brick grass gravel widget")
        p.set_defaults(func=_data_build)
    p = inner.add_parser("info", help="list the categories of a dataset folder and their counts")
    p.add_argument("root", help="dataset root in MVTec AD layout")
    p.set_defaults(func=_data_info)


# ----------------------------------------------------------------------------------------------------------
# train / evaluate / score
# ----------------------------------------------------------------------------------------------------------


def _check_device(text: str | None) -> None:
    """A one-line error for a device torch does not know or this machine lacks (torch would raise later)."""
    if text in (None, "auto"):
        return
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise TrustMAEError(f"unknown device {text!r}; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            raise TrustMAEError(f"device {text!r} is not available ({count} CUDA devices); use --device cpu")
    elif device.type != "cpu":
        raise TrustMAEError(f"device {text!r} is not supported; use cpu, cuda or cuda:<index>")


def _spec_from_args(args: argparse.Namespace):
    from trustmae_lib.config import RunSpec
    from trustmae_lib.data.embedded import EMBEDDED_DATASETS

    if args.steps < 0:
        raise TrustMAEError(f"--steps {args.steps} must be positive (0 = the profile's steps)")
    try:
        ratio = float(args.noise_ratio)
    except ValueError:
        raise TrustMAEError(f"noise ratio {args.noise_ratio!r} is not a number; pass e.g. 0.1 for 10 %") from None
    dataset = args.dataset
    if dataset not in EMBEDDED_DATASETS:
        path = Path(dataset).expanduser()
        if not path.is_dir():
            raise TrustMAEError(f"dataset {dataset!r} is neither 'synthetic', 'elpv' nor an existing folder; pass an "
                                "embedded name or a folder in MVTec AD layout")  # fmt: skip
        dataset = str(path.resolve())  # one spelling per folder, so the config hash is stable
    return RunSpec(dataset=dataset, category=args.category, noise_ratio=ratio, protocol=args.protocol,
                   method=args.method, profile=args.profile, seed=args.seed, backbone=args.backbone or "",
                   steps=args.steps, reading=_reading(getattr(args, "reading", None)),
                   channels_last=bool(getattr(args, "channels_last", False)), fast=getattr(args, "fast", None),
                   threads=int(getattr(args, "threads", 1)), augment=getattr(args, "augment", "auto"))  # fmt: skip


def _reading(name: str | None) -> str | None:
    """``--reading``: ``None`` (not given) runs the method's default, ``literal`` (or ``""``) the supplement-literal
    construction, anything else a key of READINGS."""
    return "" if name in ("literal", "") else name


def _contamination(args: argparse.Namespace) -> float | None:
    """``--contamination`` as a checked float, or ``None`` when not given."""
    from trustmae_lib.config import check_contamination

    text = getattr(args, "contamination", None)
    return None if text is None else check_contamination(text)


def _batch_size(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise TrustMAEError(f"--batch-size {args.batch_size} must be at least 1")
    return args.batch_size


def _train(args: argparse.Namespace) -> int:
    import os

    from trustmae_lib.engine.train import TrainingInterrupted, train
    from trustmae_lib.io import read_json

    spec = _spec_from_args(args)
    contamination = _contamination(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        run_dir = train(spec, args.out, resume=args.resume, progress=not args.no_progress, device=args.device,
                        contamination=contamination)  # fmt: skip
    except TrainingInterrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        return 130
    if main_rank:
        info = read_json(run_dir / "run.json")
        augment = info["augment"]
        source = "given" if info["contamination_source"] == "given" else "= the injected noise ratio"
        print(f"trained {spec.method} on {Path(spec.dataset).name}/{spec.category}: {run_dir}")
        print(f"  {info['n_train']} training images, {info['n_test']} test images; augmentation "
              f"{'flips and 90-degree turns' if augment['applied'] else 'none'} ({augment['reason']}); "
              f"assumed contamination {info['assumed_contamination']:.2f} ({source})")  # fmt: skip
        if args.evaluate:
            from trustmae_lib.engine.evaluate import evaluate, format_result

            print(format_result(evaluate(run_dir, device=args.device)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from trustmae_lib.engine.evaluate import evaluate, format_result

    batch_size = _batch_size(args)
    result = evaluate(args.run_dir, variants=args.variants, device=args.device, batch_size=batch_size,
                      contamination=_contamination(args))  # fmt: skip
    print(format_result(result))
    print(f"wrote {Path(args.run_dir) / 'result.json'}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from trustmae_lib.engine.evaluate import score_files

    threshold = None
    if args.threshold is not None:
        try:
            threshold = float(args.threshold)
        except ValueError:
            raise TrustMAEError(f"--threshold {args.threshold!r} is not a number; pass e.g. --threshold 0.5") from None
        if args.contamination is not None:
            raise TrustMAEError("--threshold and --contamination both set the threshold; pass one of them")
    out = Path(args.out) if args.out else Path(args.run_dir) / "scored"
    scored = score_files(args.run_dir, args.path, out, variant=args.variant, device=args.device,
                         batch_size=_batch_size(args), threshold=threshold,
                         contamination=_contamination(args))  # fmt: skip
    applied = scored.threshold
    print(f"threshold {applied['value']:.6g}: {applied['description']}")
    print(f"wrote {scored.csv} (anomalous = score > threshold) and heat-map overlays to {out}")
    return 0


_CONTAMINATION_HELP = ("assumed share of defective images in the training folder, 0..0.9; sets the decision "
                       "threshold (quantile 1 - (R + 0.05) of the training scores)")  # fmt: skip


def _train_epilog() -> str:
    import textwrap

    from trustmae_lib.config import DATASET_JSON_KEYS

    keys = "\n".join(
        textwrap.fill(text, 116, initial_indent=f"    {key + ':':<19}", subsequent_indent=" " * 23)
        for key, text in DATASET_JSON_KEYS.items()
    )
    return f"""\
dataset folder (MVTec AD layout):
  <root>/<category>/train/good/*.png                    required: the training images
  <root>/<category>/test/<good|defect type>/*.png       optional: evaluate needs it; noise injection draws from it
  <root>/<category>/ground_truth/<defect type>/<stem>_mask.png   optional: pixel metrics
  <root>/dataset.json                                   optional, a JSON object; keys read (lists of categories):
{keys}
    e.g. {{"fixed_orientation": ["screw"], "textures": ["fabric"]}}

--augment auto (default) follows the paper's rule: flips and 90-degree turns for every category except MVTec AD's
cable, metal_nut and transistor and the categories dataset.json lists under fixed_orientation. "on" / "off" decide
for the run (recorded in run.json; a run folder of its own, suffix -augon / -augoff).

--contamination R (default: the --noise-ratio) is an evaluation setting: it is recorded in run.json and used by
evaluate and score for the threshold, but it does not change the training or the run folder."""


@command("train")
def _register_train(sub: argparse._SubParsersAction) -> None:
    from trustmae_lib.config import AUGMENT, METHODS, PROTOCOLS, READINGS

    p = sub.add_parser("train", help="train one run (TrustMAE, an ablation or a baseline)",
                       description="Train one run into <out>/<run name>-<config hash>/ (checkpoint.pt, log.csv, "
                                   "manifest.json, run.json). Needs only <dataset>/<category>/train/good. Works "
                                   "under torchrun for DDP.",
                       epilog=_train_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--dataset", default="synthetic", help="'synthetic', 'elpv' or a folder in MVTec AD layout")
    p.add_argument("--category", default="brick", help="category folder name (default: brick)")
    p.add_argument("--noise-ratio", default="0.0",
                   help="defective test images to inject into the training set (the noise study), as a fraction of "
                        "it, 0..0.9 (default 0); needs test/<defect type> images")  # fmt: skip
    p.add_argument("--contamination", default=None, metavar="R",
                   help=_CONTAMINATION_HELP + " (default: the noise ratio)")  # fmt: skip
    p.add_argument("--augment", default="auto", choices=AUGMENT,
                   help="flips and 90-degree turns of the training images (default: auto, see below)")  # fmt: skip
    p.add_argument("--protocol", default="overlap", choices=PROTOCOLS,
                   help="noise protocol: overlap (defects drawn from the test set; default) or disjoint (from a "
                   "pool never tested: the category's defect_pool/, else half of each type's test images)")  # fmt: skip
    p.add_argument("--method", default="trustmae", choices=METHODS, help="what to train (default: trustmae)")
    _add_profile(p)
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draw and the training (default: 0)")
    p.add_argument("--backbone", default="", help="perceptual backbone override: vgg19 or efficientnet_lite0")
    p.add_argument("--steps", type=int, default=0, help="training steps override (default: the profile's)")
    p.add_argument(
        "--reading",
        default=None,
        choices=["literal", "", *READINGS],
        metavar="NAME",
        help="reading of the choices the supplement leaves open (default: the method's own -- the learned memory "
        "'ema' for TrustMAE, 'shrink2m_lr2e3' for MemAE); 'literal' for the supplement-literal construction (the "
        f"default up to 0.1.0); others: {', '.join(READINGS)}",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="train in the channels-last layout on the CPU too (~1.15x faster; its own run folder)",
    )
    p.add_argument(
        "--fast",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the speed path of chapter 14: channels-last and the perceptual backbone's BatchNorm folded into its "
        "convolutions (~1.4x faster per TrustMAE step; equal up to float rounding; suffix -fast). On by default "
        "since 0.2.0; --no-fast trains as up to 0.1.0",
    )
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads the run trains and is scored with (default 1: reproducible; others are keyed "
                        "apart, suffix -t<n>)")  # fmt: skip
    p.add_argument("--out", default="runs", help="parent folder of the run folders (default: runs)")
    p.add_argument("--resume", action="store_true", help="continue the run's checkpoint")
    p.add_argument("--evaluate", action="store_true", help="evaluate right after training (writes result.json)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


@command("evaluate")
def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a trained run's test set and write result.json",
                       description="Image / pixel ROC AUC per scoring variant, a threshold fitted on training "
                                   "scores, precision / recall / F1; writes RUN_DIR/result.json and "
                                   "RUN_DIR/scores.csv. Needs the run's test images (<category>/test/).")  # fmt: skip
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("--contamination", default=None, metavar="R",
                   help=_CONTAMINATION_HELP + " (default: the run's, see its run.json)")  # fmt: skip
    p.add_argument("--variants", nargs="+", metavar="V",
                   help="perceptual pixel global (TrustMAE) or residual (baselines); default: all")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if available)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.set_defaults(func=_evaluate)


@command("score")
def _register_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score an image or a folder of images with a trained run",
                       description="Writes scores.csv (image, score, threshold, anomalous = score > threshold, "
                                   "overlay, variant, threshold_source, assumed_contamination, width, height) and "
                                   "<stem>_overlay.png heat maps at each image's own size, with a colour bar, into "
                                   "--out. The threshold: --threshold T if given; else fitted on the run's training "
                                   "images at --contamination R if given; else the one in RUN_DIR/result.json, or "
                                   "fitted at the run's assumed contamination (run.json). It is printed.")  # fmt: skip
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("path", help="an image file or a folder of images")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/scored)")
    p.add_argument("--threshold", default=None, metavar="T", help="apply this score threshold")
    p.add_argument("--contamination", default=None, metavar="R",
                   help=_CONTAMINATION_HELP + " (default: the run's)")  # fmt: skip
    p.add_argument("--variant", default=None, help="scoring variant (default: perceptual / residual)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default: 16)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if available)")
    p.set_defaults(func=_score)


# ----------------------------------------------------------------------------------------------------------
# sweep
# ----------------------------------------------------------------------------------------------------------


def _sweep(args: argparse.Namespace) -> int:
    from trustmae_lib.study.sweep import forget, load_sweep, parse_shard, run_sweep

    config = load_sweep(args.config)
    shard = parse_shard(args.shard)
    if args.fresh:  # `make reproduce`: recompute this sweep's cells from scratch (other sweeps' files stay)
        forget(config)
    summary = run_sweep(config, jobs=args.jobs, shard=shard, device=args.device, limit=args.limit)
    print(f"sweep {config.name}: {summary['total']} cells, {summary['skipped']} already done, "
          f"{summary['done']} computed, {len(summary['failed'])} failed -> {config.results_dir}")  # fmt: skip
    for name, error in summary["failed"]:
        print(f"  failed: {name}: {error}")
    return 1 if summary["failed"] else 0


@command("sweep")
def _register_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a noise-study grid (dataset x category x noise x method x seed)",
                       description="Trains and evaluates every missing cell of a sweep file; each result is its own "
                                   "JSON file; finished cells are skipped, failed ones retried.")  # fmt: skip
    p.add_argument("config", help="sweep name in configs/ (sweep_cpu, sweep_paper) or a YAML path")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default: 1)")
    p.add_argument("--shard", default=None, help="i/n: run only every n-th cell from i (batch-scheduler arrays)")
    p.add_argument("--fresh", action="store_true", help="delete the sweep's results and runs first")
    p.add_argument("--limit", type=int, default=0, help="compute at most this many missing cells (default: all)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: CUDA if available)")
    p.set_defaults(func=_sweep)


# ----------------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustmae", description="TrustMAE (WACV 2021) reproduced.")
    parser.add_argument("--version", action="version", version=f"trustmae_lib {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}", required=True)
    for register in COMMANDS.values():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0 ok, 2 user or file error, 130 Ctrl-C."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (argparse printed it)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        _check_device(getattr(args, "device", None))
        return int(args.func(args) or 0)
    except TrustMAEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the OS refused a file operation (a file where a folder should be, no space, ...)
        where = f": {exc.filename}" if exc.filename else ""
        message = TrustMAEError(f"{exc.strerror or exc}{where}; check the path, permissions and free space")
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves first and says so itself)
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, MemoryError) as exc:  # out of memory outside a training step or scoring (they name more)
        from trustmae_lib.utils import is_out_of_memory

        if not is_out_of_memory(exc):
            raise
        message = TrustMAEError(f"out of memory ({str(exc).splitlines()[0][:120]}); lower --batch-size, or the "
                                "profile's batch_size / image_size (--profile FILE.yaml)")  # fmt: skip
        print(f"error: {message}", file=sys.stderr)
        return 2
