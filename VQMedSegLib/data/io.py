"""Reading and writing volumes and label maps without losing their geometry.

Supported inputs (:func:`read_volume`, :func:`read_label`):

========================  =====================================================
NRRD                      ``.nrrd``, ``.nhdr``
NIfTI                     ``.nii``, ``.nii.gz`` (SimpleITK converts RAS <-> LPS)
MetaImage                 ``.mha``, ``.mhd``
DICOM series              a folder (one series, or pick one with ``series_uid=``),
                          or one ``.dcm`` file, which stands for its whole series
Slicer segmentation       ``.seg.nrrd`` (read as a label map; segment names,
                          colours and terminology kept in ``metadata["segments"]``)
HDF5 (ACDC)               ``.h5``/``.hdf5`` with 3-D datasets (``image``,
                          ``label``); these files carry no voxel spacing, so the
                          volume gets spacing ``(1, 1, 1)`` and
                          ``metadata["spacing_known"] = False``
========================  =====================================================

Outputs (:func:`write_volume`, :func:`write_segmentation`) are written atomically:
the file appears complete or not at all.

Every volume read here carries ``metadata["source"]`` (the path read) and
``metadata["spacing_known"]``; ``metadata["modality"]`` is set when given or when the
file says so (DICOM).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..files import atomic_path, storage_error
from .volume import Volume, label_values

log = logging.getLogger(__name__)

__all__ = [
    "READ_FORMATS",
    "WRITE_FORMATS",
    "normalize_modality",
    "list_dicom_series",
    "read_volume",
    "read_label",
    "read_geometry",
    "segment_mask",
    "write_volume",
    "write_segmentation",
]

READ_FORMATS = (
    ".nrrd, .nhdr, .nii, .nii.gz, .mha, .mhd, .seg.nrrd, .h5/.hdf5 (ACDC), "
    "a DICOM series folder or a .dcm file"
)
WRITE_FORMATS = (".nrrd", ".nii.gz", ".nii", ".mha")

_SITK_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
_H5_SUFFIXES = (".h5", ".hdf5")
_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}

# DICOM tags read from every slice of a series.
_TAG_MODALITY = "0008|0060"
_TAG_INSTANCE = "0020|0013"
_TAG_POSITION = "0020|0032"


# --------------------------------------------------------------------------- helpers
def normalize_modality(modality: str | None, what: str = "modality") -> str | None:
    """Return ``'CT'``/``'MR'`` for a user-given modality (``MRI`` accepted), ``None`` stays ``None``."""
    if modality is None:
        return None
    key = str(modality).strip().upper()
    if key not in _MODALITIES:
        raise InputError(f"{what} {modality!r}: expected 'CT' or 'MR'")
    return _MODALITIES[key]


def _lower_name(path: Path) -> str:
    return path.name.lower()


def _is_seg_nrrd(path: Path) -> bool:
    return _lower_name(path).endswith(".seg.nrrd")


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    name = _lower_name(path)
    return any(name.endswith(s) for s in suffixes)


def _itk_reason(exc: BaseException) -> str:
    """The informative line of a (long, multi-line) ITK exception message."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR" in line or "rror" in line:
            text = line.split("ERROR:", 1)[-1].strip()
            break
    else:
        text = lines[-1] if lines else type(exc).__name__
    text = re.sub(r"\b\w+\(0x[0-9a-fA-F]+\):\s*", "", text)  # "NrrdImageIO(0x55...): "
    text = re.sub(r"\s+", " ", text).strip().rstrip(":")
    return text[:300]


def _require_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: not found; expected an image file ({READ_FORMATS})")
    try:
        if path.is_dir():
            os.listdir(path)
        else:
            os.close(os.open(path, os.O_RDONLY))
    except PermissionError:
        raise InputError(f"{path}: permission denied; expected a {'folder' if path.is_dir() else 'file'} you can read") from None


def _check_sitk_dimension(image: sitk.Image, path: Path) -> sitk.Image:
    """Return a 3-D scalar image or raise an InputError naming what was found."""
    dim = image.GetDimension()
    if dim == 4 and image.GetSize()[3] == 1:
        # A 4-D file with a single time point (common in NIfTI): take the 3-D volume.
        size = list(image.GetSize())
        size[3] = 0
        image = sitk.Extract(image, size=size, index=[0, 0, 0, 0])
        dim = 3
    if dim != 3:
        raise InputError(
            f"{path}: found a {dim}-D image of size {tuple(image.GetSize())}; expected a 3-D volume "
            "(slices of a 2-D image or frames of a 4-D series are not volumes)"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{path}: found {image.GetNumberOfComponentsPerPixel()} components per voxel "
            f"({image.GetPixelIDTypeAsString()}); expected a scalar (grey-level) volume"
        )
    return image


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


