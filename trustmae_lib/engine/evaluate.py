"""Scoring and evaluation: anomaly maps, image / pixel ROC AUC, a training-side threshold.

**Spatial perceptual distance** (*reading*; the main paper's definition is not in our source). For an image
``x`` and its reconstruction ``x_hat``, take the frozen backbone's five feature maps (the Eq. 12 layers), normalise
every location's feature vector to unit L2 norm over the channels, sum the squared difference over the channels,
upsample each layer's map bilinearly to the image size and combine the layers with the Eq. 12 weights
``1/32 ... 1``::

    A(x)[p] = sum_l lambda_l * up( || f_l(x)[p]/|f_l(x)[p]| - f_l(x_hat)[p]/|f_l(x_hat)[p]| ||^2 )

The map is lightly smoothed with a Gaussian (sigma = 4 px at 256 px, scaled with the image side) and the **image
score is its maximum**. Scoring variants (supplement Table 3 ablations; they only change scoring, so they reuse
the trained networks):

* ``perceptual`` -- the full spatial perceptual distance above (TrustMAE);
* ``pixel`` (*w/o PD*) -- the per-pixel squared distance ``sum_c (x - x_hat)^2``, smoothed, max;
* ``global`` (*w/o SP*) -- the perceptual distance without a spatial map: per layer the features are averaged over
  all locations, normalised over the channels and compared (squared distance), layers weighted as above; the score
  is that number and the "map" is constant (no pixel AUC).

Baselines are scored by their own residual maps (``residual``): MemAE and objects with the squared error, AE-SSIM
with ``1 - SSIM``; AE-L2 / AE-SSIM on textures with sliding windows at their input size over the 4x texture image
(supplement §B). The image score is again the max of the smoothed map (*reading*: one rule for every method, so
the comparison is between the maps).

**Threshold** (engineering; the paper reports only AUC). A decision threshold may use only training-side data.
The training set is contaminated: a fraction ``r`` of it is defective, and those images -- if the model works --
carry the highest training scores. We therefore set the threshold at the ``1 - (r + 0.05)`` quantile of the
*training* scores (the 0.05 margin absorbing defects the model reconstructs well and the spread of the normal
scores), i.e. the 95th percentile of normal-looking training images at ``r = 0``. ``r`` is the **assumed
contamination** of the training set: by default the run's injected noise ratio (the noise study knows it); a user
whose own training folder already holds an unknown share of defects states it with ``contamination``
(``trustmae train|evaluate|score --contamination R``, :func:`resolve_contamination`). Training scores come from the
un-augmented training images, which the model has seen, so they are slightly optimistic; precision, recall, F1 and
the confusion matrix on the test set show what that threshold gives. The test scores never enter the threshold.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, roc_auc_score
from torch import Tensor

from trustmae_lib import __version__
from trustmae_lib.config import check_contamination, is_trustmae
from trustmae_lib.data.mvtec import IMAGE_EXTENSIONS, read_image
from trustmae_lib.data.tensors import image_tensor, load_tensors
from trustmae_lib.engine.diagnostics import run_diagnostics
from trustmae_lib.engine.prepare import load_train_tensors, prepare, tensor_cache_dir
from trustmae_lib.engine.runs import load_trained
from trustmae_lib.errors import TrustMAEError
from trustmae_lib.io import atomic_write, read_json, write_json
from trustmae_lib.model.distance import (
    global_perceptual_distance,
    perceptual_distance_map,
    pixel_distance_map,
    smooth,
    smoothing_sigma,
)
from trustmae_lib.model.patchcore import PatchBank, anomaly_maps, patch_features
from trustmae_lib.model.perceptual import build_backbone
from trustmae_lib.utils import is_out_of_memory, pick_device, platform_info, torch_threads

__all__ = [
    "VARIANTS",
    "THRESHOLD_MARGIN",
    "PIXEL_AUC_MAX",
    "Scores",
    "image_auroc",
    "pixel_auroc",
    "fit_threshold",
    "resolve_contamination",
    "score_threshold",
    "overlay",
    "overlay_with_colorbar",
    "score_files",
    "ScoredFiles",
    "threshold_metrics",
    "default_variants",
    "score",
    "score_variants",
    "evaluate",
    "RESULT",
    "PROVENANCE_KEYS",
]

#: Scoring variants of TrustMAE models (Table 3): full, w/o PD, w/o SP. Baselines have only ``residual``.
VARIANTS = ("perceptual", "pixel", "global")
#: Added to the assumed contamination when fitting the threshold (see the module docstring).
THRESHOLD_MARGIN = 0.05
#: Pixel AUC uses at most this many pixels (a seeded subsample beyond it).
PIXEL_AUC_MAX = 4_000_000
RESULT = "result.json"
SCORES = "scores.csv"
PROVENANCE_KEYS = (
    "dataset",
    "category",
    "noise_ratio",
    "protocol",
    "manifest_hash",
    "method",
    "backbone",
    "backbone_weights",
    "profile",
    "profile_digest",
    "seed",
    "steps",
    "library_version",
    "torch_version",
    "device",
    "train_wall_s",
    "eval_wall_s",
    "config_hash",
)


class Scores(NamedTuple):
    """Output of :func:`score`."""

    anomaly_maps: Tensor  # (N, 1, S, S) smoothed anomaly maps
    pred_scores: Tensor  # (N,) image scores (max of the map; the global distance for "global")
    recons: Tensor  # (N, 3, S, S) reconstructions in [-1, 1]


class ScoredFiles(NamedTuple):
    """Output of :func:`score_files`."""

    csv: Path  # <out>/scores.csv
    threshold: dict  # what score_threshold returned: value, source, description, ...


# --------------------------------------------------------------------------------------------------------------
# Maps
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Scoring trained runs
# --------------------------------------------------------------------------------------------------------------


def default_variants(method: str) -> tuple[str, ...]:
    return VARIANTS if is_trustmae(method) else ("residual",)


def _check_variants(method: str, variants: Sequence[str]) -> tuple[str, ...]:
    allowed = default_variants(method)
    bad = [v for v in variants if v not in allowed]
    if bad or not variants:
        raise TrustMAEError(
            f"scoring variant(s) {bad or '(none)'} do not apply to method '{method}'; choose from {', '.join(allowed)}"
        )
    return tuple(variants)


def _resize(images: Tensor, size: int) -> Tensor:
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return TF.resize(images, [size, size], antialias=True).clamp(-1, 1)


def _tile_recon(model_fn, images: Tensor, window: int) -> Tensor:
    """Reconstruct a large image from non-overlapping ``window`` tiles: ``(B, C, S, S)`` -> same."""
    b, c, h, w = images.shape
    kernel = dict(kernel_size=window, stride=window)
    cols = F.unfold(images, **kernel)  # (B, C*window*window, L)
    n = cols.shape[-1]
    tiles = cols.transpose(1, 2).reshape(b * n, c, window, window)
    rec = model_fn(tiles).reshape(b, n, c * window * window).transpose(1, 2)
    return F.fold(rec, output_size=(h, w), **kernel)


def _backbone_for(trained):
    cached = getattr(trained, "_backbone", None)
    if cached is None:
        from trustmae_lib.model.perceptual import build_backbone

        fast = bool(getattr(getattr(trained, "spec", None), "fast", False))  # RunSpec.fast: the folded backbone
        cached = build_backbone(trained.profile.backbone, fold_bn=fast).to(trained.device)
        trained._backbone = cached
    return cached


def score(
    trained, images: Tensor, variant: str | None = None, batch_size: int = 16, channels_last: bool = True
) -> Scores:
    """Anomaly maps, image scores and reconstructions of a trained run.

    Runs in ``torch.inference_mode`` in batches, models in eval mode.

    Args:
        trained: a :class:`~trustmae_lib.engine.runs.TrainedRun`.
        images: ``(N, 3, H, W)`` in [-1, 1]; resized to ``trained.score_size`` when their side differs.
        variant: ``perceptual`` (default for TrustMAE), ``pixel``, ``global``; ``residual`` (the only one, and the
            default, for the baselines).
        batch_size: images per forward pass.
        channels_last: run the networks (converted in place) and the batches in the channels-last memory layout,
            which oneDNN and cuDNN convolutions prefer (engineering: 1.3x faster perceptual scoring on a 2-core
            CPU, ``benchmarks/bench_score.py``); the numbers agree with the default layout up to rounding.

    Returns:
        :class:`Scores` -- ``anomaly_maps (N, 1, S, S)``, ``pred_scores (N,)``, ``recons (N, 3, S, S)``, with
        ``S = trained.score_size``.

    Raises:
        TrustMAEError: a variant that does not apply, images of the wrong shape, or memory running out (the message
            names ``--batch-size`` / ``batch_size``).
    """
    variant = variant or default_variants(trained.method)[0]
    return score_variants(trained, images, (variant,), batch_size, channels_last)[variant]


def score_variants(
    trained, images: Tensor, variants: Sequence[str], batch_size: int = 16, channels_last: bool = True
) -> dict[str, Scores]:
    """:func:`score` for several variants at once: one reconstruction (and, for the perceptual variants, one pass of
    the backbone over input and reconstruction) per batch serves them all, so each variant's numbers are exactly
    those :func:`score` gives it alone."""
    method = trained.method
    variants = _check_variants(method, tuple(variants))
    if images.ndim != 4 or images.shape[1] != 3:
        raise TrustMAEError(f"score expects images of shape (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    size = trained.score_size
    sigma = smoothing_sigma(size)
    model = trained.models["model"]
    model.eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=layout)  # only 4-D weights change layout; values are untouched
    try:
        return _score(trained, images, variants, batch_size, channels_last, size, sigma, model, layout)
    except (RuntimeError, MemoryError) as err:
        if not is_out_of_memory(err):
            raise
        raise _scoring_out_of_memory(trained, len(images), size, batch_size) from None


def _scoring_out_of_memory(trained, n: int, size: int, batch_size: int) -> TrustMAEError:
    where = f"out of memory scoring {n} image(s) of {size} px in batches of {batch_size} on {trained.device}"
    if batch_size > 1:
        return TrustMAEError(f"{where}; lower --batch-size (evaluate / score; batch_size= in Python), e.g. "
                             "--batch-size 1; nothing was written")  # fmt: skip
    cpu = "" if trained.device.type == "cpu" else "score with --device cpu, or "
    return TrustMAEError(f"{where}; even one image does not fit: {cpu}train the run with a smaller image_size (now "
                         f"{trained.profile.image_size}) in its profile; nothing was written")  # fmt: skip


def _trustmae_maps(trained, x: Tensor, recon: Tensor, variant: str, size: int, sigma: float, feats: dict,
                   channels_last: bool, layout) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One TrustMAE variant's anomaly map and image score of a batch; ``feats`` caches the backbone's features of the
    input and the reconstruction for the batch's other variants."""
    if variant == "pixel":
        m = smooth(pixel_distance_map(x, recon), sigma)
        return m, m.amax((1, 2, 3))
    backbone = _backbone_for(trained)
    if not feats:
        if channels_last:
            backbone.to(memory_format=layout)
        feats["x"], feats["r"] = backbone(x), backbone(recon)
    fx, fr = feats["x"], feats["r"]
    if variant == "perceptual":
        m = smooth(perceptual_distance_map(fx, fr, (size, size), backbone.layer_weights), sigma)
        return m, m.amax((1, 2, 3))
    s = global_perceptual_distance(fx, fr, backbone.layer_weights)  # global
    return s.view(-1, 1, 1, 1).expand(-1, 1, size, size), s


