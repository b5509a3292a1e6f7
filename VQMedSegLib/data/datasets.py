"""Finding the cases of a data set on disk, whatever its published layout.

:func:`discover_cases` looks at a path and recognises one of these layouts:

``chaos``
    The CHAOS challenge layout: ``CT/<n>/DICOM_anon/*.dcm`` with ``CT/<n>/Ground/*.png``
    (liver masks), and ``MR/<n>/T2SPIR/DICOM_anon`` with ``MR/<n>/T2SPIR/Ground``
    (liver 1, right kidney 2, left kidney 3, spleen 4). The path may be the data-set
    root, ``Train_Sets``, ``CT``/``MR``, or one case folder. T1-DUAL series are skipped.
``pairs``
    A folder of ``image_N.<ext>`` files with optional ``label_N.<ext>`` partners; the
    modality comes from a ``dataset.json`` beside them when present.
``imagesTr``
    Medical Segmentation Decathlon / nnU-Net: ``imagesTr/`` (+ ``labelsTr/``,
    ``imagesTs/``) holding ``name.nii.gz`` or ``name_0000.nii.gz`` images and
    ``name.nii.gz`` labels; the modality comes from ``dataset.json`` when present.
``acdc-h5``
    A folder of ACDC HDF5 volumes (``patientNNN_frameNN.h5``, datasets ``image`` and
    ``label``; cine MR, no voxel spacing in the files).
``dicom``
    A folder holding DICOM series (one case per series).
``single``
    One image file, optionally with a label file.

:func:`load_case` reads one :class:`CaseRef` into ``(image, label)`` volumes on the same grid.

CHAOS ground-truth alignment (verified on CHAOS CT case 1 with intensity statistics):
PNG number ``n`` (``liver_GT_000.png`` = 0, natural sort) is the slice of the DICOM
file with the ``n``-th smallest InstanceNumber (``i0000,0000b.dcm`` = InstanceNumber 1),
with no in-plane flip or transposition: PNG row/column = DICOM row/column. SimpleITK/GDCM
orders the series by position along the slice normal, which for CHAOS CT is the reverse
of the InstanceNumber order, so the masks are placed slice by slice through the
InstanceNumber of each slice rather than by list position. With this mapping the mean
inside the liver mask of case 1 is 141 HU (SD 34); reversing the PNG order gives 36 HU.
The MR mapping uses the same rule but has not been verified on real MR DICOM data.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..files import safe_id, sanitize_id
from .io import list_dicom_series, normalize_modality, read_label, read_volume
from .volume import Volume

log = logging.getLogger(__name__)

__all__ = ["CaseRef", "LAYOUTS", "dataset_json_labels", "discover_cases", "load_case", "read_chaos_ground"]

LAYOUTS = {
    "chaos": "CHAOS challenge folders (CT/<n>/DICOM_anon + Ground, MR/<n>/T2SPIR/DICOM_anon + Ground)",
    "pairs": "a folder of image_N.nii.gz with label_N.nii.gz",
    "imagesTr": "imagesTr/ + labelsTr/ (Medical Segmentation Decathlon or nnU-Net, name[_0000].nii.gz)",
    "acdc-h5": "a folder of ACDC HDF5 volumes patientNNN_frameNN.h5 (datasets 'image', 'label')",
    "dicom": "a folder of DICOM files (one case per series)",
    "single": "one image file (NRRD, NIfTI, MHA, .seg.nrrd, .h5), optionally with a label file",
}

_IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr")
_CHAOS_MR_VALUES = ((55, 70, 1), (110, 135, 2), (175, 200, 3), (240, 255, 4))


@dataclass
class CaseRef:
    """Where one case lives and how to load it.

    Attributes:
        case_id: safe identifier, unique within one discovery (letters, digits, ``._-``).
        modality: ``'CT'`` or ``'MR'``.
        image: image file or DICOM folder.
        label: label file, PNG mask folder (CHAOS) or ``None`` for an unlabelled case.
        layout: one of :data:`LAYOUTS` (chooses the loader).
        options: loader details: ``series_uid`` (DICOM), ``image_dataset`` /
            ``label_dataset`` (HDF5), ``modality_source`` (``given``, ``dicom``,
            ``layout``, ``dataset.json`` or ``guessed``).
    """

    case_id: str
    modality: str
    image: Path
    label: Path | None = None
    layout: str = "single"
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.case_id = safe_id(self.case_id)
        self.modality = normalize_modality(self.modality, "CaseRef modality") or ""
        if not self.modality:
            raise InputError("CaseRef modality None: expected 'CT' or 'MR'")
        self.image = Path(self.image)
        self.label = Path(self.label) if self.label is not None else None
        if self.layout not in LAYOUTS:
            raise InputError(f"CaseRef layout {self.layout!r}: expected one of {sorted(LAYOUTS)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (paths as strings)."""
        return {
            "case_id": self.case_id,
            "modality": self.modality,
            "image": str(self.image),
            "label": None if self.label is None else str(self.label),
            "layout": self.layout,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CaseRef":
        """Inverse of :meth:`to_dict`."""
        try:
            return cls(
                case_id=data["case_id"],
                modality=data["modality"],
                image=Path(data["image"]),
                label=None if data.get("label") is None else Path(data["label"]),
                layout=data.get("layout", "single"),
                options=dict(data.get("options") or {}),
            )
        except KeyError as exc:
            raise InputError(f"case entry: missing key {exc.args[0]!r}; expected case_id, modality, image") from exc


# --------------------------------------------------------------------------- utilities
def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def _strip_image_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in _IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _visible_files(folder: Path) -> list[Path]:
    """Files of ``folder`` without hidden ones (``._name`` macOS forks in MSD archives)."""
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=lambda p: _natural_key(p.name),
    )