MAX_AXIS = 2048
# the voxel sizes (mm) of CT and MR, from micro-CT to the thickest slab, with a margin;
# a spacing outside was stored in another unit
SPACING_RANGE_MM = (0.01, 100.0)
# an image read as the MR with this share of its voxels at or below MR_AIR_LIMIT is a CT:
# magnitude MR is never negative and a normalised one stays within a few units of 0,
# while air and the padding outside the scan field of a CT sit near -1000
MR_AIR_LIMIT = -500.0
MR_AIR_SHARE = 0.01


def check_image(volume: Volume, path: Path | str, modality: str | None) -> Volume:
    """Refuse images no segmentation should run on, naming what was found.

    Always: a voxel spacing outside :data:`SPACING_RANGE_MM` (zero or negative, or a
    spacing stored in metres or micrometres), a sheared grid (direction cosines not
    orthonormal), absurd sizes (an axis over :data:`MAX_AXIS`) and complex voxels. For an
    image read as ``modality`` ``CT`` or ``MR``: NaN or infinite voxels, and a blank image
    (every voxel the same), in which there is nothing to segment. For a CT: no
    negative value at all, which means either raw unsigned values without the rescale to
    Hounsfield units (0..4095) or an MR passed as the CT. For an MR: the air of a CT (at
    least :data:`MR_AIR_SHARE` of the voxels at or below :data:`MR_AIR_LIMIT`), a CT passed
    as the MR.
    """
    spacing = np.asarray(volume.spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(f"{path}: voxel spacing {tuple(float(s) for s in spacing)}; expected three positive numbers (mm)")
    low, high = SPACING_RANGE_MM
    if np.any(spacing < low) or np.any(spacing > high):
        unit = " (a spacing in metres?)" if np.all(spacing < low) else " (a spacing in micrometres?)" if np.all(spacing > high) else ""
        raise InputError(f"{path}: voxel spacing ({', '.join(f'{s:g}' for s in spacing)}) mm{unit}; "
                         f"expected {low:g} to {high:g} mm along each axis")
    direction = np.asarray(volume.direction, dtype=float)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise InputError(f"{path}: direction cosines {np.round(direction, 4).tolist()} are not at right angles or not "
                         "of unit length (a sheared grid); expected orthonormal directions (resample the image first)")
    if max(volume.shape) > MAX_AXIS:
        raise InputError(f"{path}: image size {volume.shape[::-1]} (i, j, k); expected at most {MAX_AXIS} voxels along every axis")
    if volume.array.dtype.kind == "c":
        raise InputError(f"{path}: found complex voxels ({volume.array.dtype}); expected a real scalar volume")
    if modality is None or volume.array.size == 0:
        return volume
    array = volume.array
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        bad = int((~np.isfinite(array)).sum())
        raise InputError(f"{path}: found {bad} NaN or infinite voxel(s); expected finite intensities")
    lo, hi = float(array.min()), float(array.max())
    if lo == hi:
        raise InputError(f"{path}: read as the {modality}, but every voxel is {lo:g}: a blank image; expected a scan "
                         "(check that the right file or series was chosen)")
    if modality == "CT":
        if lo >= 0:
            if array.dtype.kind in "iu" and hi <= 4095:
                kind = "raw unsigned CT values without the rescale to Hounsfield units (RescaleIntercept, usually -1024)"
            else:
                kind = "an MR or another non-CT image"
            raise InputError(
                f"{path}: read as the CT, but its values run from {lo:g} to {hi:g} with nothing below 0; this looks like {kind}. "
                "expected Hounsfield units (air about -1000, water 0)"
            )
    elif modality == "MR":
        air = float(np.mean(array <= MR_AIR_LIMIT)) if array.dtype.kind in "iuf" else 0.0
        if air >= MR_AIR_SHARE:
            raise InputError(
                f"{path}: read as the MR, but {100 * air:.3g}% of its voxels are at or below {MR_AIR_LIMIT:g} "
                f"(down to {lo:g}); this looks like a CT in Hounsfield units (air about -1000). "
                "expected an MR (magnitude values, 0 and above, or a normalised image)"
            )
    return volume


def _volume_from_sitk(image: sitk.Image, path: Path, **metadata: Any) -> Volume:
    image = _check_sitk_dimension(image, path)
    return Volume.from_sitk(image, source=str(path), spacing_known=True, **metadata)


# --------------------------------------------------------------------------- DICOM
def list_dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """DICOM series of a folder (not recursive): series UID -> file names in slice order."""
    folder = Path(folder)
    return {
        uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in _series_ids(folder)
    }


def _series_ids(folder: Path) -> tuple[str, ...]:
    """The DICOM series UIDs of a folder, without ITK's "No Series were found" warning on
    the terminal (an empty answer says it)."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as exc:  # pragma: no cover - GDCM rarely fails on a listing
        raise InputError(f"{folder}: could not scan for DICOM series ({_itk_reason(exc)})") from exc
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _select_series(folder: Path, series_uid: str | None) -> tuple[str, list[str]]:
    series = list_dicom_series(folder)
    if not series:
        n_files = sum(1 for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
        raise InputError(
            f"{folder}: found no DICOM series ({n_files} file(s) in the folder); expected a folder "
            f"holding the DICOM files of one series, or an image file ({READ_FORMATS})" + _series_below(folder)
        )
    listing = ", ".join(f"{uid} ({len(files)} files)" for uid, files in series.items())
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(
                f"series_uid {series_uid!r}: not found in {folder}; the folder holds: {listing}"
            )
        return series_uid, series[series_uid]
    if len(series) > 1:
        examples = "; ".join(f"{files[0]} for {uid}" for uid, files in series.items())
        raise InputError(
            f"{folder}: found {len(series)} DICOM series: {listing}; expected one. "
            f"Give one file of the series you want instead of the folder ({examples}): it stands for its series; "
            "or pass series_uid= to choose one, or put each series in its own folder"
        )
    uid = next(iter(series))
    return uid, series[uid]


def _series_below(folder: Path, most: int = 5) -> str:
    """Where a folder without a series of its own holds one a level down (a patient
    folder, or a CHAOS case's ``DICOM_anon``): said so, to be given instead."""
    if not folder.is_dir():
        return ""
    found = [sub for sub in sorted(p for p in folder.iterdir() if p.is_dir())
             if _series_ids(sub)]
    if not found:
        return ""
    shown = ", ".join(str(p) for p in found[:most]) + (f" and {len(found) - most} more" if len(found) > most else "")
    return (f"; a DICOM series is in {shown}: give that folder" if len(found) == 1
            else f"; DICOM series are in {shown}: give one of them")


def _dicom_series_uid_of_file(path: Path) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(
            f"{path}: not a readable DICOM file ({_itk_reason(exc)}); expected a DICOM image of a series"
        ) from exc
    return reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else None


def _broken_dicom_files(folder: Path, series_files: Sequence[str]) -> list[Path]:
    """Files of ``folder`` that look like DICOM (``.dcm``/``.ima`` or the ``DICM`` marker)
    but that GDCM left out of every series because their header cannot be read."""
    listed = {Path(f).resolve() for f in series_files}
    broken = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.resolve() not in listed):
        looks_dicom = path.suffix.lower() in (".dcm", ".ima")
        if not looks_dicom:
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.seek(128)
                looks_dicom = f.read(4) == b"DICM"
        if not looks_dicom:
            continue
        info = sitk.ImageFileReader()
        info.SetFileName(str(path))
        try:
            info.ReadImageInformation()
        except RuntimeError:
            broken.append(path)
    return broken


def _read_dicom_series(folder: Path, series_uid: str | None, modality: str | None) -> Volume:
    uid, files = _select_series(folder, series_uid)
    broken = _broken_dicom_files(folder, files)
    if broken:
        names = ", ".join(p.name for p in broken[:5]) + (" ..." if len(broken) > 5 else "")
        raise InputError(
            f"{folder}: {len(broken)} DICOM file(s) cannot be read ({names}): truncated or corrupt, so the series would "
            "miss slices; expected every file of the series complete"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"{folder}: could not read DICOM series {uid} ({len(files)} files): {_itk_reason(exc)}; "
            "expected a complete series of image slices"
        ) from exc
    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        raise InputError(
            f"{folder}: DICOM series {uid} is a single 2-D slice of size {image.GetSize()[:2]}; "
            "expected a volume (several slices)"
        )

    def tag(index: int, key: str) -> str | None:
        try:
            if reader.HasMetaDataKey(index, key):
                return reader.GetMetaData(index, key).strip()
        except (RuntimeError, IndexError):
            return None
        return None

    n_dicts = len(files) if image.GetSize()[2] == len(files) else 0
    slices: list[dict[str, Any]] = []
    for k in range(n_dicts):
        entry: dict[str, Any] = {"file": Path(files[k]).name}
        number = tag(k, _TAG_INSTANCE)
        try:
            entry["instance_number"] = int(float(number)) if number else None
        except ValueError:
            entry["instance_number"] = None
        pos = tag(k, _TAG_POSITION)
        try:
            entry["position"] = [float(v) for v in pos.split("\\")] if pos else None
        except ValueError:
            entry["position"] = None
        slices.append(entry)

    dicom_modality = tag(0, _TAG_MODALITY)
    metadata: dict[str, Any] = {
        "format": "dicom",
        "series_uid": uid,
        "dicom_folder": str(folder),
        "dicom_slices": slices,
    }
    if dicom_modality:
        metadata["dicom_modality"] = dicom_modality
    if modality is None and dicom_modality:
        modality = _MODALITIES.get(dicom_modality.upper())
    elif modality and dicom_modality and _MODALITIES.get(dicom_modality.upper()) not in (None, modality):
        log.warning("%s: modality given as %s but the DICOM files say %s", folder, modality, dicom_modality)
    if modality:
        metadata["modality"] = modality

    volume = _volume_from_sitk(image, folder, **metadata)
    warning = _slice_spacing_warning(volume, slices)
    if warning:
        log.warning("%s: %s", folder, warning)
        volume.metadata.setdefault("warnings", []).append(warning)
    if np.issubdtype(volume.array.dtype, np.integer) and volume.array.dtype.itemsize > 2:
        lo, hi = int(volume.array.min()), int(volume.array.max())
        if -32768 <= lo and hi <= 32767:
            volume.array = volume.array.astype(np.int16)
    return volume


def _slice_spacing_warning(volume: Volume, slices: Sequence[Mapping[str, Any]]) -> str | None:
    """Describe missing/duplicate/non-uniform slices of a DICOM series, or ``None``."""
    positions = [s.get("position") for s in slices]
    if len(positions) < 3 or any(p is None or len(p) != 3 for p in positions):
        return None
    normal = volume.direction[:, 2]
    offsets = np.asarray(positions, dtype=float) @ normal
    gaps = np.diff(offsets)
    expected = volume.spacing[2]
    if np.any(np.abs(gaps) < 1e-3):
        return "DICOM series has slices at duplicate positions; the volume geometry is unreliable"
    if np.max(np.abs(np.abs(gaps) - expected)) > max(0.01 * expected, 1e-3):
        return (
            f"DICOM slice spacing is not uniform (gaps {np.abs(gaps).min():.3g}..{np.abs(gaps).max():.3g} mm, "
            f"volume uses {expected:.3g} mm): missing slices or a non-uniform series"
        )
    return None


# --------------------------------------------------------------------------- readers
def _nifti_truncation(path: Path) -> str | None:
    """How a NIfTI-1 or -2 file (``.nii``, ``.nii.gz``) ends before its last voxel, else
    None. ITK reads such a file without an error, the missing voxels as zeros. The header
    gives the size: the voxels' offset plus their bytes. A gzip stream records its
    uncompressed size (modulo 2**32) in its last 4 bytes, which a cut-off stream does not
    hold; when they disagree, the stream is read through (a file of several gzip members
    records only the last one's size)."""
    import gzip
    import struct

    gz = _has_suffix(path, (".nii.gz",))
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            header = f.read(540)
    except (OSError, EOFError):
        return None  # ITK's reader says why
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 0 for d in dims[1 : dims[0] + 1]):
        return None
    expected = offset + int(np.prod(dims[1 : dims[0] + 1], dtype=np.int64)) * bitpix // 8
    if not gz:
        size = path.stat().st_size
        return f"its header describes {expected} bytes of header and voxels, the file holds {size}" if size < expected else None
    with open(path, "rb") as raw:
        raw.seek(-4, os.SEEK_END)
        if struct.unpack("<I", raw.read(4))[0] == expected % 2**32:
            return None
    present = 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                present += len(chunk)
    except EOFError:
        return f"its compressed data ends before the last of the {expected} bytes of header and voxels its header describes"
    except OSError:
        return None  # ITK's reader says why
    return f"its header describes {expected} bytes of header and voxels, the file holds {present}" if present < expected else None


