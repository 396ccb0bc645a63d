"""Mechanism diagnostics of a trained run: does the memory learn, is it used, does the trust region keep defects out?

An AUROC says whether a run works, not why. These numbers say what the parts did during real training, and
:func:`~trustmae_lib.engine.evaluate.evaluate` writes them into every result file under ``diagnostics``:

* ``reconstruction.l1_good`` -- mean absolute error of the good test images' reconstructions (pixels in [-1, 1]);
* ``reconstruction.diversity`` -- how much the reconstructions differ from image to image, relative to the inputs:
  the per-pixel standard deviation across the good test reconstructions over that across their inputs, each
  averaged over pixels and channels. Near 0 the network returns one image whatever it is given (a collapsed
  auto-encoder), near 1 it follows its input.

For a method with a memory (TrustMAE, *w/o TR*, MemAE), on the training set it was trained on (un-augmented, the
noise included):

* ``memory.slot_movement`` -- ``||m_T - m_0|| / ||m_0||``, the slots' total movement over training relative to their
  initial size (``None`` for runs that did not record their initial slots);
* ``memory.perplexity`` -- ``exp`` of the entropy of the slots' share of all addressing weight: 1 when one slot takes
  everything, ``M`` when every slot is used equally; ``memory.used_slots`` counts slots with any weight, and
  ``memory.nonzero_per_location`` the slots each location reads (MemAE's shrinkage should make it small);
* ``memory.captured_fraction`` -- the share of slots whose nearest training feature (by the memory's own similarity)
  lies in a defect region of an injected defective image (the noise manifest's masks, max-pooled to the memory
  grid): slots that stored a defect. 0 on clean training data.

For TrustMAE with its trust region, ``trust``: the locations it does not trust (beyond the inner radius, with the
radii the run ended with) as a detector of defect regions -- ``untrusted_precision`` (of the untrusted locations,
the share inside a defect) and ``untrusted_recall`` (of the defect locations, the share untrusted; ``None`` on clean
data), beside ``untrusted_fraction``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "slot_movement",
    "slot_usage",
    "captured_fraction",
    "untrusted_scores",
    "reconstruction_stats",
    "memory_state",
    "run_diagnostics",
]


def slot_movement(initial: Tensor | None, final: Tensor) -> float | None:
    """``||m_T - m_0|| / ||m_0||`` (Frobenius norms) of slots ``(M, C)``; ``None`` without the initial slots."""
    if initial is None:
        return None
    initial = initial.to(final.device, final.dtype)
    return float((final - initial).norm() / initial.norm().clamp_min(1e-12))


def slot_usage(weights: Tensor) -> dict:
    """Perplexity of the slots' share of addressing weight, used slots and slots read per location.

    Args:
        weights: ``(..., M)`` addressing weights of many locations.
    """
    w = weights.reshape(-1, weights.shape[-1]).float()  # (N, M)
    share = w.sum(0)
    share = share / share.sum().clamp_min(1e-12)  # (M,)
    entropy = -(share * torch.log(share.clamp_min(1e-30))).sum()
    return {
        "perplexity": float(math.exp(float(entropy))),
        "used_slots": int((w.sum(0) > 0).sum()),
        "nonzero_per_location": float((w > 0).sum(1).float().mean()),
        "slots": int(w.shape[1]),
    }


def captured_fraction(slots: Tensor, features: Tensor, defective: Tensor, similarity: str = "cosine") -> float:
    """Share of slots whose nearest feature is a defect location.

    Args:
        slots: ``(M, C)``.
        features: ``(N, C)`` training features.
        defective: ``(N,)`` bool, the feature's location lies in a defect region.
        similarity: ``"cosine"`` or ``"dot"``, as the memory addresses.
    """
    if not bool(defective.any()):
        return 0.0
    if similarity == "cosine":
        sim = F.normalize(slots.float(), dim=1) @ F.normalize(features.float(), dim=1).T  # (M, N)
    else:
        sim = slots.float() @ features.float().T
    return float(defective[sim.argmax(dim=1)].float().mean())


def untrusted_scores(trusted: Tensor, defective: Tensor) -> dict:
    """The untrusted locations (``~trusted``) as a detector of defect locations: fraction, precision, recall.

    ``precision`` is ``None`` when every location is trusted, ``recall`` when there is no defect location.
    """
    untrusted, defective = ~trusted.reshape(-1), defective.reshape(-1)
    hit = (untrusted & defective).sum()
    n_untrusted, n_defective = int(untrusted.sum()), int(defective.sum())
    return {
        "untrusted_fraction": float(untrusted.float().mean()),
        "untrusted_precision": float(hit) / n_untrusted if n_untrusted else None,
        "untrusted_recall": float(hit) / n_defective if n_defective else None,
    }


def reconstruction_stats(images: Tensor, recons: Tensor) -> dict:
    """``l1_good`` and ``diversity`` (see the module) of ``(N, 3, S, S)`` images and their reconstructions (``None``
    where there are too few images: a test folder without good images, or one good image for a spread)."""
    images, recons = images.float(), recons.float()
    n = int(images.shape[0])
    return {
        "l1_good": float((images - recons).abs().mean()) if n else None,
        "diversity": float(recons.std(dim=0).mean() / images.std(dim=0).mean().clamp_min(1e-12)) if n > 1 else None,
        "n_images": n,
    }


@torch.inference_mode()
def memory_state(model, images: Tensor, batch_size: int = 16) -> dict | None:
    """Encoder features, addressing weights and trusted mask of ``images`` (eval mode), or ``None`` without memory.

    Returns:
        ``{"features" (B, C, h, w), "weights" (B, h, w, M), "trusted" (B, h, w) bool or None, "memory" module}``.
    """
    from trustmae_lib.model.trustmae import TrustMAE

    memory = getattr(model, "memory", None)
    if memory is None:
        return None
    model.eval()
    feats, weights, trusted = [], [], []
    device = next(model.parameters()).device
    for i in range(0, images.shape[0], batch_size):
        x = images[i : i + batch_size].to(device)
        if isinstance(model, TrustMAE):
            out = model(x)
            z, w, t = out.features, out.readout.weights, out.trusted
        else:  # MemAE2D: encoder -> memory
            z = model.encoder(x)
            w, t = memory(z).weights, None
        feats.append(z.float().cpu())
        weights.append(w.float().cpu())
        if t is not None:
            trusted.append(t.cpu())
    return {
        "features": torch.cat(feats),
        "weights": torch.cat(weights),
        "trusted": torch.cat(trusted) if trusted else None,
        "memory": memory,
    }


def run_diagnostics(model, initial_slots: Tensor | None, train_images: Tensor, train_masks: Tensor,
                    good_images: Tensor, good_recons: Tensor) -> dict:  # fmt: skip
    """Every diagnostic of one trained run (the module's list).

    Args:
        model: the trained network (TrustMAE, a baseline auto-encoder or MemAE).
        initial_slots: ``(M, C)`` slots the run started from, or ``None``.
        train_images, train_masks: the training set as trained on (``(N, 3, S, S)``, ``(N, 1, S, S)``).
        good_images, good_recons: the good test images and their reconstructions.
    """
    out: dict = {"reconstruction": reconstruction_stats(good_images, good_recons)}
    state = memory_state(model, train_images)
    if state is None:
        return out
    z = state["features"]  # (B, C, h, w)
    defect = F.adaptive_max_pool2d(train_masks.float(), z.shape[-2:]).squeeze(1) > 0.5  # (B, h, w)
    rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, C)
    slots = state["memory"].memory.detach().float().cpu()
    out["memory"] = {
        "slot_movement": slot_movement(initial_slots, slots),
        **slot_usage(state["weights"]),
        "captured_fraction": captured_fraction(slots, rows, defect.reshape(-1), state["memory"].similarity),
        "defect_locations": int(defect.sum()),
        "locations": int(defect.numel()),
    }
    if state["trusted"] is not None:
        out["trust"] = untrusted_scores(state["trusted"], defect)
    return out