def _unique_ids(refs: list[CaseRef]) -> list[CaseRef]:
    seen: dict[str, int] = {}
    for ref in refs:
        base = ref.case_id
        if base in seen:
            seen[base] += 1
            ref.case_id = safe_id(f"{base[:120]}_{seen[base]}")
        else:
            seen[base] = 1
    return refs


def _guess_modality(image: Path, loader: Callable[[Path], Volume]) -> str:
    """CT when the first image has air-like values (below -500, Hounsfield units), else MR."""
    volume = loader(image)
    guess = "CT" if float(np.min(volume.array)) < -500 else "MR"
    log.warning(
        "%s: modality not given; guessed %s from the intensities (CT images hold values below -500 HU). "
        'To be sure, put a dataset.json beside the images ({"modality": {"0": "CT"}}), or pass modality=',
        image, guess,
    )
    return guess


# --------------------------------------------------------------------------- layouts
def _find_dicom_anon(root: Path, max_depth: int = 5) -> list[Path]:
    found: list[Path] = []

    def walk(folder: Path, depth: int) -> None:
        if depth > max_depth:
            return
        try:
            children = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name))
        except OSError:
            return
        for child in children:
            if child.name == "DICOM_anon":
                found.append(child)
            elif not child.name.startswith("."):
                walk(child, depth + 1)

    if root.name == "DICOM_anon":
        return [root]
    walk(root, 0)
    return found


def _chaos_cases(root: Path, modality: str | None) -> list[CaseRef]:
    refs: list[CaseRef] = []
    for dicom_dir in _find_dicom_anon(root):
        parent = dicom_dir.parent
        if parent.name == "T2SPIR":
            case_dir, kind = parent.parent, "MR"
        elif parent.name == "T1DUAL" or "T1DUAL" in dicom_dir.parts:
            log.info("%s: CHAOS T1-DUAL series are not supported; skipped", dicom_dir)
            continue
        else:
            case_dir, kind = parent, "CT"
        if modality is not None and modality != kind:
            continue
        ground = parent / "Ground"
        label = ground if ground.is_dir() and any(ground.glob("*.png")) else None
        number = case_dir.name
        case_id = sanitize_id(f"CT_{number}" if kind == "CT" else f"MR_{number}_T2SPIR")
        refs.append(CaseRef(case_id, kind, dicom_dir, label, "chaos", {"modality_source": "layout"}))
    return refs


