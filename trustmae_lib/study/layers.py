"""Which backbone layers find the defects? The spatial perceptual distance of finished runs, taken apart.

The book's image score (chapter 10) is the maximum of the smoothed spatial perceptual distance: per backbone layer the
channel-normalised squared feature difference between an image and its reconstruction, upsampled and summed with
Eq. 12's layer weights (1/32 ... 1, the deepest layer weighted most). Whether a category is held back by its
reconstructions or by that scoring is a question the result files cannot answer. This module re-scores finished runs
with other combinations of the *same* per-layer maps (:data:`SCORINGS`): each layer alone, equal weights, each layer
divided by its mean over the run's training images, the mean of the top 1 % of the map instead of its maximum.

It changes no run and trains nothing: the maps come from the run's checkpoint, its backbone (folded as it scored),
layout and thread count, so the ``paper`` scoring is the run's own ``perceptual`` image score to the bit (tested).
``python -m trustmae_lib.study.layers OUT SWEEP [SWEEP ...]`` probes every run of the named sweeps and writes ``OUT``
(``make scoring-validation``; chapter 10 reads it). Used on validation copies only: the book chooses no setting on
its test images.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from trustmae_lib.errors import TrustMAEError

__all__ = ["SCORINGS", "TOP_FRACTION", "layer_maps", "image_scores", "probe_run", "probe_sweeps", "main"]

#: Top share of a map's pixels averaged by the ``paper_top1`` scoring.
TOP_FRACTION = 0.01

#: Scoring name -> what it does with the per-layer maps ``d_l`` (``layer<l>`` for every layer, 1 = shallowest).
SCORINGS: dict[str, str] = {
    "paper": "sum_l lambda_l d_l (Eq. 12 weights), smoothed, maximum -- the book's perceptual score",
    "layer<l>": "d_l of one layer alone, smoothed, maximum",
    "equal": "sum_l d_l (equal weights), smoothed, maximum",
    "normalised": "sum_l d_l / mean(d_l over the run's training images), smoothed, maximum",
    "paper_top1": "the paper's map, smoothed, mean of its top 1 % of pixels instead of the maximum",
}


def layer_maps(trained, images: Tensor, batch_size: int = 16) -> Tensor:
    """Unsmoothed per-layer perceptual distances of a trained TrustMAE run, ``(N, L, S, S)``, shallow to deep.

    The images go through the auto-encoder and the backbone exactly as :func:`~trustmae_lib.engine.evaluate.score`
    sends them (resized to ``trained.score_size``, channels-last, in batches of ``batch_size``).
    """
    from trustmae_lib.config import is_trustmae
    from trustmae_lib.engine.evaluate import _backbone_for, _resize
    from trustmae_lib.model.distance import perceptual_distance_layers

    if not is_trustmae(trained.method):
        raise TrustMAEError(f"layer_maps: {trained.method} has no perceptual distance; probe a trustmae run")
    size, layout = trained.score_size, torch.channels_last
    model = trained.models["model"].eval().to(memory_format=layout)
    backbone = _backbone_for(trained).to(memory_format=layout)
    out = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            x = _resize(chunk, size).to(trained.device, torch.float32).contiguous(memory_format=layout)
            recon = model(x).recon.float()
            maps = perceptual_distance_layers(backbone(x), backbone(recon), (size, size))
            out.append(torch.cat([m.float().cpu().contiguous() for m in maps], 1))
    return torch.cat(out) if out else torch.zeros(0, len(backbone.layer_weights), size, size)


def image_scores(test: Tensor, train_mean: Sequence[float], weights: Sequence[float], sigma: float,
                 batch_size: int = 16) -> dict[str, np.ndarray]:  # fmt: skip
    """Every scoring of :data:`SCORINGS` from per-layer maps ``test (N, L, S, S)``.

    Args:
        test: :func:`layer_maps` of the images to score.
        train_mean: per layer, the mean of ``d_l`` over the run's training images (for ``normalised``).
        weights: Eq. 12's layer weights of the backbone.
        sigma: the smoothing of :func:`~trustmae_lib.model.distance.smoothing_sigma`.
        batch_size: images smoothed at a time (the scoring's batches).

    Returns:
        scoring name -> ``(N,)`` image scores.
    """
    from trustmae_lib.model.distance import smooth, weighted_sum

    n_layers = test.shape[1]
    if not (len(weights) == len(train_mean) == n_layers):
        raise TrustMAEError(f"image_scores: {n_layers} layer maps, {len(weights)} weights and {len(train_mean)} "
                            "training means -- pass one of each per layer")  # fmt: skip
    combos = {"paper": list(weights)}
    combos.update({f"layer{i + 1}": [1.0 if j == i else 0.0 for j in range(n_layers)] for i in range(n_layers)})
    combos["equal"] = [1.0] * n_layers
    combos["normalised"] = [1.0 / max(float(m), 1e-12) for m in train_mean]
    out: dict[str, list] = {name: [] for name in [*combos, "paper_top1"]}
    for chunk in test.split(batch_size):
        for name, w in combos.items():
            m = smooth(weighted_sum(chunk.split(1, dim=1), w), sigma)
            out[name].append(m.amax((1, 2, 3)))
            if name == "paper":
                k = max(1, round(TOP_FRACTION * m[0].numel()))
                out["paper_top1"].append(m.flatten(1).topk(k, 1).values.mean(1))
    return {name: torch.cat(v).numpy() if v else np.zeros(0) for name, v in out.items()}


def probe_run(run_dir: str | Path, batch_size: int = 16) -> dict:
    """Image AUROC of every scoring of :data:`SCORINGS` on a finished TrustMAE run's test set.

    Returns:
        ``run`` (the folder's name), the cell (``dataset``, ``category``, ``method``, ``reading``, ``noise_ratio``,
        ``seed``, ``steps``), ``n_test``, ``train_platform`` and ``image_auroc`` (scoring -> AUROC).
    """
    from trustmae_lib.engine.evaluate import (
        _backbone_for,
        _require_test_images,
        _test_tensors,
        _train_images,
        image_auroc,
    )
    from trustmae_lib.engine.runs import load_trained
    from trustmae_lib.model.distance import smoothing_sigma
    from trustmae_lib.utils import torch_threads

    run_dir = Path(run_dir)
    trained = load_trained(run_dir)
    _require_test_images(trained.split, trained.index.root, trained.spec.category, run_dir)
    size = trained.score_size
    with torch_threads(trained.spec.threads):  # the run's own thread count, as evaluate scores
        images, _ = _test_tensors(trained, size)
        test = layer_maps(trained, images, batch_size)
        train = layer_maps(trained, _train_images(trained, size), batch_size)
        weights = _backbone_for(trained).layer_weights
        scores = image_scores(test, train.mean((0, 2, 3)).tolist(), weights, smoothing_sigma(size), batch_size)
    labels = [s.label for s in trained.split.test]
    spec, meta = trained.spec, trained.meta
    return {
        "run": run_dir.name,
        "dataset": Path(str(spec.dataset)).name,
        "category": spec.category,
        "method": spec.method,
        "reading": spec.reading,
        "noise_ratio": spec.noise_ratio,
        "seed": spec.seed,
        "steps": int(meta.get("step", trained.profile.steps)),
        "n_test": len(labels),
        "train_platform": meta.get("platform"),
        "image_auroc": {name: image_auroc(labels, s.tolist()) for name, s in scores.items()},
    }


def probe_sweeps(names: Sequence[str], out: str | Path, batch_size: int = 16, progress: bool = True) -> dict:
    """:func:`probe_run` on every cell of the named sweeps; writes ``out`` (JSON) and returns its content.

    Raises:
        TrustMAEError: a cell of a sweep has no finished run folder (the message names the sweep to run).
    """
    from trustmae_lib import __version__
    from trustmae_lib.engine.runs import is_finished, run_dir_for
    from trustmae_lib.io import write_json
    from trustmae_lib.model.perceptual import LAYER_WEIGHTS
    from trustmae_lib.study.sweep import load_sweep
    from trustmae_lib.utils import platform_info

    cells = []
    for name in names:
        config = load_sweep(name)
        for spec in config.grid():
            run_dir = run_dir_for(spec, config.runs_dir)
            if not is_finished(run_dir, spec):
                raise TrustMAEError(f"{run_dir.name}: no finished run of sweep {name} in {config.runs_dir} (the "
                                    f"probe needs its checkpoint); train the sweep's runs with 'trustmae sweep {name} "
                                    "--fresh' (make memory-validation trains every validation sweep)")  # fmt: skip
            cells.append((name, run_dir))
    runs = []
    for name, run_dir in tqdm(cells, desc="scoring probe", unit="run", disable=not progress):
        runs.append({"sweep": name, **probe_run(run_dir, batch_size)})
    record = {
        "what": "image AUROC of finished TrustMAE runs under other combinations of the per-layer perceptual "
        "distance (trustmae_lib.study.layers); 'paper' is each run's own perceptual score",
        "library_version": __version__,
        "platform": platform_info(),
        "sweeps": list(names),
        "scorings": SCORINGS,
        "layer_weights": list(LAYER_WEIGHTS),
        "top_fraction": TOP_FRACTION,
        "runs": runs,
    }
    write_json(out, record)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trustmae_lib.study.layers", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the JSON file to write")
    parser.add_argument("sweeps", nargs="+", help="sweep names (configs/<name>.yaml) whose runs to probe")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        probe_sweeps(args.sweeps, args.out, args.batch_size)
    except TrustMAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