def _score(trained, images, variants, batch_size, channels_last, size, sigma, model, layout) -> dict[str, Scores]:
    method = trained.method
    dev = trained.device
    out = {v: ([], []) for v in variants}  # variant -> (maps, image scores)
    recons = []
    with torch.inference_mode():
        for chunk in images.split(batch_size):
            x = _resize(chunk, size).to(dev, torch.float32)
            if channels_last:
                x = x.contiguous(memory_format=layout)
            if is_trustmae(method):
                recon = model(x).recon.float()
                feats: dict = {}
                batch = {v: _trustmae_maps(trained, x, recon, v, size, sigma, feats, channels_last, layout)
                         for v in variants}  # fmt: skip
            else:
                from trustmae_lib.model.baselines import get_baseline, sliding_window_map

                base = get_baseline(method)

                def model_fn(t: Tensor) -> Tensor:
                    return model(t).recon.float()

                window = trained.input_size
                if size > window:  # texture protocol: sliding windows over the 4x image
                    raw = sliding_window_map(
                        model_fn,
                        x,
                        window=window,
                        stride=base.texture_stride(trained.profile),
                        residual_fn=base.residual_map,
                    )
                    recon = _tile_recon(model_fn, x, window)
                else:
                    recon = model_fn(x)
                    raw = base.residual_map(x, recon)
                m = smooth(raw.float(), sigma)
                batch = {v: (m, m.amax((1, 2, 3))) for v in variants}  # "residual", the only one
            for v, (m, s) in batch.items():
                out[v][0].append(m.float().cpu().contiguous())  # results in the default layout, whatever ran
                out[v][1].append(s.float().cpu())
            recons.append(recon.float().cpu().contiguous())
    if not recons:
        empty = Scores(torch.zeros(0, 1, size, size), torch.zeros(0), torch.zeros(0, 3, size, size))
        return {v: empty for v in variants}
    recon_all = torch.cat(recons)
    return {v: Scores(torch.cat(maps), torch.cat(preds), recon_all) for v, (maps, preds) in out.items()}


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Image ROC AUC (scikit-learn); ``None`` unless both classes are present."""
    labels = np.asarray(labels).astype(int)
    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


def pixel_auroc(masks: Tensor, maps: Tensor, max_pixels: int = PIXEL_AUC_MAX, seed: int = 0) -> float | None:
    """Pixel ROC AUC over all test images (scikit-learn on the flattened maps).

    Beyond ``max_pixels`` pixels a seeded uniform subsample (without replacement) is used.

    Returns:
        ``None`` unless both defect and normal pixels are present.
    """
    y = (masks.reshape(-1) > 0.5).numpy()
    s = maps.reshape(-1).double().numpy()
    if y.size != s.size:
        raise TrustMAEError(f"pixel_auroc: {y.size} mask pixels but {s.size} map pixels; score at the masks' size")
    if y.size > max_pixels:
        pick = np.random.default_rng(seed).choice(y.size, size=max_pixels, replace=False)
        y, s = y[pick], s[pick]
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, s))


def fit_threshold(train_scores: Sequence[float], noise_ratio: float, margin: float = THRESHOLD_MARGIN) -> dict:
    """Decision threshold from *training* scores only: their ``1 - (noise_ratio + margin)`` quantile.

    Args:
        train_scores: scores of the (contaminated) training images.
        noise_ratio: the defective fraction assumed in the training set -- the run's assumed contamination
            (:func:`resolve_contamination`: its injected noise ratio unless a contamination was given).
        margin: extra fraction assumed defective.

    Returns:
        ``{"value", "quantile", "assumed_noise", "n_train", "rule"}``.
    """
    scores = np.asarray(train_scores, dtype=np.float64)
    if scores.size == 0:
        raise TrustMAEError("fit_threshold needs at least one training score")
    assumed = min(max(float(noise_ratio) + margin, 0.0), 1.0)
    q = 1.0 - assumed
    return {
        "value": float(np.quantile(scores, q)),
        "quantile": q,
        "assumed_noise": assumed,
        "n_train": int(scores.size),
        "rule": "quantile 1 - (noise_ratio + margin) of training scores",
    }


def threshold_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """Precision, recall, F1 (defective = positive) and the confusion matrix ``[[TN, FP], [FN, TP]]``."""
    labels = np.asarray(labels).astype(int)
    pred = (np.asarray(scores, dtype=np.float64) > threshold).astype(int)
    p, r, f, _ = precision_recall_fscore_support(labels, pred, labels=[1], average=None, zero_division=0)
    cm = confusion_matrix(labels, pred, labels=[0, 1])
    return {"precision": float(p[0]), "recall": float(r[0]), "f1": float(f[0]), "confusion_matrix": cm.tolist()}


# --------------------------------------------------------------------------------------------------------------
# evaluate a run folder
# --------------------------------------------------------------------------------------------------------------


#: What ``contamination_source`` says about where the assumed contamination came from.
CONTAMINATION_SOURCES = {
    "noise_ratio": "the run's injected noise ratio",
    "train": "given to train --contamination",
    "given": "given here (--contamination)",
}


def resolve_contamination(trained, contamination: float | None = None) -> tuple[float, str]:
    """The assumed contamination a threshold is fitted at, and its source (a key of :data:`CONTAMINATION_SOURCES`).

    ``contamination`` given here wins; else the value recorded at training (``trustmae train --contamination``,
    ``run.json``'s ``assumed_contamination``); else the run's injected noise ratio.
    """
    if contamination is not None:
        return check_contamination(contamination), "given"
    meta = getattr(trained, "meta", {}) or {}
    if meta.get("contamination_source") == "given" and meta.get("assumed_contamination") is not None:
        return float(meta["assumed_contamination"]), "train"
    return float(trained.spec.noise_ratio), "noise_ratio"


def threshold_block(contamination: float, source: str) -> dict:
    """The result record's ``threshold`` entry: the assumed contamination, its source and the rule."""
    return {
        "assumed_contamination": contamination,
        "contamination_source": source,
        "margin": THRESHOLD_MARGIN,
        "rule": "quantile 1 - (assumed_contamination + margin) of the run's training scores",
    }


def variant_metrics(labels, test_scores, train_scores, noise_ratio: float, masks=None, maps=None) -> dict:
    """One scoring variant's metrics: image (and, with ``masks`` and ``maps``, pixel) AUROC, the threshold fitted
    on the training scores only (at the assumed contamination ``noise_ratio``), and the decisions it gives on the
    test set."""
    test_scores, train_scores = np.asarray(test_scores), np.asarray(train_scores)
    threshold = fit_threshold(train_scores, noise_ratio)
    return {
        "image_auroc": image_auroc(labels, test_scores),
        "pixel_auroc": pixel_auroc(masks, maps) if masks is not None and maps is not None else None,
        "threshold": threshold,
        **threshold_metrics(labels, test_scores, threshold["value"]),
        "train_score_mean": float(train_scores.mean()),
    }


def result_record(spec, profile, split, metrics: dict, labels, *, backbone: tuple, device, steps: int,
                  score_size: int, train: dict, eval_wall_s: float, config_hash: str | None,
                  threshold: dict | None = None) -> dict:  # fmt: skip
    """The result file of one cell, the same keys for every method (the first metric is the primary variant).

    ``threshold`` (:func:`threshold_block`; default: the noise ratio as the assumed contamination) records what every
    variant's threshold assumed about the training set; it sits beside ``metrics``, so a run's metrics are the same
    whatever file version recorded them.

    Provenance: what ran (spec, profile digest, manifest hash, backbone by package and file hash, library and torch
    versions) and where (``platform``: CPU model, ISA level, threads -- see :func:`trustmae_lib.utils.platform_info`;
    ``train_platform`` for the training run, which may have been another process).
    """
    primary = next(iter(metrics))
    return {
        "metrics": metrics,
        "primary_variant": primary,
        "image_auroc": metrics[primary]["image_auroc"],
        "pixel_auroc": metrics[primary]["pixel_auroc"],
        "dataset": spec.dataset,
        "category": spec.category,
        "noise_ratio": spec.noise_ratio,
        "realised_noise_ratio": split.realised_ratio,
        "protocol": spec.protocol,
        "manifest_hash": split.manifest_hash,
        "method": spec.method,
        "reading": spec.reading,
        "backbone": backbone[0],
        "backbone_weights": backbone[1],
        "profile": profile.name,
        "profile_digest": profile.digest(),
        "seed": spec.seed,
        "steps": steps,
        "library_version": __version__,
        "torch_version": str(torch.__version__),
        "device": str(device),
        "platform": platform_info(device),
        "train_device": train["device"],
        "train_channels_last": train["channels_last"],
        "train_platform": train["platform"],
        "train_wall_s": round(train["wall_s"], 3),
        "eval_wall_s": round(eval_wall_s, 3),
        "config_hash": config_hash,
        "n_train": len(split.train),
        "n_test": len(labels),
        "n_test_defective": int(np.sum(labels)),
        "score_size": score_size,
        "threshold": threshold or threshold_block(float(spec.noise_ratio), "noise_ratio"),
    }


def _train_images(trained, size: int) -> Tensor:
    """The run's training images as trained on (injected defects included), at ``size``."""
    return load_train_tensors(trained.spec, trained.profile, trained.index, trained.split, size)


def _train_set(trained, size: int) -> tuple[Tensor, Tensor]:
    """The run's training images and their defect masks (zero for normal images), at ``size``."""
    return load_train_tensors(trained.spec, trained.profile, trained.index, trained.split, size, with_masks=True)


def _test_tensors(trained, size: int) -> tuple[Tensor, Tensor]:
    """Test images ``(N, 3, S, S)`` and masks ``(N, 1, S, S)`` of a trained run's split."""

    cache = tensor_cache_dir(trained.spec, trained.index.root)
    return load_tensors(list(trained.split.test), size, cache_dir=cache, progress=False)


def _require_test_images(split, root: Path, category: str, run_dir: Path | None = None) -> None:
    """A one-line error when a split has no test images (its category had no ``test/`` folder when it was built)."""
    if split.test:
        return
    folder = Path(root) / category / "test"
    if run_dir is None:
        raise TrustMAEError(f"{category}: no test images to evaluate on; add {folder}/good and "
                            f"{folder}/<defect type> images")  # fmt: skip
    raise TrustMAEError(
        f"{run_dir} has no test images to evaluate ({folder} held no images when it was trained); score images with "
        f"'trustmae score {run_dir} FOLDER', or add {folder}/good and {folder}/<defect type> images and train the "
        "run again (delete the run folder or pass another --out)"
    )


def _score_run(trained, variants, batch_size: int, t0: float,
               contamination: float | None = None) -> tuple[dict, dict[str, np.ndarray]]:  # fmt: skip
    """Every variant's metrics on the run's test set, and the result record (:func:`evaluate`)."""
    variants = _check_variants(trained.method, tuple(variants) if variants else default_variants(trained.method))
    _require_test_images(trained.split, trained.index.root, trained.spec.category, trained.run_dir)
    assumed, source = resolve_contamination(trained, contamination)
    size = trained.score_size
    test = list(trained.split.test)
    images, masks = _test_tensors(trained, size)
    labels = np.array([s.label for s in test], dtype=int)
    train_images, train_masks = _train_set(trained, size)
    has_masks = bool(trained.index.has_masks)

    metrics, per_image = {}, {}
    test_all = score_variants(trained, images, variants, batch_size)  # one forward pass serves every variant
    train_all = score_variants(trained, train_images, variants, batch_size)
    for variant in variants:
        test_scores, train_scores = test_all[variant], train_all[variant].pred_scores
        maps = test_scores.anomaly_maps if has_masks and variant != "global" else None
        metrics[variant] = variant_metrics(labels, test_scores.pred_scores, train_scores, assumed,
                                           masks if maps is not None else None, maps)  # fmt: skip
        per_image[variant] = test_scores.pred_scores.numpy()
    recons = test_all[variants[0]].recons  # the same networks for every variant
    good = torch.from_numpy(labels == 0)
    diagnostics = run_diagnostics(trained.models["model"], trained.meta.get("memory_init"), train_images,
                                  train_masks, images[good], recons[good])  # fmt: skip

    meta = trained.meta
    backbone = meta.get("backbone") or {}
    result = result_record(
        trained.spec, trained.profile, trained.split, metrics, labels,
        backbone=(backbone.get("name"), backbone.get("weights_source")), device=trained.device,
        steps=int(meta.get("step", trained.profile.steps)), score_size=size,
        train={"device": meta.get("device"), "channels_last": meta.get("channels_last"),
               "wall_s": float(meta.get("train_wall_s", 0.0)), "platform": meta.get("platform")},
        eval_wall_s=time.perf_counter() - t0, config_hash=meta.get("config_hash"),
        threshold=threshold_block(assumed, source),
    )  # fmt: skip
    result["diagnostics"] = diagnostics  # beside the metrics: what the parts did (engine/diagnostics.py)
    return result, per_image


def evaluate(
    run_dir: str | Path,
    variants: Sequence[str] | None = None,
    device: str | None = None,
    batch_size: int = 16,
    spec=None,
    contamination: float | None = None,
) -> dict:
    """Score a finished run's test set and write ``result.json`` (and ``scores.csv``) into its folder.

    For each variant: image ROC AUC, pixel ROC AUC (where the dataset has masks and the variant has a map), a
    threshold fitted on the training scores only (:func:`fit_threshold`, at the assumed contamination
    :func:`resolve_contamination` gives) and precision / recall / F1 / confusion matrix on the test set at that
    threshold.

    Args:
        run_dir: a folder written by :func:`trustmae_lib.engine.train.train`.
        variants: default all that apply to the method (:func:`default_variants`).
        device: ``None`` -> CUDA if available, else CPU.
        batch_size: images per forward pass.
        spec: optional :class:`~trustmae_lib.config.RunSpec` the run must match.
        contamination: assumed defective share of the training set for the threshold; ``None``: the run's
            (recorded at training, else its noise ratio). Recorded as ``result["threshold"]``.

    Raises:
        TrustMAEError: the run has no test images (trained on a folder without ``test/``), out of memory (lower
            ``batch_size``), or any problem :func:`~trustmae_lib.engine.runs.load_trained` names.

    Returns:
        The result dict (also written atomically to ``<run_dir>/result.json``): ``metrics`` per variant, the
        provenance keys :data:`PROVENANCE_KEYS` and the run's mechanism ``diagnostics``
        (:mod:`trustmae_lib.engine.diagnostics`).
    """
    t0 = time.perf_counter()
    if contamination is not None:
        contamination = check_contamination(contamination)
    trained = load_trained(run_dir, spec=spec, device=device)
    with torch_threads(trained.spec.threads):  # the run's own thread count: its numbers depend on it
        result, per_image = _score_run(trained, variants, batch_size, t0, contamination)
    run_dir = Path(run_dir)
    _write_scores(run_dir / SCORES, list(trained.split.test), trained.index.root, per_image)
    write_json(run_dir / RESULT, result)
    return result


def _write_scores(path: Path, samples, root: Path, per_variant: dict[str, np.ndarray]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["image", "label", "defect_type", *per_variant])
    for i, s in enumerate(samples):
        try:
            name = Path(s.image).relative_to(root).as_posix()
        except ValueError:
            name = str(s.image)
        writer.writerow([name, s.label, s.defect_type, *(f"{per_variant[v][i]:.8g}" for v in per_variant)])
    with atomic_write(path, "w") as handle:
        handle.write(buffer.getvalue())


def format_result(result: dict) -> str:
    """A short text table of a result dict (for the command line)."""
    head = (
        f"{result['method']} | {result['dataset']}/{result['category']} | noise {result['noise_ratio']:.2f} "
        f"({result['protocol']}) | profile {result['profile']} | seed {result['seed']} | steps {result['steps']}"
    )
    lines = [
        head,
        f"{'variant':<11} {'image AUC':>9} {'pixel AUC':>9} {'thresh':>9} {'prec':>6} {'recall':>6} {'F1':>6}",
    ]

    def fmt(v, w, p=4):
        return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    for name, m in result["metrics"].items():
        lines.append(
            f"{name:<11} {fmt(m['image_auroc'], 9)} {fmt(m['pixel_auroc'], 9)} "
            f"{fmt(m['threshold']['value'], 9, 4)} {fmt(m['precision'], 6, 3)} {fmt(m['recall'], 6, 3)} "
            f"{fmt(m['f1'], 6, 3)}"
        )
    block = result.get("threshold")
    if block:
        source = CONTAMINATION_SOURCES.get(block["contamination_source"], block["contamination_source"])
        lines.append(
            f"thresh: quantile 1 - ({block['assumed_contamination']:.2f} + {block['margin']:.2f}) of the training "
            f"scores; assumed contamination {block['assumed_contamination']:.2f} ({source})"
        )
    lines.append(
        f"train {result['train_wall_s']:.1f} s, eval {result['eval_wall_s']:.1f} s on {result['device']}; "
        f"backbone {result['backbone'] or '-'}"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Scoring image files (command line ``score``)
# --------------------------------------------------------------------------------------------------------------


def _image_files(path: Path) -> list[Path]:

    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise TrustMAEError(f"{path} is not an image ({', '.join(IMAGE_EXTENSIONS)}); pass an image or a folder")
        return [path]
    if not path.is_dir():
        raise TrustMAEError(f"{path} does not exist; pass an image file or a folder of images")
    files = sorted(
        p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise TrustMAEError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); pass a folder with images")
    return files


def _upsample_map(anomaly_map: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """``(1, S, S)`` -> ``(1, H, W)``, bilinear (the map of an image that was stretched to ``S x S`` for scoring)."""
    m = anomaly_map.float()
    if tuple(m.shape[-2:]) == tuple(size_hw):
        return m
    return F.interpolate(m[None], size=tuple(size_hw), mode="bilinear", align_corners=False)[0]


def _colour_index(values: np.ndarray, vmax: float) -> np.ndarray:
    """Index into a 256-entry colour map, as ``matplotlib`` computes it for floats in [0, 1]."""
    scaled = np.clip(values / max(vmax, 1e-12), 0.0, 1.0) * 256.0
    return np.minimum(scaled.astype(np.int64), 255)


def overlay(image: Tensor, anomaly_map: Tensor, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Heat-map overlay: ``image (3, H, W)`` in [-1, 1], ``anomaly_map (1, S, S)`` scaled by ``vmax`` -> uint8 RGB
    ``(H, W, 3)``; a map of another size than the image is upsampled to it (bilinear), so a file scored at the
    model's resolution gets its overlay at its own."""
    from matplotlib import colormaps

    base = ((image.float().permute(1, 2, 0).numpy() + 1.0) / 2.0).clip(0, 1).astype(np.float32)
    values = _upsample_map(anomaly_map, tuple(image.shape[-2:]))[0].numpy()
    lut = colormaps["jet"](np.arange(256))[:, :3].astype(np.float32)
    heat = lut[_colour_index(values, vmax)]
    return (((1 - alpha) * base + alpha * heat) * 255).round().astype(np.uint8)


def colour_bar(height: int, vmax: float, threshold: float | None, label: str = "anomaly score") -> np.ndarray:
    """A vertical ``jet`` colour bar from 0 to ``vmax``, ``height`` pixels tall, drawn with matplotlib, with the
    threshold as a white line and tick: uint8 RGB ``(height, width, 3)`` (width grows with the height)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    dpi, canvas_width = 100, 400  # drawn on a wide canvas, then cut to what the bar and its labels need
    fig = Figure(figsize=(canvas_width / dpi, height / dpi), dpi=dpi, facecolor="white")
    FigureCanvasAgg(fig)
    font = float(np.clip(height / 22, 4, 10))
    margin = (0.8 * font + 2) / height  # room for the end ticks' labels
    bar_width = max(8.0, 0.06 * height)  # pixels
    cax = fig.add_axes((4 / canvas_width, margin, bar_width / canvas_width, 1 - 2 * margin))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, vmax), cmap="jet"), cax=cax)
    ticks = [0.0, vmax]
    if threshold is not None and 0 < threshold < vmax:
        cax.axhline(threshold, color="white", linewidth=max(1.0, height / 150))
        ticks = [0.0, threshold, vmax]
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{t:.3g}" + (" thr" if t == threshold else "") for t in ticks])
    cax.tick_params(labelsize=font, length=2, pad=1)
    if height >= 160:
        bar.set_label(f"{label} (thr = threshold)", fontsize=font)
    fig.canvas.draw()
    right = fig.get_tightbbox(fig.canvas.get_renderer()).x1 * dpi  # inches -> pixels: every label's right edge
    rgba = np.asarray(fig.canvas.buffer_rgba())[:, : min(canvas_width, int(np.ceil(right)) + 3)]
    return np.ascontiguousarray(rgba[..., :3])


def overlay_with_colorbar(image: Tensor, anomaly_map: Tensor, vmax: float, threshold: float | None = None,
                          alpha: float = 0.5) -> np.ndarray:  # fmt: skip
    """:func:`overlay` at the image's own size, with :func:`colour_bar` to its right: uint8 RGB ``(H, W + bar, 3)``.

    The overlay's pixels are exactly :func:`overlay`'s; the bar maps colours to anomaly scores (0 .. ``vmax``) and
    marks ``threshold``.
    """
    picture = overlay(image, anomaly_map, vmax, alpha)
    bar = colour_bar(picture.shape[0], vmax, threshold)
    if bar.shape[0] != picture.shape[0]:  # matplotlib rounds the canvas to whole pixels; never more than one off
        from PIL import Image

        bar = np.asarray(Image.fromarray(bar).resize((bar.shape[1], picture.shape[0])))
    return np.concatenate([picture, bar], axis=1)


def score_threshold(trained, variant: str, threshold: float | None = None, contamination: float | None = None,
                    batch_size: int = 16) -> dict:  # fmt: skip
    """The decision threshold :func:`score_files` applies, and where it came from.

    In order: ``threshold`` as given; else fitted on the run's training images (:func:`fit_threshold`) at
    ``contamination`` if given; else the variant's threshold in the run's ``result.json`` when it was fitted at the
    run's assumed contamination; else fitted at that contamination (:func:`resolve_contamination`).

    Returns:
        ``{"value", "source"}`` (``"given"``, ``"fitted"`` or ``"result.json"``), ``"description"`` (one line for
        people), and for fitted thresholds ``"assumed_contamination"``, ``"contamination_source"``, ``"quantile"``,
        ``"n_train"``.
    """
    if threshold is not None:
        value = float(threshold)
        if not np.isfinite(value):
            raise TrustMAEError(f"threshold {threshold!r} is not a finite number; pass e.g. --threshold 0.5")
        return {"value": value, "source": "given", "description": "given (--threshold)"}
    assumed, source = resolve_contamination(trained, contamination)
    why = CONTAMINATION_SOURCES[source]
    result_path = Path(trained.run_dir) / RESULT
    if source != "given" and result_path.is_file():
        try:
            stored = read_json(result_path)
            entry = stored.get("metrics", {}).get(variant, {}).get("threshold")
            block = stored.get("threshold") or threshold_block(float(trained.spec.noise_ratio), "noise_ratio")
        except (ValueError, AttributeError):  # not JSON, or not the dict evaluate writes
            raise TrustMAEError(f"{result_path} is not a result file; delete it or re-run evaluate") from None
        if entry and entry.get("value") is not None and block.get("assumed_contamination") == assumed:
            return {"value": float(entry["value"]), "source": "result.json", "assumed_contamination": assumed,
                    "contamination_source": source, "quantile": entry.get("quantile"), "n_train": entry.get("n_train"),
                    "description": f"from {result_path}: fitted on the run's {entry.get('n_train')} training images "
                                   f"at assumed contamination {assumed:.2f} ({why})"}  # fmt: skip
    train_scores = score(trained, _train_images(trained, trained.score_size), variant, batch_size).pred_scores
    fitted = fit_threshold(train_scores.numpy(), assumed)
    return {"value": fitted["value"], "source": "fitted", "assumed_contamination": assumed,
            "contamination_source": source, "quantile": fitted["quantile"], "n_train": fitted["n_train"],
            "description": f"fitted on the run's {fitted['n_train']} training images at assumed contamination "
                           f"{assumed:.2f} ({why}): their {fitted['quantile']:.2f} quantile"}  # fmt: skip


#: Columns of ``score``'s CSV, in order.
SCORE_COLUMNS = ("image", "score", "threshold", "anomalous", "overlay", "variant", "threshold_source",
                 "assumed_contamination", "width", "height")  # fmt: skip


def score_files(
    run_dir: str | Path,
    path: str | Path,
    out: str | Path,
    variant: str | None = None,
    device: str | None = None,
    batch_size: int = 16,
    threshold: float | None = None,
    contamination: float | None = None,
) -> ScoredFiles:
    """Score one image or a folder of images with a trained run.

    Every image is stretched to the run's input size for scoring, decoded exactly as the training images are
    (:func:`~trustmae_lib.data.tensors.image_tensor`), so a training image scores what the threshold was fitted on;
    its anomaly map is upsampled back to the image's own size for the overlay. Writes ``<out>/scores.csv``
    (:data:`SCORE_COLUMNS`: file, score, the threshold applied, ``anomalous`` = score > threshold, overlay file
    name, variant, where the threshold came from, the assumed contamination, the image's size) and one
    ``<stem>_overlay.png`` per image: the heat map over the image at the image's resolution (colour scale
    0 .. 2 x threshold, so the threshold sits in the middle of the colour map), with a colour bar to its right that
    marks the threshold. The threshold: :func:`score_threshold`.

    Args:
        threshold: apply this threshold (``trustmae score --threshold``).
        contamination: fit the threshold at this assumed contamination (``--contamination``).

    Returns:
        :class:`ScoredFiles` -- the CSV path and the threshold (:func:`score_threshold`'s dict).
    """
    from PIL import Image

    files = _image_files(Path(path))
    if contamination is not None:
        contamination = check_contamination(contamination)
    trained = load_trained(run_dir, device=device)
    variant = variant or default_variants(trained.method)[0]
    _check_variants(trained.method, [variant])
    size = trained.score_size
    with torch_threads(trained.spec.threads):
        applied = score_threshold(trained, variant, threshold, contamination, batch_size)
        value = applied["value"]
        maps, scores = [], []
        for at in range(0, len(files), batch_size):  # decode a batch at a time: a large folder never sits in memory
            chunk = torch.stack([image_tensor(f, size) for f in files[at : at + batch_size]])
            scored = score(trained, chunk, variant, batch_size)
            maps += list(scored.anomaly_maps)
            scores += scored.pred_scores.tolist()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vmax = 2 * value if value > 0 else max(max((float(m.max()) for m in maps), default=1.0), 1e-12)
    contamination_text = "" if applied.get("assumed_contamination") is None else f"{applied['assumed_contamination']:g}"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(SCORE_COLUMNS)
    for f, anomaly_map, s in zip(files, maps, scores, strict=True):
        name = f"{f.stem}_overlay.png"
        pixels = read_image(f)
        image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1.0
        picture = overlay_with_colorbar(image, anomaly_map, vmax=vmax, threshold=value)
        with atomic_write(out / name, "wb") as handle:
            Image.fromarray(picture).save(handle, format="PNG")
        writer.writerow([str(f), f"{s:.8g}", f"{value:.8g}", int(s > value), name, variant, applied["source"],
                         contamination_text, pixels.shape[1], pixels.shape[0]])  # fmt: skip
    csv_path = out / SCORES
    with atomic_write(csv_path, "w") as handle:
        handle.write(buffer.getvalue())
    return ScoredFiles(csv_path, applied)


def evaluate_patchcore(spec, device: str | None = None, batch_size: int = 16) -> dict:
    """Build the bank from ``spec``'s noisy training split, score its test set; a result dict like
    :func:`trustmae_lib.engine.evaluate.evaluate`'s (variant ``patch_knn``), with ``steps = 0`` (nothing is trained).
    """
    if spec.method != "patchcore":
        raise TrustMAEError(f"evaluate_patchcore got method '{spec.method}'; pass a RunSpec with method='patchcore'")
    with torch_threads(spec.threads):
        return _patchcore_record(spec, device, batch_size)


def _patchcore_record(spec, device, batch_size: int) -> dict:
    t0 = time.perf_counter()
    profile, index, split = prepare(spec)
    _require_test_images(split, index.root, spec.category)
    dev = pick_device(device)
    backbone = build_backbone(profile.backbone).to(dev).eval()
    size = profile.image_size
    train_images = load_train_tensors(spec, profile, index, split, size)
    test = list(split.test)
    images, masks = load_tensors(test, size, cache_dir=tensor_cache_dir(spec, index.root), progress=False)
    labels = np.array([s.label for s in test], dtype=int)

    train_feats = patch_features(backbone, train_images.to(dev), batch_size=batch_size).cpu()
    bank = PatchBank(train_feats)
    t_bank = time.perf_counter() - t0
    test_feats = patch_features(backbone, images.to(dev), batch_size=batch_size).cpu()
    test_maps, test_scores = anomaly_maps(bank.distances(test_feats), size)
    _, train_scores = anomaly_maps(bank.distances(train_feats, exclude=torch.arange(len(train_feats))), size)
    entry = variant_metrics(labels, test_scores, train_scores, spec.noise_ratio,
                            masks if index.has_masks else None, test_maps)  # fmt: skip
    record = result_record(
        spec,
        profile,
        split,
        {"patch_knn": entry},
        labels,
        backbone=(backbone.name, backbone.weights_source),
        device=dev,
        steps=0,
        score_size=size,
        eval_wall_s=time.perf_counter() - t0 - t_bank,
        train={"device": str(dev), "channels_last": None, "wall_s": t_bank, "platform": platform_info(dev)},
        config_hash=spec.config_hash(),
    )
    return {**record, "bank_patches": len(bank)}