def _pairs_cases(root: Path, modality: str | None) -> list[CaseRef]:
    images: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for path in _visible_files(root):
        stem = _strip_image_suffix(path.name)
        if stem is None:
            continue
        m = re.fullmatch(r"(image|label)_(.+)", stem)
        if m:
            (images if m.group(1) == "image" else labels)[m.group(2)] = path
    if not images:
        return []
    orphans = sorted(set(labels) - set(images), key=_natural_key)
    if orphans:
        log.warning("%s: label files without an image ignored: %s", root, ", ".join(f"label_{o}" for o in orphans))
    keys = sorted(images, key=_natural_key)
    source = "given"
    if modality is None:
        modality, source = _dataset_json_modality(root), "dataset.json"
    if modality is None:
        modality = _guess_modality(images[keys[0]], lambda p: read_volume(p))
        source = "guessed"
    return [
        CaseRef(sanitize_id(key), modality, images[key], labels.get(key), "pairs", {"modality_source": source})
        for key in keys
    ]


def _dataset_json(root: Path, unreadable: str = "") -> dict | None:
    """The object in ``root/dataset.json``, or None (no file, or not a JSON object); an
    unreadable file is logged with ``unreadable`` (what is not taken from it) when given."""
    path = root / "dataset.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if unreadable:
            log.warning("%s: unreadable (%s); %s", path, exc, unreadable)
        return None
    return info if isinstance(info, dict) else None


def _dataset_json_modality(root: Path) -> str | None:
    info = _dataset_json(root, unreadable="modality not taken from it") or {}
    channels = info.get("modality") or info.get("channel_names") or {}
    if isinstance(channels, dict) and channels:
        first = str(channels.get("0", next(iter(channels.values())))).upper()
        if first.startswith("CT"):
            return "CT"
        if first.startswith("MR") or first in {"T1", "T2", "FLAIR", "T1W", "T2W", "ADC", "DWI", "T1GD", "T2-SPIR"}:
            return "MR"
    return None


def dataset_json_labels(root: str | os.PathLike) -> dict[int, str] | None:
    """The names a ``dataset.json`` in ``root`` gives its label values, background left
    out: nnU-Net's ``{"liver": 1}`` or the Decathlon's ``{"1": "liver"}``; None without
    one."""
    labels = (_dataset_json(Path(root)) or {}).get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        names = {int(v): str(k) for k, v in labels.items()}
    elif all(str(k).isdigit() for k in labels):
        names = {int(k): str(v) for k, v in labels.items()}
    else:
        return None
    return {v: name for v, name in sorted(names.items()) if v != 0}


