"""Run profiles (chapter "Reproducibility"): one place for sizes, steps and widths.

A profile is a flat set of scalars read from ``configs/<name>.yaml`` with ``yaml.safe_load`` and checked against
:class:`Profile`'s fields: an unknown key or a value of the wrong type is a one-line :class:`TrustMAEError`
naming the key. Notebooks and the CLI never hard-code epochs or sizes; they call :func:`load_profile`.

Example:
    >>> p = load_profile("smoke")
    >>> p.image_size % 32
    0
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.resources
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from trustmae_lib.errors import TrustMAEError


def _checkout_root() -> Path | None:
    """The repository checkout the package is imported from (``pip install -e .`` or the checkout on ``sys.path``),
    or ``None`` for an installed wheel (whose parent folder is ``site-packages``)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() and (root / "configs" / "smoke.yaml").is_file() else None


#: The root of the repository checkout the library runs from; ``None`` when it runs from an installed wheel.
REPO_ROOT = _checkout_root()


def shipped_dir(in_checkout: str, packaged: str) -> Path:
    """A folder of files that ship with the library: ``<checkout>/<in_checkout>`` in a checkout, else the copy the
    wheel carries as ``trustmae_lib/<packaged>`` (pyproject.toml maps the checkout's folder there)."""
    if REPO_ROOT is not None:
        return REPO_ROOT / in_checkout
    return Path(str(importlib.resources.files("trustmae_lib") / packaged))


def require_checkout(what: str, otherwise: str = "") -> Path:
    """The checkout's root, or a one-line :class:`TrustMAEError` saying that ``what`` needs the checkout (and
    ``otherwise``, what else would do)."""
    if REPO_ROOT is None:
        raise TrustMAEError(
            f"{what} needs the repository checkout, but trustmae_lib runs from an installed wheel: clone your copy of "
            "the repository and `pip install -e .` in it" + (f", or {otherwise}" if otherwise else "")
        )
    return REPO_ROOT


#: The profiles and sweep files: the checkout's ``configs/``, or the copy inside an installed wheel.
CONFIG_DIR = shipped_dir("configs", "_configs")
PROFILES = ("smoke", "cpu", "paper")
MEMORY_INIT = ("features", "kmeans", "uniform")