def _read_sitk_file(path: Path, modality: str | None) -> Volume:
    if _has_suffix(path, (".nii", ".nii.gz")):
        truncated = _nifti_truncation(path)
        if truncated is not None:
            raise InputError(f"{path}: truncated: {truncated}; expected a complete file (copy or export it again)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        if "spacing" in str(exc).lower():
            raise InputError(f"{path}: voxel spacing is zero or invalid ({_itk_reason(exc)}); "
                             "expected three positive numbers (mm)") from exc
        raise InputError(
            f"{path}: could not read the image ({_itk_reason(exc)}); expected a complete, "
            f"uncorrupted file in one of: {READ_FORMATS}"
        ) from exc
    fmt = "nifti" if _has_suffix(path, (".nii", ".nii.gz")) else (
        "nrrd" if _has_suffix(path, (".nrrd", ".nhdr")) else (
            "metaimage" if _has_suffix(path, (".mha", ".mhd")) else "other"
        )
    )
    metadata: dict[str, Any] = {"format": fmt}
    if modality:
        metadata["modality"] = modality
    return _volume_from_sitk(image, path, **metadata)


def read_geometry(path: str | os.PathLike) -> tuple[tuple[int, int, int], tuple[float, ...], tuple[float, ...], np.ndarray]:
    """The grid of a single-file image (NRRD, NIfTI, MetaImage) from its header alone, as
    :func:`read_volume` would give it: ``(shape, spacing, origin, direction)``, the shape
    in array order ``(k, j, i)``. No voxel is read."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"{path}: could not read the image header ({_itk_reason(exc)}); expected a complete, "
                         f"uncorrupted file in one of: {', '.join(_SITK_SUFFIXES)}") from exc
    if reader.GetDimension() != 3:
        raise InputError(f"{path}: {reader.GetDimension()}-D image of size {reader.GetSize()}; expected a 3-D volume")
    return (tuple(int(n) for n in reversed(reader.GetSize())), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
            np.array(reader.GetDirection()).reshape(3, 3))


def _read_h5(path: Path, dataset: str, modality: str | None) -> Volume:
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: not a readable HDF5 file ({exc}); expected an .h5 file with "
                         "3-D datasets such as 'image' and 'label'") from exc
    with handle:
        if dataset not in handle or not isinstance(handle[dataset], h5py.Dataset):
            found = ", ".join(repr(k) for k in handle.keys()) or "none"
            raise InputError(f"{path}: no dataset {dataset!r} (found: {found}); expected a 3-D dataset "
                             f"named {dataset!r} (parameter dataset=)")
        array = np.asarray(handle[dataset][()])
    if array.ndim != 3:
        raise InputError(
            f"{path}: dataset {dataset!r} is {array.ndim}-D with shape {array.shape}; expected a 3-D volume"
        )
    metadata: dict[str, Any] = {
        "source": str(path),
        "format": "hdf5",
        "dataset": dataset,
        "spacing_known": False,
    }
    if modality:
        metadata["modality"] = modality
    log.debug("%s: HDF5 volumes carry no spacing; using (1, 1, 1) with spacing_known=False", path)
    return Volume(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), metadata)


def _read_seg_nrrd(path: Path, modality: str | None) -> Volume:
    try:
        import slicerio
    except ImportError as exc:  # pragma: no cover - slicerio is an optional dependency
        raise InputError(f"{path}: reading .seg.nrrd needs the 'slicerio' package (pip install slicerio)") from exc
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many types on bad files
        raise InputError(
            f"{path}: could not read the Slicer segmentation ({exc}); expected a complete .seg.nrrd file"
        ) from exc
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        ndim = None if voxels is None else voxels.ndim
        raise InputError(f"{path}: segmentation voxels are {ndim}-D; expected 3-D (or 4-D layers)")
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError(f"{path}: space directions have zero length; expected a valid voxel grid")
    direction = axes / spacing[None, :]
    origin = ijk_to_lps[:3, 3]

    segments_in = list(seg.get("segments", []))
    layers = voxels[np.newaxis] if voxels.ndim == 3 else voxels  # (layer, i, j, k)
    values = [int(s.get("labelValue", 1)) for s in segments_in]
    # One layer with distinct values: keep the file's label values. Several layers
    # (overlapping segments) or repeated values: number the segments 1..N in file order.
    renumber = layers.shape[0] > 1 or len(set(values)) != len(values)
    labelmap = np.zeros(layers.shape[1:], dtype=np.uint16) if renumber else layers[0]
    segments_out: list[dict[str, Any]] = []
    overlap = False
    layer_of: dict[int, tuple[int, int]] = {}  # label value in the merged map -> (layer, value in it)
    for n, segment in enumerate(segments_in):
        value = values[n]
        out_value = n + 1 if renumber else value
        if renumber:
            layer = int(segment.get("layer", 0))
            if not 0 <= layer < layers.shape[0]:
                raise InputError(
                    f"{path}: segment {segment.get('name', n)!r} is on layer {layer}; the file has "
                    f"{layers.shape[0]} layer(s)"
                )
            mask = layers[layer] == value
            overlap = overlap or bool(np.any(labelmap[mask]))
            labelmap[mask] = out_value
            layer_of[out_value] = (layer, value)
        terminology = None
        if "terminology" in segment:
            terminology = slicerio.segmentation.terminology_entry_to_string(segment["terminology"])
        color = [float(c) for c in segment.get("color", [])]
        segments_out.append({
            "label": out_value,
            "name": segment.get("name", segment.get("id", f"Segment_{out_value}")),
            "color": color if len(color) == 3 else None,
            "terminology": terminology,
            "id": segment.get("id"),
        })
    labelmap = _as_label_array(np.asarray(labelmap), path)
    if overlap:
        log.warning("%s: segments overlap; in the merged label map later segments overwrite earlier ones (a segment "
                    "chosen by name, to score or to annotate, is taken whole from its layer)", path)
    metadata: dict[str, Any] = {
        "source": str(path),
        "format": "seg.nrrd",
        "spacing_known": True,
        "segments": segments_out,
    }
    if renumber:
        metadata["relabelled"] = True
    if overlap:
        metadata.setdefault("warnings", []).append("overlapping segments were merged (later wins)")
        # each segment whole, for segment_mask: the merged map has lost what later segments cover
        metadata["segment_layers"] = (np.transpose(layers, (0, 3, 2, 1)), layer_of)
    if modality:
        metadata["modality"] = modality
    array = np.ascontiguousarray(np.transpose(labelmap, (2, 1, 0)))  # (i,j,k) -> (k,j,i)
    return Volume(array, tuple(spacing), tuple(origin), direction, metadata)


def segment_mask(label: Volume, value: int) -> np.ndarray:
    """The voxels of the structure ``value`` of ``label``, as a bool array: ``label.array ==
    value``, except for a Slicer segmentation whose segments overlap, where the segment is
    taken whole from its own layer (in the merged label map a later segment, a tumour
    drawn inside the liver, has overwritten part of it)."""
    layers = label.metadata.get("segment_layers")
    if layers is not None and layers[0].shape[1:] == label.array.shape and value in layers[1]:
        layer, layer_value = layers[1][value]
        return layers[0][layer] == layer_value
    return label.array == value


def read_volume(
    path: str | os.PathLike,
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    dataset: str = "image",
) -> Volume:
    """Read a 3-D image, keeping its geometry (origin, spacing, direction in LPS).

    Args:
        path: an image file or a DICOM series folder (formats in the module docstring).
        modality: ``'CT'`` or ``'MR'`` if known; DICOM files supply it themselves.
        series_uid: for a DICOM folder with several series, the one to read.
        dataset: for HDF5 files, the dataset to read (``'image'`` or ``'label'``).

    Returns:
        A :class:`Volume` with ``metadata["source"]``, ``metadata["spacing_known"]`` and,
        when known, ``metadata["modality"]``.

    Raises:
        InputError: missing path, unreadable or corrupt file, unsupported format, a
            2-D or 4-D image, an ambiguous or empty DICOM folder.
    """
    path = Path(path)
    modality = normalize_modality(modality)
    _require_exists(path)
    if path.is_dir():
        return check_image(_read_dicom_series(path, series_uid, modality), path, modality)
    if _is_seg_nrrd(path):
        if modality is not None:
            raise InputError(f"{path}: a Slicer segmentation given as the {modality}; expected an image "
                             f"(the {modality} volume itself, not labels)")
        return check_image(_read_seg_nrrd(path, modality), path, modality)
    if _has_suffix(path, _H5_SUFFIXES):
        return check_image(_read_h5(path, dataset, modality), path, modality)
    if _has_suffix(path, (".dcm", ".ima")):
        uid = series_uid or _dicom_series_uid_of_file(path)
        return check_image(_read_dicom_series(path.parent, uid, modality), path, modality)
    if not _has_suffix(path, _SITK_SUFFIXES):
        log.info("%s: unfamiliar extension; trying SimpleITK's readers", path)
    return check_image(_read_sitk_file(path, modality), path, modality)


def read_label(
    path: str | os.PathLike,
    reference: Volume | None = None,
    *,
    dataset: str = "label",
    series_uid: str | None = None,
) -> Volume:
    """Read a label map (integer values, 0 = background).

    Floating-point files holding whole numbers (common for NIfTI labels) are converted;
    the result is ``uint8`` when the values fit, else ``uint16``/``int32``.

    Args:
        path: label file (any :func:`read_volume` format, ``.seg.nrrd`` included).
        reference: the image the labels belong to; if given, the geometry must match.
        dataset: for HDF5 files, the dataset holding the labels.
        series_uid: for a DICOM folder with several series (rare for labels).

    Raises:
        InputError: unreadable file, non-integer or negative values, or a geometry
            that differs from ``reference`` (the message lists what differs).
    """
    path = Path(path)
    volume = read_volume(path, dataset=dataset, series_uid=series_uid)
    volume.metadata.pop("modality", None)
    volume.array = _as_label_array(volume.array, path)
    if reference is not None:
        problems = reference.geometry_mismatch(volume)
        if problems:
            ref_name = reference.metadata.get("source", "the reference image")
            raise InputError(
                f"{path}: label geometry does not match {ref_name}: {'; '.join(problems)} "
                "(label value != image value); expected the label map on the image's voxel grid"
            )
    return volume


def _as_label_array(array: np.ndarray, path: Path | str) -> np.ndarray:
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{path}: voxel type {array.dtype}; expected integer label values")
        if not np.all(np.isfinite(array)):
            raise InputError(f"{path}: found NaN or infinite values; expected integer label values")
        rounded = np.rint(array)
        bad = np.abs(array - rounded) > 1e-3
        if np.any(bad):
            example = float(array[bad].flat[0])
            raise InputError(
                f"{path}: found non-integer value {example:g} in a label map; expected whole numbers "
                "(0 = background). Is this an image rather than a label map?"
            )
        array = rounded
    if array.size == 0:
        return array.astype(np.uint8)
    lo, hi = int(array.min()), int(array.max())
    if lo < 0:
        raise InputError(f"{path}: found negative label value {lo}; expected 0 (background) or positive labels")
    for dtype in (np.uint8, np.uint16, np.int32):
        if hi <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    raise InputError(f"{path}: label value {hi} is too large; expected values below 2**31")


# --------------------------------------------------------------------------- writers
def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` atomically; the format follows the extension.

    Supported: ``.nrrd``, ``.nii.gz``, ``.nii``, ``.mha`` (single-file formats, so the
    write is atomic). Use :func:`write_segmentation` for ``.seg.nrrd``.
    Only the array and geometry are stored, not ``volume.metadata``.

    Returns:
        The path written.
    """
    path = Path(path)
    if _is_seg_nrrd(path):
        raise InputError(f"{path}: use write_segmentation() for Slicer .seg.nrrd files (it needs segment names)")
    if not _has_suffix(path, WRITE_FORMATS):
        raise InputError(f"{path}: unsupported extension; expected one of {', '.join(WRITE_FORMATS)}")
    v = volume
    if v.array.dtype == np.float16:
        v = v.with_array(v.array.astype(np.float32))
    elif v.array.dtype == np.bool_:
        v = v.with_array(v.array.astype(np.uint8))
    image = v.to_sitk()
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=bool(compress))
        except RuntimeError as exc:
            free = _free_bytes(path.parent)
            if free is not None and free < 1 << 20:
                raise storage_error(path, OSError(errno.ENOSPC, "No space left on device")) from exc
            if not os.access(path.parent, os.W_OK):
                raise storage_error(path, OSError(errno.EACCES, "Permission denied")) from exc
            raise InputError(f"{path}: could not write the image ({_itk_reason(exc)})") from exc
    return path