def _images_tr_cases(root: Path, modality: str | None) -> list[CaseRef]:
    if root.name in ("imagesTr", "imagesTs", "labelsTr"):
        root = root.parent
    source = "given"
    if modality is None:
        modality = _dataset_json_modality(root)
        source = "dataset.json" if modality else "guessed"
    labels_dir = root / "labelsTr"
    label_files: dict[str, Path] = {}
    if labels_dir.is_dir():
        for path in _visible_files(labels_dir):
            stem = _strip_image_suffix(path.name)
            if stem is not None:
                label_files[stem] = path
    found: list[tuple[str, Path, Path | None, str]] = []
    for sub in ("imagesTr", "imagesTs"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for path in _visible_files(folder):
            stem = _strip_image_suffix(path.name)
            if stem is None:
                continue
            m = re.fullmatch(r"(.+)_(\d{4})", stem)
            if m and m.group(1) not in label_files and stem in label_files:
                m = None  # MSD name that merely ends in four digits
            if m:
                if m.group(2) != "0000":
                    log.info("%s: extra channel ignored (only single-channel images are supported)", path)
                    continue
                name = m.group(1)
            else:
                name = stem
            label = label_files.get(name) if sub == "imagesTr" else None
            found.append((name, path, label, sub))
    if not found:
        return []
    if modality is None:
        modality = _guess_modality(found[0][1], lambda p: read_volume(p))
    return [
        CaseRef(sanitize_id(name), modality, image, label, "imagesTr", {"modality_source": source, "split": sub})
        for name, image, label, sub in found
    ]


def _acdc_cases(root: Path, modality: str | None) -> list[CaseRef]:
    import h5py

    refs: list[CaseRef] = []
    for path in _visible_files(root):
        if not path.name.lower().endswith((".h5", ".hdf5")):
            continue
        try:
            with h5py.File(path, "r") as handle:
                keys = set(handle.keys())
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5 file ({exc}); expected an ACDC volume") from exc
        if "image" not in keys:
            log.info("%s: no 'image' dataset; skipped", path)
            continue
        has_label = "label" in keys
        refs.append(CaseRef(
            sanitize_id(path.name.split(".")[0]),
            modality or "MR",
            path,
            path if has_label else None,
            "acdc-h5",
            {"image_dataset": "image", "label_dataset": "label" if has_label else None,
             "modality_source": "given" if modality else "layout", "spacing_known": False},
        ))
    return refs


def _dicom_cases(root: Path, modality: str | None) -> list[CaseRef]:
    series = list_dicom_series(root)
    refs: list[CaseRef] = []
    for n, (uid, files) in enumerate(series.items()):
        kind, source = modality, "given"
        if kind is None:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(files[0])
            reader.ReadImageInformation()
            tag = reader.GetMetaData("0008|0060").strip().upper() if reader.HasMetaDataKey("0008|0060") else ""
            kind = {"CT": "CT", "MR": "MR"}.get(tag)
            source = "dicom"
            if kind is None:
                raise InputError(
                    f"{root}: DICOM series {uid} has modality {tag or 'missing'!r}; expected CT or MR "
                    "(pass modality= to override)"
                )
        case_id = sanitize_id(root.name if len(series) == 1 else f"{root.name}_{n + 1}")
        refs.append(CaseRef(case_id, kind, root, None, "dicom", {"series_uid": uid, "modality_source": source}))
    return refs


def _single_case(path: Path, modality: str | None, label: Path | None) -> list[CaseRef]:
    name = path.name
    stem = _strip_image_suffix(name) or name.split(".")[0]
    if name.lower().endswith(".seg.nrrd"):
        stem = name[: -len(".seg.nrrd")]
    options: dict[str, Any] = {}
    if name.lower().endswith((".h5", ".hdf5")):
        import h5py

        try:
            with h5py.File(path, "r") as handle:
                keys = set(handle.keys())
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5 file ({exc})") from exc
        options.update(image_dataset="image", spacing_known=False)
        if label is None and "label" in keys:
            label = path
        options["label_dataset"] = "label" if label == path else None
        if modality is None:
            modality, options["modality_source"] = "MR", "layout"
    if modality is None:
        loader = (lambda p: read_volume(p, dataset="image"))
        modality = _guess_modality(path, loader)
        options["modality_source"] = "guessed"
    options.setdefault("modality_source", "given")
    if label is not None and not Path(label).exists():
        raise InputError(f"label {label}: not found; expected a label file for {path}")
    return [CaseRef(sanitize_id(stem), modality, path, label, "single", options)]


# --------------------------------------------------------------------------- public API
def discover_cases(
    path: str | os.PathLike,
    modality: str | None = None,
    *,
    label: str | os.PathLike | None = None,
) -> list[CaseRef]:
    """List the cases under ``path``, recognising the layout automatically.

    Args:
        path: a data-set folder, a case folder, or a single image file.
        modality: ``'CT'`` or ``'MR'``; when omitted it comes from the layout, DICOM tags
            or ``dataset.json``, else it is guessed from the intensities of the first image
            (logged as a warning, recorded as ``options["modality_source"] = "guessed"``).
            For CHAOS folders it selects the CT or MR cases.
        label: with a single image file, its label file.

    Returns:
        The cases in natural order, with unique safe ``case_id`` values.

    Raises:
        InputError: missing path, or a folder in none of the supported layouts.
    """
    root = Path(path)
    modality = normalize_modality(modality)
    if not root.exists():
        raise InputError(f"{root}: not found; expected a data-set folder or an image file")
    if root.is_file():
        if root.suffix.lower() in (".dcm", ".ima"):
            return _dicom_cases(root.parent, modality)
        return _single_case(root, modality, Path(label) if label is not None else None)
    if label is not None:
        raise InputError(f"label {label}: only valid with a single image file; {root} is a folder")

    detectors: list[tuple[str, Callable[[Path, str | None], list[CaseRef]]]] = []
    if root.name in ("imagesTr", "imagesTs", "labelsTr") or (root / "imagesTr").is_dir() or (root / "imagesTs").is_dir():
        detectors.append(("imagesTr", _images_tr_cases))
    detectors += [("pairs", _pairs_cases), ("acdc-h5", _acdc_cases), ("chaos", _chaos_cases)]
    for name, detect in detectors:
        refs = detect(root, modality)
        if refs:
            log.info("%s: %d case(s) in the %s layout", root, len(refs), name)
            return _unique_ids(refs)
    if list_dicom_series(root):
        return _unique_ids(_dicom_cases(root, modality))
    supported = "; ".join(f"{k}: {v}" for k, v in LAYOUTS.items())
    inner = sorted(p for p in root.iterdir() if p.is_dir() and (p / "dataset.json").is_file())
    hint = (f"; its folder{'s' if len(inner) > 1 else ''} {', '.join(p.name for p in inner)} "
            f"hold{'' if len(inner) > 1 else 's'} a dataset: give {' or '.join(str(p) for p in inner)}" if inner else "")
    raise InputError(f"{root}: no cases found in a supported layout{hint}. Supported layouts: {supported}")


def load_case(ref: CaseRef, *, check_geometry: bool = True) -> tuple[Volume, Volume | None]:
    """Read a case's image and label (``None`` when unlabelled).

    Args:
        ref: a case from :func:`discover_cases`.
        check_geometry: raise :class:`InputError` when the label grid differs from the
            image grid (switch off only to report the mismatch, as ``check_dataset`` does).

    Returns:
        ``(image, label)``; ``image.metadata`` carries ``case_id``, ``modality`` and
        ``source``.
    """
    opts = ref.options
    if ref.layout == "acdc-h5" or (ref.layout == "single" and opts.get("image_dataset")):
        image = read_volume(ref.image, modality=ref.modality, dataset=opts.get("image_dataset") or "image")
    elif ref.layout == "dicom":
        image = read_volume(ref.image, modality=ref.modality, series_uid=opts.get("series_uid"))
    else:
        image = read_volume(ref.image, modality=ref.modality)
    image.metadata["case_id"] = ref.case_id
    image.metadata["modality"] = ref.modality

    reference = image if check_geometry else None
    label: Volume | None = None
    if ref.label is not None:
        if ref.layout == "chaos":
            label = read_chaos_ground(ref.label, image)
        elif opts.get("label_dataset"):
            label = read_label(ref.label, reference, dataset=opts["label_dataset"])
        else:
            label = read_label(ref.label, reference)
        label.metadata["case_id"] = ref.case_id
    return image, label


def read_reference_label(path: str | os.PathLike) -> Volume:
    """A reference label for scoring: a label file, or a CHAOS case's PNG masks.

    PNG masks carry no geometry and no slice order of their own, so a CHAOS ``Ground``
    folder (or the case folder holding it) is read with the DICOM series beside it, as
    :func:`load_case` does. Anything else goes to :func:`~VQMedSegLib.data.io.read_label`.
    """
    path = Path(path)
    folder = path.parent if path.is_dir() and path.name == "Ground" else path
    if folder.is_dir() and _find_dicom_anon(folder):
        refs = [r for r in _chaos_cases(folder, None) if r.label is not None]
        if len(refs) == 1:
            return load_case(refs[0])[1]
        if len(refs) > 1:
            raise InputError(f"{path}: found {len(refs)} CHAOS cases with masks; expected one case's folder or its Ground folder")
    return read_label(path)


# --------------------------------------------------------------------------- CHAOS masks
def _chaos_mr_map(values: np.ndarray) -> np.ndarray:
    out = np.zeros(values.shape, dtype=np.uint8)
    for lo, hi, label in _CHAOS_MR_VALUES:
        out[(values >= lo) & (values <= hi)] = label
    return out


def read_chaos_ground(ground_dir: str | os.PathLike, image: Volume) -> Volume:
    """Build the label volume of a CHAOS case from its ``Ground/*.png`` masks.

    ``image`` must be the case's DICOM series as read by :func:`read_volume` (it carries
    ``metadata["dicom_slices"]`` with each slice's InstanceNumber). PNG ``n`` in natural
    order belongs to the slice with the ``n``-th smallest InstanceNumber; see the module
    docstring for how this was verified. CT: liver where the PNG is > 0 -> 1.
    MR: grey values 63/126/189/252 -> 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
    """
    from PIL import Image

    ground = Path(ground_dir)
    pngs = sorted(ground.glob("*.png"), key=lambda p: _natural_key(p.name))
    slices = image.metadata.get("dicom_slices") or []
    n_slices = image.shape[0]
    if len(pngs) != n_slices:
        raise InputError(
            f"{ground}: found {len(pngs)} PNG masks; expected one per slice of the DICOM series "
            f"({n_slices} slices in {image.metadata.get('source')})"
        )
    if len(slices) != n_slices:
        raise InputError(
            f"{image.metadata.get('source')}: per-slice DICOM information is missing; expected the image "
            "read from a DICOM series folder with read_volume"
        )
    numbers = [s.get("instance_number") for s in slices]
    if any(n is None for n in numbers) or len(set(numbers)) != len(numbers):
        log.warning("%s: InstanceNumbers missing or repeated; matching PNGs to DICOM files by file name", ground)
        ranks_source: list[Any] = [_natural_key(s["file"]) for s in slices]
    else:
        ranks_source = numbers
    order = sorted(range(n_slices), key=lambda k: ranks_source[k])  # order[n] = slice k of PNG n
    is_mr = image.metadata.get("modality") == "MR"
    rows, cols = image.shape[1], image.shape[2]
    labels = np.zeros(image.shape, dtype=np.uint8)
    for n, png in enumerate(pngs):
        try:
            with Image.open(png) as handle:
                mask = np.asarray(handle.convert("L") if handle.mode not in ("1", "L", "I", "I;16") else handle)
        except OSError as exc:
            raise InputError(f"{png}: could not read the PNG mask ({exc})") from exc
        if mask.ndim != 2 or mask.shape != (rows, cols):
            raise InputError(
                f"{png}: mask of shape {mask.shape}; expected {rows}x{cols} like the DICOM slices"
            )
        labels[order[n]] = _chaos_mr_map(mask) if is_mr else (mask > 0).astype(np.uint8)
    metadata = {
        "source": str(ground),
        "format": "chaos-png",
        "spacing_known": image.metadata.get("spacing_known", True),
    }
    return Volume(labels, image.spacing, image.origin, image.direction.copy(), metadata)


def iter_loaded(refs: Iterable[CaseRef]) -> Iterable[tuple[CaseRef, Volume, Volume | None]]:
    """Load cases one at a time (keeps memory at one case)."""
    for ref in refs:
        image, label = load_case(ref)
        yield ref, image, label
