"""Configuration dataclasses that round-trip to JSON.

The same objects drive the command line, the Slicer module and the benchmarks. Loading
is strict: an unknown key or a value of the wrong type is an error that names the key,
what was found and what was expected, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError
from .files import read_json

T = TypeVar("T")
MAX_SEED = 2**32 - 1  # NumPy's legacy seeding, which MONAI's set_determinism uses, takes no larger one
_UNIONS = (typing.Union, getattr(types, "UnionType", typing.Union))  # `X | Y` has its own type from Python 3.10


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Validate (and lightly coerce: int -> float, list -> tuple) one value."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in _UNIONS:
        errors = []
        for option in args:
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(name, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"config key {name!r}: found {value!r}, expected {annotation}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__} {value!r}, expected a list")
        item_type = args[0] if args else Any
        items = [_check_type(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__}, expected an object")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__} {value!r}, expected a number")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__} {value!r}, expected an integer")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__} {value!r}, expected true or false")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {name!r}: found {type(value).__name__} {value!r}, expected a string")
        return value
    return value


class JsonConfig:
    """Mixin: strict ``from_json`` / ``to_json`` for dataclasses."""

    def to_json(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def checked(cls, data: Any, *, source: str | None = None) -> dict[str, Any]:
        """``data``'s settings, each of its field's type; an error names ``source``."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source or 'config'}: found {type(data).__name__}, expected a JSON object")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{source or 'config'}: unknown key(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(sorted(names))}")
        try:
            return {k: _check_type(k, v, hints[k]) for k, v in data.items()}
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None

    @classmethod
    def from_json(cls: type[T], data: dict, *, source: str | None = None) -> T:
        obj = cls(**cls.checked(data, source=source))  # type: ignore[attr-defined, call-arg]
        try:
            obj.check_common()  # type: ignore[attr-defined]
            validate = getattr(obj, "validate", None)
            if validate:
                validate()
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None
        return obj

    @classmethod
    def as_read_today(cls, recorded: dict) -> dict:
        """A configuration a run recorded, as today's code reads it: a key the run predates
        takes its default, which is what the code of that run did. A record today's code
        refuses (a key it no longer knows) comes back as it was, so it compares unequal."""
        try:
            return cls.from_json(recorded, source="run.json").to_json()  # type: ignore[attr-defined]
        except ConfigError:
            return recorded

    def check_common(self) -> None:
        """The checks every configuration shares: a seed from 0 to :data:`MAX_SEED` (NumPy
        refuses a negative one, and torch and MONAI a larger one, with a traceback half
        way into a job)."""
        seed = getattr(self, "seed", None)
        if seed is not None:
            check_values([(0 <= seed <= MAX_SEED, "seed", seed, f"a whole number from 0 to {MAX_SEED}")])

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass
class TrainConfig(JsonConfig):
    """Training of a 2-D segmentation network on labelled axial slices.

    Defaults are the ``quick`` CPU preset; :data:`PRESETS` holds the others.
    """

    method: str = "supervised"
    iterations: int = 600
    batch_size: int = 8
    slice_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    features: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    dropout: float = 0.0
    augment: bool = True
    foreground_fraction: float = 0.5
    val_interval: int = 100
    checkpoint_interval: int = 50
    seed: int = 0
    validation_cases: list[str] = field(default_factory=list)

    def validate(self) -> None:
        checks = [
            # recorded with every supervised model; the method itself is train --method's choice
            (self.method == "supervised", "method", self.method, "'supervised' (choose the method with train --method)"),
            (self.iterations >= 1, "iterations", self.iterations, "at least 1"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.slice_size >= 16 and self.slice_size % 16 == 0, "slice_size", self.slice_size, "a multiple of 16"),
            (self.learning_rate > 0, "learning_rate", self.learning_rate, "a positive number"),
            (len(self.features) == 6, "features", self.features, "six channel counts (BasicUNet)"),
            (0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)"),
            (0.0 <= self.foreground_fraction <= 1.0, "foreground_fraction", self.foreground_fraction, "in [0, 1]"),
            (self.checkpoint_interval >= 1, "checkpoint_interval", self.checkpoint_interval, "at least 1"),
            (self.val_interval >= 1, "val_interval", self.val_interval, "at least 1"),
        ]
        check_values(checks)