@dataclass(frozen=True)
class Profile:
    """Every size a run depends on. Defaults are the ``smoke`` profile."""

    name: str = "smoke"
    # --- data -------------------------------------------------------------------------------------------------
    image_size: int = 64  # model input side; must be a multiple of 32 (five stride-2 stages, Table 1)
    synthetic_size: int = 64  # side of the images the synthetic generator writes to disk
    synthetic_train: int = 12  # normal training images per synthetic category
    synthetic_test_good: int = 6
    synthetic_test_defect: int = 6  # per category, spread over the defect types
    elpv_max_per_class: int = 24  # cap on images per (category, label) taken from elpv; 0 = all
    # --- model ------------------------------------------------------------------------------------------------
    width: float = 0.125  # channel multiplier; 1.0 is exactly supplement Table 1
    memory_slots: int = 32  # M (reading: not given in the supplement)
    memory_topk: int = 4  # sparse addressing: slots kept per location (reading)
    memory_temperature: float = 0.1  # softmax temperature of cosine addressing (reading)
    # TrustMAE slots at step 0: "features" (random features of the first batch), "kmeans" (k-means centroids of the
    # whole training set's features) or "uniform" (MemAE's random init)
    memory_init: str = "features"
    backbone: str = "efficientnet_lite0"  # perceptual backbone: "vgg19" (paper) or "efficientnet_lite0" (offline)
    # --- training ---------------------------------------------------------------------------------------------
    batch_size: int = 4
    steps: int = 4
    lr: float = 2e-4
    lr_disc: float = 2e-4
    log_every: int = 1
    checkpoint_every: int = 0  # 0 = only at the end
    # --- evaluation -------------------------------------------------------------------------------------------
    seeds: int = 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Short stable hash of the profile (part of every run's config hash)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def replace(self, **changes) -> Profile:
        return _build(self.name, {**self.to_dict(), **changes}, source="override")


#: Smallest allowed value of each integer field (checked by :func:`load_profile`).
_MINIMUM = {"image_size": 32, "synthetic_size": 32, "synthetic_train": 1, "synthetic_test_good": 1,
            "synthetic_test_defect": 1, "elpv_max_per_class": 0, "batch_size": 1, "steps": 1, "log_every": 0,
            "checkpoint_every": 0, "seeds": 1}  # fmt: skip


def _build(name: str, raw: dict, source: str) -> Profile:
    known = {f.name: f for f in fields(Profile)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrustMAEError(f"{source}: unknown key '{key}'{hint}; allowed keys: {', '.join(known)}")
        want = type(Profile.__dataclass_fields__[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise TrustMAEError(f"{source}: key '{key}' must be {want.__name__}, got {type(value).__name__} {value!r}")
        values[key] = value
    values.setdefault("name", name)
    profile = Profile(**values)
    # Sizes and counts below these would train nothing or fail deep inside torch; rates: positive and finite.
    for key, low in _MINIMUM.items():
        if getattr(profile, key, low) < low:
            raise TrustMAEError(f"{source}: key '{key}' must be at least {low}, got {getattr(profile, key)}")
    for key in ("lr", "lr_disc", "memory_temperature"):
        value = getattr(profile, key)
        if not 0 < value < float("inf"):
            raise TrustMAEError(f"{source}: key '{key}' must be a positive number, got {value}")
    if profile.image_size % 32:
        raise TrustMAEError(
            f"{source}: image_size {profile.image_size} must be a multiple of 32 (Table 1 has "
            "five stride-2 stages); use e.g. 64, 128 or 256"
        )
    if not 0 < profile.width <= 4:
        raise TrustMAEError(f"{source}: width {profile.width} must be in (0, 4]; 1.0 is supplement Table 1")
    if profile.memory_init not in MEMORY_INIT:
        raise TrustMAEError(
            f"{source}: memory_init must be one of {', '.join(MEMORY_INIT)}, got {profile.memory_init!r}"
        )
    if not 1 <= profile.memory_topk <= profile.memory_slots:
        raise TrustMAEError(f"{source}: memory_topk must be between 1 and memory_slots ({profile.memory_slots})")
    return profile


def read_config_file(name_or_path: str | Path, missing: Callable[[Path], str]) -> tuple[Path, dict]:
    """Read ``configs/<name>.yaml`` (or a YAML path) with ``yaml.safe_load``: ``(path, mapping)``.

    Args:
        name_or_path: a file name in ``configs/`` without ``.yaml``, or a path ending in ``.yaml`` / ``.yml``.
        missing: the one-line error for a file that does not exist, given its path.

    Raises:
        TrustMAEError: a missing file, invalid YAML, or a document that is not a mapping.
    """
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise TrustMAEError(missing(path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise TrustMAEError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise TrustMAEError(f"{path}: expected a mapping of key: value, got {type(raw).__name__}")
    return path, raw


def load_profile(name_or_path: str | Path = "smoke", **overrides) -> Profile:
    """Load a profile by name (``smoke``, ``cpu``, ``paper``) or from a YAML file path.

    Args:
        name_or_path: profile name in ``configs/`` or a path to a YAML file.
        **overrides: field values that replace the file's (e.g. ``steps=10``).
    """

    def missing(path: Path) -> str:
        if Path(name_or_path).suffix in (".yaml", ".yml"):
            return f"profile file {path} does not exist; pass an existing YAML file or a profile name"
        return f"unknown profile '{name_or_path}'; choose one of {', '.join(PROFILES)} or pass a YAML file path"

    path, raw = read_config_file(name_or_path, missing)
    return _build(path.stem, {**raw, **overrides}, source=str(path))


#: Methods the harness trains. Scoring variants (w/o PD, w/o SP) reuse the trained models and are not methods.
METHODS = ("trustmae", "trustmae_no_tr", "memae", "ae_l2", "ae_ssim")  # trained methods
#: Context baselines with nothing to train (scored straight from a pretrained backbone):
#: :mod:`~trustmae_lib.model.patchcore`.
REFERENCE_METHODS = ("patchcore",)
ALL_METHODS = METHODS + REFERENCE_METHODS
#: The memory auto-encoder and its *w/o TR* ablation: one network, with or without the trust region.
TRUSTMAE_METHODS = ("trustmae", "trustmae_no_tr")


def is_trustmae(method: str) -> bool:
    """Whether ``method`` is TrustMAE or its ablation (GAN training, perceptual scoring, readings apply)."""
    return method in TRUSTMAE_METHODS


PROTOCOLS = ("overlap", "disjoint")
#: ``RunSpec.augment`` / ``trustmae train --augment``: flips and quarter turns of the training images. ``auto``: every
#: category except MVTec AD's fixed-orientation ones and those a ``dataset.json`` lists under ``fixed_orientation``.
AUGMENT = ("auto", "on", "off")
#: Largest assumed contamination (the threshold is the ``1 - (contamination + margin)`` quantile of training scores).
MAX_CONTAMINATION = 0.9


def check_contamination(value) -> float:
    """The assumed defective share of a training folder as a float in [0, 0.9]; a one-line error otherwise."""
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise TrustMAEError(f"contamination {value!r} is not a number; pass the assumed defective share of the "
                            "training images, e.g. 0.05 for 5 %") from None  # fmt: skip
    if not 0.0 <= share <= MAX_CONTAMINATION:  # also refuses nan
        raise TrustMAEError(f"contamination {value} is outside [0, {MAX_CONTAMINATION}]; pass the assumed defective "
                            "share of the training images, e.g. 0.05 for 5 %")  # fmt: skip
    return share


#: The keys a dataset folder's optional ``dataset.json`` may set (read by :mod:`trustmae_lib.data.mvtec`; here so that
#: the command line can show them without importing torch).
DATASET_JSON_KEYS = {
    "fixed_orientation": "categories trained without flips and rotations (besides MVTec AD's cable, metal_nut, "
    "transistor)",
    "textures": "texture categories (besides MVTec AD's five): AE-L2 / AE-SSIM train on crops and score with sliding "
    "windows",
}

#: Version of each embedded category's train and test images, bumped when they change. From version 2 on it is part
#: of a run's config hash, so results computed on older images go stale (version 1 is left out of the hash, so cells
#: on unchanged images keep theirs). The synthetic generator's version 2 recalibrated the textures and added the gear;
#: the widget's images did not change.
CATEGORY_VERSIONS = {
    "synthetic": {"brick": 2, "grass": 2, "gravel": 2, "widget": 1, "gear": 2},
    "elpv": {"mono": 1, "poly": 1},
}


def category_version(dataset: str, category: str) -> int:
    """The version of an embedded category's images (1 for a user's dataset folder)."""
    return CATEGORY_VERSIONS.get(str(dataset), {}).get(category, 1)


#: The noise levels of supplement Tables 3 and 4.
PAPER_NOISE_RATIOS = (0.05, 0.10, 0.15, 0.20, 0.30, 0.40)

#: Alternative *readings* of choices the supplement leaves open (trust-region radii, detached reads, k, M,
#: lambda_trust), for the principled-variant study of chapter 12, and the learned memory of chapter 4. Each names the
#: constructor arguments (``model``), Eq. 9 weights (``loss``), slot initialisation (``init``) and optimiser
#: (``train``) it changes and why it is a reasonable reading; the default reading (``""``) is the library's. A
#: reading applies to the TrustMAE methods unless it lists its ``methods`` (MemAE's). Chosen on validation copies,
#: never the test set.
#: The learned memory's model settings (chapter 4), shared by the `ema` readings below.
_LEARNED = {"projection": True, "slot_update": "ema", "trust_normalised": True}

READINGS: dict[str, dict] = {
    "inner60": {"model": {"inner_quantile": 0.6},
                "why": "stricter trust region: only the nearest 60 % of features pull their slot (default 80 %)"},
    "nopush": {"model": {"outer_quantile": 0.8},
               "why": "no push band (outer radius = trust radius): far features are ignored, never pushed"},
    "attached": {"model": {"detach_untrusted": False},
                 "why": "untrusted locations read the live memory, so they still move slots through the losses"},
    "trust01": {"loss": {"trust": 0.1},
                "why": "lambda_trust 0.1 instead of 1: L_trust no longer dominates the slots' gradient"},
    "m512": {"model": {"memory_slots": 512},
             "why": "M = 512 slots (profile: 128), the paper-profile count: more room to store defects too"},
    # The learned memory of chapter 4 (issue: the slots barely move under Adam). Chosen on validation copies.
    "ema": {"model": dict(_LEARNED),
            "init": {"memory_init": "kmeans"},
            "why": "slots learn as moving averages of the trusted features (online k-means), start at k-means "
                   "centroids of the whole training set, and are addressed in a linear projection of the features"},
    "ema8": {"model": {**_LEARNED, "stages": 4},
             "init": {"memory_init": "kmeans"},
             "why": "the learned memory on an 8 x 8 grid at 128 px (one stride-2 stage fewer), the grid Table 1 has "
                    "at 256 px"},
    # MemAE (a baseline): the shrinkage threshold of the MemAE paper's recommended interval [1/M, 3/M] (our default
    # 0.0025 is the official code's, chosen there for M = 2000; at M = 128 it is below 1/M and shrinks nothing), and
    # the same network without its memory, the twin that says what the memory adds.
    "shrink1m": {"methods": ("memae",), "model": {"shrink_threshold": 1 / 128},
                 "why": "MemAE's shrinkage threshold at 1/M (the MemAE paper's interval [1/M, 3/M]; default 0.0025)"},
    "shrink2m": {"methods": ("memae",), "model": {"shrink_threshold": 2 / 128},
                 "why": "MemAE's shrinkage threshold at 2/M (the middle of the MemAE paper's interval)"},
    "nomem": {"methods": ("memae",), "model": {"use_memory": False},
              "why": "MemAE's encoder and decoder without the memory: the twin that shows what the memory adds"},
    # MemAE trained to convergence within the study's one budget of 300 steps: the supplement's Adam lr 1e-4 leaves its
    # reconstruction loss still falling at step 600, so the learning rate is raised (chosen on validation copies,
    # sweep_cpu_memae_validation.yaml); the twin gets the same rate.
    "shrink2m_lr5e4": {"methods": ("memae",), "model": {"shrink_threshold": 2 / 128}, "train": {"lr": 5e-4},
                       "why": "MemAE at threshold 2/M trained with Adam lr 5e-4 (supplement: 1e-4)"},
    "shrink2m_lr1e3": {"methods": ("memae",), "model": {"shrink_threshold": 2 / 128}, "train": {"lr": 1e-3},
                       "why": "MemAE at threshold 2/M trained with Adam lr 1e-3 (supplement: 1e-4)"},
    "shrink2m_lr2e3": {"methods": ("memae",), "model": {"shrink_threshold": 2 / 128}, "train": {"lr": 2e-3},
                       "why": "MemAE at threshold 2/M trained with Adam lr 2e-3 (supplement: 1e-4)"},
    "nomem_lr1e3": {"methods": ("memae",), "model": {"use_memory": False}, "train": {"lr": 1e-3},
                    "why": "MemAE's memory-less twin trained with Adam lr 1e-3 (supplement: 1e-4)"},
    "nomem_lr2e3": {"methods": ("memae",), "model": {"use_memory": False}, "train": {"lr": 2e-3},
                    "why": "MemAE's memory-less twin trained with Adam lr 2e-3 (supplement: 1e-4)"},
    "ema_noproj": {"model": {"slot_update": "ema", "trust_normalised": True}, "init": {"memory_init": "kmeans"},
                   "why": "the learned memory without the projection: addressed in the encoder's ReLU features"},
    "ema_first": {"model": dict(_LEARNED),
                  "why": "the learned memory started from one batch's features (the library's init), not k-means"},
    # The read-out of the learned memory (issue: reconstructions vary little from image to image): a sharper softmax
    # over the top-k cosine similarities, so that each location reads mostly its nearest slot instead of a mixture.
    "ema_t05": {"model": {**_LEARNED, "memory_temperature": 0.05},
                "init": {"memory_init": "kmeans"},
                "why": "the learned memory read out at softmax temperature 0.05 (profile: 0.1): a sharper mixture"},
    # The learned memory trained faster (issue: TrustMAE reconstructs good images worse than every baseline after the
    # study's 300 steps): both Adam learning rates raised from the profile's 2e-4. Probed on validation copies.
    "ema_lr5e4": {"model": dict(_LEARNED), "init": {"memory_init": "kmeans"}, "train": {"lr": 5e-4, "lr_disc": 5e-4},
                  "why": "the learned memory with both Adam learning rates at 5e-4 (profile: 2e-4)"},
    "ema_lr1e3": {"model": dict(_LEARNED), "init": {"memory_init": "kmeans"}, "train": {"lr": 1e-3, "lr_disc": 1e-3},
                  "why": "the learned memory with both Adam learning rates at 1e-3 (profile: 2e-4)"},
    "ema_t02": {"model": {**_LEARNED, "memory_temperature": 0.02},
                "init": {"memory_init": "kmeans"},
                "why": "the learned memory read out at softmax temperature 0.02: nearly the nearest slot alone"},
}  # fmt: skip


def reading_methods(reading: str) -> tuple[str, ...]:
    """The methods a reading of :data:`READINGS` applies to (the TrustMAE methods unless it names others)."""
    return tuple(READINGS[reading].get("methods", TRUSTMAE_METHODS))


#: The reading a run gets when it names none (:class:`RunSpec` ``reading=None``), per method; since 0.2.0 the learned
#: memory of chapter 4 for TrustMAE and *w/o TR*, and for MemAE the shrinkage threshold and learning rate chosen on
#: validation copies in chapter 13 -- the settings of the noise study's core. ``""`` (no overrides) is the
#: supplement-literal construction, the default up to 0.1.0: slots optimised by Adam from one batch's features,
#: addressed in the encoder's ReLU features; MemAE at the official code's threshold 0.0025 and Adam lr 1e-4.
DEFAULT_READINGS: dict[str, str] = {"trustmae": "ema", "trustmae_no_tr": "ema", "memae": "shrink2m_lr2e3"}


def default_reading(method: str) -> str:
    """The reading ``method`` runs under when none is named (``""`` for methods without readings)."""
    return DEFAULT_READINGS.get(method, "")


#: The version of the code that produced a result, as its config hash sees it. Bumped when a change alters the
#: numbers of an unchanged :class:`RunSpec`; 0.2.0 changed which spec is the default (the reading and the speed path),
#: which the spec itself tells apart, so results keyed under 0.1.0 stay valid and keep their files.
RESULTS_VERSION = "0.1.0"


@dataclass(frozen=True)
class RunSpec:
    """One training run: what to train on, how, under which profile and seed.

    Its :meth:`config_hash` (with the profile's values folded in) keys result files and checkpoints, so a changed
    profile or spec never reuses a stale result.
    """

    dataset: str = "synthetic"  # embedded dataset name ("synthetic", "elpv") or a folder in MVTec AD layout
    category: str = "brick"
    noise_ratio: float = 0.0
    protocol: str = "overlap"
    method: str = "trustmae"
    profile: str = "smoke"
    seed: int = 0
    backbone: str = ""  # "" -> the profile's backbone
    steps: int = 0  # 0 -> the profile's steps
    # None -> the method's default reading (DEFAULT_READINGS: since 0.2.0 the learned memory, `ema`, for TrustMAE);
    # "" -> the supplement-literal construction (the default up to 0.1.0); else a key of READINGS.
    reading: str | None = None
    # Engineering, not method: train in the channels-last memory layout on the CPU too (always on for CUDA).
    # About 1.15x faster at the cpu profile (bench_train's step, sweep_time's cells); the weights differ from the
    # default NCHW run by float rounding, so such a run is keyed apart (own hash, run name suffix "-cl").
    channels_last: bool = False
    # Engineering, not method: the speed path of chapter 14 -- the channels-last layout (as above) and the frozen
    # perceptual backbone's BatchNorm folded into its convolutions, in training and in scoring. The same function up
    # to float rounding; about 1.4-1.5x faster per TrustMAE step at the cpu profile (results/bench/speedup.json).
    # None -> on for every trained method (the default since 0.2.0; off up to 0.1.0). Keyed like channels_last (own
    # hash, run name suffix "-fast"), so the results computed without it keep theirs.
    fast: bool | None = None
    # CPU threads the run trains and is scored with. The thread count changes the order of floating-point sums, so
    # a result is reproducible only with its count: fixed per run (default 1, as every committed cell), recorded,
    # and keyed when it is not the default (own hash, run name suffix "-t<n>").
    threads: int = 1
    # Flips and quarter turns of the training images (and of the noise protocol's re-draws): "auto" (the supplement's
    # rule: none for fixed-orientation categories, see trustmae_lib.engine.prepare.augmentation), "on" or "off".
    # It changes the trained network, so it is keyed when not "auto" (own hash, run name suffix "-aug<on|off>").
    augment: str = "auto"

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            close = difflib.get_close_matches(self.method, ALL_METHODS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrustMAEError(f"unknown method '{self.method}'{hint}; choose one of {', '.join(ALL_METHODS)}")
        # The defaults are resolved here, so a spec always says which reading and path it runs (and hashes them).
        if self.reading is None:
            object.__setattr__(self, "reading", default_reading(self.method))
        if self.fast is None:
            object.__setattr__(self, "fast", self.method not in REFERENCE_METHODS)
        if self.protocol not in PROTOCOLS:
            raise TrustMAEError(f"unknown noise protocol '{self.protocol}'; choose one of {', '.join(PROTOCOLS)}")
        if not 0.0 <= float(self.noise_ratio) <= 0.9:
            raise TrustMAEError(f"noise ratio {self.noise_ratio} is outside [0, 0.9]; pass e.g. 0.1 for 10 %")
        if self.reading and self.reading not in READINGS:
            raise TrustMAEError(f"unknown reading '{self.reading}'; choose one of {', '.join(READINGS)} (or none)")
        if self.reading and self.method not in reading_methods(self.reading):
            raise TrustMAEError(f"reading '{self.reading}' applies to {' and '.join(reading_methods(self.reading))}, "
                                f"not {self.method}; drop it")  # fmt: skip
        if not isinstance(self.threads, int) or self.threads < 1:
            raise TrustMAEError(f"threads must be a whole number >= 1, got {self.threads!r}; pass e.g. threads=1")
        if self.augment not in AUGMENT:
            raise TrustMAEError(f"unknown augment setting {self.augment!r}; choose one of {', '.join(AUGMENT)}")
        if self.channels_last and self.method in REFERENCE_METHODS:
            raise TrustMAEError(f"channels_last is a training layout; {self.method} trains nothing -- drop it")
        if self.fast and self.method in REFERENCE_METHODS:
            raise TrustMAEError(f"fast is a training speed path; {self.method} trains nothing -- drop it")

    @property
    def is_trustmae(self) -> bool:
        return is_trustmae(self.method)

    def reading_overrides(self, part: str) -> dict:
        """The constructor (``part="model"``), Eq. 9 weight (``part="loss"``), slot initialisation (``part="init"``)
        or optimiser (``part="train"``: a baseline's ``lr``) overrides of the reading."""
        return dict(READINGS[self.reading].get(part, {})) if self.reading else {}

    def load_profile(self) -> Profile:
        overrides = {}
        if self.backbone:
            overrides["backbone"] = self.backbone
        if self.steps:
            overrides["steps"] = self.steps
        return load_profile(self.profile, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def config_hash(self) -> str:
        """Hash of the spec, the resolved profile, the results version (:data:`RESULTS_VERSION`), the loss weights and
        the version of an embedded category's images (12 hex digits)."""
        # The results version and the Eq. 9 weights are part of the key: a change of the numbers invalidates old runs.
        # The reading, layout, speed path, thread count and augmentation are left out of the spec when they have
        # their values of 0.1.0 (before they existed, or before 0.2.0 changed the defaults), so those cells keep
        # their hash; any other value is keyed.
        defaults = {"reading": "", "channels_last": False, "fast": False, "threads": 1, "augment": "auto"}
        spec = {k: v for k, v in self.to_dict().items() if k not in defaults or v != defaults[k]}
        if self.reading:
            spec["reading_overrides"] = READINGS[self.reading]
        key = {"spec": spec, "profile": self.load_profile().to_dict(), "version": RESULTS_VERSION,
               "loss_weights": dataclasses.asdict(LossWeights())}  # fmt: skip
        if category_version(self.dataset, self.category) != 1:  # the images changed: earlier results are stale
            key["data_version"] = category_version(self.dataset, self.category)
        blob = json.dumps(key, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def file_stem(self) -> str:
        """``<run name>-<config hash>`` with dataset and profile paths shortened to their names: the name of the
        run folder and of the cell's result file."""
        short = dataclasses.replace(self, dataset=Path(self.dataset).name or "data", profile=Path(self.profile).stem)
        return f"{short.run_name()}-{self.config_hash()}"

    def run_name(self) -> str:
        noise = f"n{round(self.noise_ratio * 100):02d}"
        name = f"{self.dataset}-{self.category}-{noise}-{self.protocol}-{self.method}-{self.profile}-s{self.seed}"
        name = f"{name}-{self.reading}" if self.reading else name
        name = f"{name}-cl" if self.channels_last else name
        name = f"{name}-fast" if self.fast else name
        name = f"{name}-aug{self.augment}" if self.augment != "auto" else name
        return f"{name}-t{self.threads}" if self.threads != 1 else name


@dataclass(frozen=True)
class LossWeights:
    """Eq. 9 weights. ``rec, sm, vgg, gan, feat`` are the supplement's; ``margin`` and ``trust`` are ours."""

    rec: float = 10.0
    sm: float = 10.0
    vgg: float = 10.0
    gan: float = 1.0
    feat: float = 10.0
    # reading: not given in the supplement. Measured at the cpu profile (quarter width, 128 px, 100 steps, brick):
    # the triplet margin on unit vectors pulls every feature onto its nearest slot, and the encoder's features
    # collapse (std across images 1.04 without it, 0.45 at weight 0.01, 0.02 at 0.1 and at 1). Off by default.
    margin: float = 0.0
    trust: float = 1.0  # reading: not given in the supplement

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