def _parse_color(value: Any, where: str) -> list[float]:
    try:
        color = [float(c) for c in value]
    except (TypeError, ValueError):
        color = []
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise InputError(f"{where} color {value!r}: expected three numbers (r, g, b) between 0 and 1")
    return color


def write_segmentation(
    label: Volume,
    path: str | os.PathLike,
    segments: Sequence[Mapping[str, Any]],
) -> Path:
    """Write a label map as a 3D Slicer segmentation (``.seg.nrrd``), atomically.

    Args:
        label: integer label volume (0 = background).
        path: output file; must end with ``.seg.nrrd``.
        segments: one dict per label value present in ``label``; keys ``label`` (int,
            required; ``value`` or ``labelValue`` accepted), ``name`` (str), ``color``
            (r, g, b in 0..1), optional ``terminology`` (Slicer terminology entry string,
            e.g. ``"Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"``)
            and optional ``id``.

    Reading the file back with :func:`read_label` gives the same label values and
    geometry (segments are written in one layer with their own label values).

    Raises:
        InputError: wrong extension, non-integer labels, a label value without a
            segment dict, duplicate values, or malformed colours/terminology.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    path = Path(path)
    if not _is_seg_nrrd(path):
        raise InputError(f"{path}: expected a file name ending with .seg.nrrd")
    array = _as_label_array(label.array, "label volume")
    present = {int(v) for v in label_values(array)} - {0}

    by_value: dict[int, dict[str, Any]] = {}
    for n, raw in enumerate(segments):
        where = f"segments[{n}]"
        if not isinstance(raw, Mapping):
            raise InputError(f"{where}: found {type(raw).__name__}; expected a dict with label, name, color")
        value = raw.get("label", raw.get("value", raw.get("labelValue")))
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
            raise InputError(f"{where} label {value!r}: expected a positive integer label value")
        value = int(value)
        if value in by_value:
            raise InputError(f"{where} label {value}: described twice; expected one dict per label value")
        name = raw.get("name") or f"Segment_{value}"
        if not isinstance(name, str) or "|" in name or "\n" in name:
            raise InputError(f"{where} name {name!r}: expected a one-line string without '|'")
        entry: dict[str, Any] = {
            "id": str(raw.get("id") or f"Segment_{value}"),
            "name": name,
            "labelValue": value,
            "layer": 0,
            "color": _parse_color(raw.get("color", (0.5, 0.5, 0.5)), where),
        }
        terminology = raw.get("terminology")
        if terminology:
            if not isinstance(terminology, str):
                raise InputError(f"{where} terminology: expected a Slicer terminology entry string")
            try:
                entry["terminology"] = terminology_entry_from_string(terminology)
            except (IndexError, AttributeError) as exc:
                raise InputError(
                    f"{where} terminology {terminology!r}: expected a Slicer terminology entry string "
                    "(7 '~'-separated fields: context~category~type~modifier~anatomic context~region~region modifier)"
                ) from exc
        by_value[value] = entry

    missing = sorted(present - set(by_value))
    if missing:
        raise InputError(
            f"segments: label value(s) {missing} occur in the label volume but have no segment dict; "
            "expected one dict (label, name, color) per non-zero value"
        )
    ids = [e["id"] for e in by_value.values()]
    if len(set(ids)) != len(ids):
        raise InputError(f"segments: duplicate segment ids {ids}; expected unique ids")

    voxels = np.ascontiguousarray(np.transpose(array, (2, 1, 0)))  # (k,j,i) -> (i,j,k)
    for value, entry in by_value.items():
        if value in present:
            idx = np.nonzero(voxels == value)
            entry["extent"] = [int(v) for axis in idx for v in (axis.min(), axis.max())]
        else:
            entry["extent"] = [0, -1, 0, -1, 0, -1]
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": label.ijk_to_lps_matrix(),
        "encoding": "gzip",
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [by_value[v] for v in sorted(by_value)],
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=6)
    return path