PRESETS: dict[str, dict[str, Any]] = {
    # CI and unit tests: seconds
    "tiny": {"iterations": 30, "batch_size": 4, "slice_size": 64, "val_interval": 10, "checkpoint_interval": 10},
    # the built-in example on 2 CPU cores: about two minutes of training
    "quick": {},
    # CPU, real scans: a larger network, about nine times the training of `quick`
    "cpu": {"iterations": 2000, "slice_size": 160, "features": (16, 32, 64, 128, 256, 16), "val_interval": 200},
    # for a GPU: the U-Net baseline has no paper of its own, so it takes VQ-Seg's schedule
    # (224 x 224, 8 labelled slices a batch, 100,000 iterations, poly 0.9) and the widths of
    # VQSEG_PRESETS["paper"]; the learning rate stays ours, for a U-Net trained from scratch
    "paper": {"iterations": 100_000, "batch_size": 8, "slice_size": 224, "features": (32, 64, 128, 256, 512, 32),
              "val_interval": 1000, "checkpoint_interval": 500},
}


def as_option(key: str, value: Any) -> str:
    """A configuration key's value as the command-line option that gives it:
    ``--dropout-rate 0.3``, or ``--strong-augment`` for a switch that is on."""
    flag = f"--{key.replace('_', '-')}"
    return flag if value is True else f"{flag} {value}"


def config_from_preset(cls: type[T], presets: dict[str, dict[str, Any]], preset: str, overrides: dict[str, Any],
                       config_file: str | Path | None = None) -> T:
    """``cls`` in three layers: the named preset, then the keys of the JSON file
    ``config_file`` (when given), then the ``overrides`` that are not ``None``, the
    command line's options (a refusal names them as ``--key-name value``)."""
    if preset not in presets:
        raise ConfigError(f"preset {preset!r}: expected one of {', '.join(presets)}")
    data = dict(presets[preset])
    source = f"preset {preset!r}"
    if config_file is not None:
        path = Path(config_file)
        data.update(cls.checked(read_json(path, ConfigError, expected=f"a JSON object of {cls.__name__} settings"),  # type: ignore[attr-defined]
                                source=f"config file {path}"))
        source = f"preset {preset!r} with config file {path}"
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:  # named as the command line's options that give them, which a refusal may be about
        options = ", ".join(as_option(k, v) for k, v in given.items())
        source += f" and {options}" if config_file is not None else f" with {options}"
    data.update(given)
    return cls.from_json({k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}, source=source)  # type: ignore[attr-defined]


def check_values(checks: list[tuple[bool, str, Any, str]]) -> None:
    """Raise for the first ``(ok, key, value, expected)`` that is not ok."""
    for ok, key, value, expected in checks:
        if not ok:
            raise ConfigError(f"config key {key!r}: found {value!r}, expected {expected}")


def train_config_from_preset(preset: str, config_file: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """The preset, the JSON file ``config_file`` laid over it, and ``overrides`` (not ``None``) over both."""
    return config_from_preset(TrainConfig, PRESETS, preset, overrides, config_file)


@dataclass
class BEGALConfig(JsonConfig):
    """VQ-BEGAL model, loss weights and round schedule.

    Loss weights are the paper's (seg 5, VQ 0.5, discriminator 0.25, commitment 0.2).
    Each round after the first trains in phases: ``encoder_iterations`` on the
    low-uncertainty slices with the decoder frozen, then ``decoder_iterations`` on the
    high-uncertainty slices with the encoders, codebook and D frozen, then an optional
    ``joint_iterations`` on everything. Round 0 (the initial random set) and the
    baseline strategies train end to end for the same total number of iterations.
    """

    slice_size: int = 128
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    code_dim: int = 64
    num_codes: int = 1024
    decoder_dropout: float = 0.1
    mr_dropout: float = 0.3
    adversarial_scale: float = 1.0
    seg_weight: float = 5.0
    vq_weight: float = 0.5
    disc_weight: float = 0.25
    commit_weight: float = 0.2
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    unlabelled_batch: int = 4
    initial_iterations: int = 300
    encoder_iterations: int = 100
    decoder_iterations: int = 100
    joint_iterations: int = 0
    augment: bool = True
    mc_samples: int = 10
    patience: int = 0
    min_delta: float = 0.005
    checkpoint_interval: int = 50
    seed: int = 0
    validation_cases: list[str] = field(default_factory=list)

    @property
    def round_iterations(self) -> int:
        return self.encoder_iterations + self.decoder_iterations + self.joint_iterations

    def validate(self) -> None:
        checks = [
            (self.slice_size >= 16 and self.slice_size % 16 == 0, "slice_size", self.slice_size, "a multiple of 16"),
            (len(self.features) == 5, "features", self.features, "five channel counts"),
            (self.num_codes >= 2, "num_codes", self.num_codes, "at least 2"),
            (self.code_dim >= 1, "code_dim", self.code_dim, "at least 1"),
            (0 <= self.decoder_dropout < 1, "decoder_dropout", self.decoder_dropout, "in [0, 1)"),
            (0 <= self.mr_dropout <= 1, "mr_dropout", self.mr_dropout, "in [0, 1]"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "at least 1"),
            (self.initial_iterations >= 1, "initial_iterations", self.initial_iterations, "at least 1"),
            (self.round_iterations >= 1, "encoder/decoder/joint_iterations", self.round_iterations, "a positive sum"),
            (self.mc_samples >= 2, "mc_samples", self.mc_samples, "at least 2"),
            (self.patience >= 0, "patience", self.patience, "0 (off) or more rounds"),
            (self.checkpoint_interval >= 1, "checkpoint_interval", self.checkpoint_interval, "at least 1"),
        ]
        check_values(checks)


BEGAL_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: a few seconds per round
    "tiny": {"slice_size": 32, "features": (4, 8, 8, 16, 16), "code_dim": 8, "num_codes": 64, "batch_size": 4,
             "unlabelled_batch": 2, "initial_iterations": 12, "encoder_iterations": 6, "decoder_iterations": 6,
             "checkpoint_interval": 5, "mc_samples": 3},
    # CPU: the six-strategy comparison on phantoms in minutes
    "quick": {"slice_size": 64, "features": (8, 16, 32, 64, 64), "code_dim": 32, "num_codes": 256,
              "initial_iterations": 100, "encoder_iterations": 40, "decoder_iterations": 40, "joint_iterations": 0},
    # CPU, real scans (CHAOS): larger slices, longer rounds
    "cpu": {"slice_size": 128, "features": (8, 16, 32, 64, 128), "code_dim": 32, "num_codes": 512,
            "initial_iterations": 300, "encoder_iterations": 100, "decoder_iterations": 100},
    # the paper's setting, for a GPU: K = 1024, 256x256 slices, long rounds
    "paper": {"slice_size": 256, "features": (32, 64, 128, 256, 512), "code_dim": 256, "num_codes": 1024,
              "batch_size": 16, "unlabelled_batch": 8, "initial_iterations": 3000, "encoder_iterations": 1500,
              "decoder_iterations": 1500, "patience": 3},
}


def begal_config_from_preset(preset: str, config_file: str | Path | None = None, **overrides: Any) -> BEGALConfig:
    """The preset, the JSON file ``config_file`` laid over it, and ``overrides`` (not ``None``) over both."""
    return config_from_preset(BEGALConfig, BEGAL_PRESETS, preset, overrides, config_file)


@dataclass
class VQSegConfig(JsonConfig):
    """VQ-Seg model, losses, schedule and batch composition (see :mod:`.training.vqseg`).

    Paper defaults: K = 16,384, epsilon = 0.7, lambda_u = 1, lambda_a = 5, EMA 0.996,
    8 labelled + 4 unlabelled slices per batch. ``rampup`` ramps lambda_u in after the
    ``warmup_supervised`` iterations (0: at once); ``confidence_threshold`` 0 keeps every
    pseudo-label (the paper), 0.95 is the released code's setting.
    """

    slice_size: int = 128
    features: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_classes: int = 2  # background + structures (ACDC: 4)
    code_dim: int = 64
    num_codes: int = 16384
    epsilon: float = 0.7
    perturbation: str = "qpm"  # qpm | dropout | none
    dropout_rate: float = 0.5
    use_qpm: bool = True
    use_reconstruction: bool = True
    use_pfa: bool = True
    foundation: str = "litemedsam"
    pfa_grid: int = 16
    pfa_slices: int = 0
    pfa_batch: int = 4
    temperature: float = 0.07
    # what eq. 11 aligns: the quantiser's straight-through output (its gradient trains the
    # encoder) or the chosen codewords themselves (its gradient trains the codebook mapping)
    pfa_source: str = "straight-through"
    lambda_u: float = 1.0
    rampup: int = 0
    lambda_a: float = 5.0
    # eq. 12's lambda_a from the end of the supervised warm-up on (the paper), or falling from
    # lambda_a there to 0 at the last iteration along a half cosine (on ACDC at 10%, level
    # with the constant over five seeds: acdc-10-val-pfadecay in benchmarks/README.md)
    lambda_a_schedule: str = "constant"  # constant | cosine
    commitment: float = 0.25
    entropy_weight: float = 0.05
    ema_decay: float = 0.996
    confidence_threshold: float = 0.0
    dice_weight: float = 1.0
    iterations: int = 1000
    labelled_batch: int = 8
    foreground_fraction: float = 0.5
    unlabelled_batch: int = 4
    augment: bool = True  # weak geometric and intensity augmentation of the labelled slices
    # the paper's augmentation of unlabelled data: random rotation (with scaling and
    # translation) before the teacher, colour jitter and blur on the student's CutMix view
    strong_augment: bool = False
    backbone_lr: float = 1e-3
    head_lr_factor: float = 2.0
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    warmup_supervised: int = 100
    seed: int = 0
    validation_cases: list[str] = field(default_factory=list)

    def validate(self) -> None:
        checks = [
            (self.slice_size >= 16 and self.slice_size % 16 == 0, "slice_size", self.slice_size, "a multiple of 16"),
            (len(self.features) == 5, "features", self.features, "five channel counts"),
            (self.num_classes >= 2, "num_classes", self.num_classes, "at least 2 (background and one structure)"),
            (self.num_codes >= 2, "num_codes", self.num_codes, "at least 2"),
            (self.code_dim >= 1, "code_dim", self.code_dim, "at least 1"),
            (0.0 <= self.epsilon <= 1.0, "epsilon", self.epsilon, "in [0, 1]"),
            (self.perturbation in ("qpm", "dropout", "none"), "perturbation", self.perturbation, "qpm, dropout or none"),
            (0.0 <= self.dropout_rate < 1.0, "dropout_rate", self.dropout_rate, "in [0, 1)"),
            (self.temperature > 0, "temperature", self.temperature, "a positive number"),
            (self.pfa_source in ("straight-through", "codewords"), "pfa_source", self.pfa_source,
             "straight-through or codewords"),
            (self.lambda_a_schedule in ("constant", "cosine"), "lambda_a_schedule", self.lambda_a_schedule,
             "constant or cosine"),
            (self.pfa_grid >= 1, "pfa_grid", self.pfa_grid, "at least 1"),
            (self.pfa_slices >= 0, "pfa_slices", self.pfa_slices, "0 (all) or more"),
            (self.pfa_batch >= 1, "pfa_batch", self.pfa_batch, "at least 1"),
            (0.0 <= self.ema_decay < 1.0, "ema_decay", self.ema_decay, "in [0, 1)"),
            (0.0 <= self.confidence_threshold < 1.0, "confidence_threshold", self.confidence_threshold, "in [0, 1)"),
            (self.iterations >= 1, "iterations", self.iterations, "at least 1"),
            (self.labelled_batch >= 1, "labelled_batch", self.labelled_batch, "at least 1"),
            (self.unlabelled_batch >= 1, "unlabelled_batch", self.unlabelled_batch, "at least 1"),
            (0.0 <= self.foreground_fraction <= 1.0, "foreground_fraction", self.foreground_fraction, "in [0, 1]"),
            (self.backbone_lr > 0, "backbone_lr", self.backbone_lr, "a positive number"),
            (self.head_lr_factor > 0, "head_lr_factor", self.head_lr_factor, "a positive number"),
            (self.warmup_supervised >= 0, "warmup_supervised", self.warmup_supervised, "0 or more"),
            (self.rampup >= 0, "rampup", self.rampup, "0 or more"),
            (min(self.lambda_u, self.lambda_a, self.dice_weight, self.entropy_weight, self.commitment) >= 0,
             "lambda_u/lambda_a/dice_weight/entropy_weight/commitment",
             (self.lambda_u, self.lambda_a, self.dice_weight, self.entropy_weight, self.commitment), "non-negative weights"),
        ]
        check_values(checks)


VQSEG_PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: seconds
    "tiny": {"slice_size": 32, "features": (4, 8, 8, 16, 16), "code_dim": 8, "num_codes": 64, "iterations": 20,
             "labelled_batch": 2, "unlabelled_batch": 2, "warmup_supervised": 5, "pfa_grid": 4, "pfa_slices": 6, "pfa_batch": 2},
    # CPU, phantoms: supervised vs VQ-Seg, 2 seeds, in minutes
    # Short CPU runs keep the released code's 0.95 pseudo-label confidence threshold and
    # ramp lambda_u in: with every argmax pseudo-label (the paper) and lambda_u = 1 at once,
    # the young teacher's misses on a small target fed back until the student predicted
    # background only (phantom-lung, 10% labels: Dice 0.0005 against 0.59 with both).
    "quick": {"slice_size": 128, "features": (8, 16, 32, 64, 128), "code_dim": 32, "num_codes": 1024, "iterations": 600,
              "warmup_supervised": 100, "rampup": 300, "confidence_threshold": 0.95, "pfa_grid": 12, "pfa_slices": 48, "pfa_batch": 2},
    # CPU, real scans (ACDC, CHAOS MR); PFA on 96 unlabelled slices: LiteMedSAM's features
    # take about 3 s a slice on one CPU thread, so all of a large workspace's would take an hour
    "cpu": {"slice_size": 128, "features": (16, 32, 64, 128, 256), "code_dim": 64, "num_codes": 4096, "iterations": 2000,
            "warmup_supervised": 200, "rampup": 800, "confidence_threshold": 0.95, "pfa_slices": 96},
    # the paper's setting for a GPU: 224 x 224, K = 16,384, 8 + 4 per batch
    "paper": {"slice_size": 224, "features": (32, 64, 128, 256, 512), "code_dim": 256, "num_codes": 16384,
              "iterations": 100000, "warmup_supervised": 1000, "backbone_lr": 1e-4, "head_lr_factor": 40.0,
              "strong_augment": True},
}


def vqseg_config_from_preset(preset: str, config_file: str | Path | None = None, **overrides: Any) -> VQSegConfig:
    """The preset, the JSON file ``config_file`` laid over it, and ``overrides`` (not ``None``) over both."""
    return config_from_preset(VQSegConfig, VQSEG_PRESETS, preset, overrides, config_file)
