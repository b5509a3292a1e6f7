"""Slicer scenes (``.mrb``) built with real MRML, through slicer-core, without the Slicer app.

This module is imported only when a scene is requested; it needs the optional
``slicer-core`` package (``pip install "vqmedseg[scene]"``). The rest of the library never
imports it, so ``import VQMedSegLib`` stays free of Slicer.

Coordinates: :class:`~VQMedSegLib.data.volume.Volume` keeps ITK's LPS geometry while MRML
works in RAS, so every transfer flips the first two axes
(``IJKToRAS = diag(-1, -1, 1) @ IJKToLPS``).

Slicer reads volumes back with a right-handed index frame: a volume whose direction
matrix has determinant -1 survives a save/load with the same physical placement but with
one array axis reversed (and its direction column negated); in memory the transfer is exact.

Scenes need a small amount of application plumbing that the Slicer app normally provides:
:func:`new_scene` creates it and returns the logic objects, which the caller must keep
alive as long as the scene is used (VTK does not hold Python references to them).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:
    import slicer
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkCommonCore import reference, vtkObject, vtkStringArray
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError(
        "writing a Slicer scene needs the optional package slicer-core: found it missing "
        f"({exc}); expected it installed, e.g. pip install 'vqmedseg[scene]'"
    ) from exc

from ..data.volume import Volume, finite_range, label_values
from ..errors import InputError
from ..files import atomic_path

logger = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
"""Flips LPS to RAS and back (the matrix is its own inverse)."""

ROLE_ATTRIBUTE = "VQMedSeg.Role"
"""Node attribute saved in the scene that says what a node shows (``image``,
``prediction``, ``uncertainty``), so a reader need not rely on names."""

LABEL_VALUE_TAG = "VQMedSeg.LabelValue"
"""Segment tag holding the label value the segment had in the library's label array."""

SLICE_VIEWS = ("Red", "Yellow", "Green")


@dataclass
class SceneLogics:
    """The application logic and module logics a scene needs outside the Slicer app.

    Keep this object alive while the scene is in use: VTK does not hold Python
    references to the logics, and a collected logic leaves the scene half-configured.
    """

    app: Any
    colors: Any
    volumes: Any
    segmentations: Any


# ----------------------------------------------------------------------------- scene
def new_scene() -> tuple[Any, SceneLogics]:
    """Create an empty MRML scene with the logics Slicer would attach to it.

    Returns:
        ``(scene, logics)``: a ``vtkMRMLScene`` holding Slicer's built-in colour tables,
        and the :class:`SceneLogics` that must outlive it. The segmentations logic
        registers the segmentation node classes, which reading a scene file requires.
    """
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)

    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app)
    # Slicer's file-based colour tables (Viridis, GenericAnatomyColors ...) are not part of
    # slicer-core, so the colour logic reports an error when it looks for them. That is
    # expected here; silence only this call.
    with _vtk_warnings_silenced():
        colors.SetMRMLScene(scene)
    app.SetColorLogic(colors)
    app.SetModuleLogic("Colors", colors)

    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app)
    volumes.SetMRMLScene(scene)
    app.SetModuleLogic("Volumes", volumes)

    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLApplicationLogic(app)
    segmentations.SetMRMLScene(scene)
    app.SetModuleLogic("Segmentations", segmentations)

    return scene, SceneLogics(app, colors, volumes, segmentations)


@contextlib.contextmanager
def _vtk_warnings_silenced() -> Iterator[None]:
    previous = vtkObject.GetGlobalWarningDisplay()
    vtkObject.GlobalWarningDisplayOff()
    try:
        yield
    finally:
        vtkObject.SetGlobalWarningDisplay(previous)


# ---------------------------------------------------------------------------- volumes
def add_volume(
    scene: Any,
    volume: Volume,
    name: str,
    *,
    window: tuple[float, float] | None = None,
    role: str = "image",
    node_class: str = "vtkMRMLScalarVolumeNode",
) -> Any:
    """Add ``volume`` to ``scene`` as a scalar volume node with exactly its geometry.

    Args:
        scene: the ``vtkMRMLScene``.
        volume: voxels ``[k, j, i]`` with LPS geometry; converted to RAS here.
        name: node name shown in Slicer (also the file name inside a saved scene).
        window: ``(lower, upper)`` display range; ``None`` lets Slicer choose one.
        role: value of the :data:`ROLE_ATTRIBUTE` node attribute.
        node_class: ``vtkMRMLScalarVolumeNode`` or ``vtkMRMLLabelMapVolumeNode``.

    Returns:
        The new volume node, with a display node.
    """
    if window is not None:
        lower, upper = (float(w) for w in window)
        if not upper > lower:
            raise InputError(f"window for volume {name!r}: found {window}, expected (lower, upper) with lower < upper")
    image = _image_data_from_array(volume.array, f"volume {name!r}")
    node = scene.AddNewNodeByClass(node_class, name)
    _set_node_geometry(node, volume)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.CreateDefaultDisplayNodes()
    if window is not None:
        # set before the voxels arrive: a display node left on automatic computes a
        # histogram of every voxel for a window that is then replaced (0.25 s at 512 x 512 x 150)
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(lower, upper)
    node.SetAndObserveImageData(image)
    return node


def volume_from_node(node: Any) -> Volume:
    """Read a volume node back into a :class:`Volume` (RAS geometry converted to LPS).

    Args:
        node: a ``vtkMRMLScalarVolumeNode`` (or labelmap) with single-component image data.

    Returns:
        A :class:`Volume` owning a copy of the voxels. A parent transform of the node, if
        any, is not applied.
    """
    image = _image_data(node)
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(
            f"volume node {node.GetName()!r}: found {image.GetNumberOfScalarComponents()} "
            "components per voxel, expected 1"
        )
    if node.GetParentTransformNode() is not None:
        logger.warning("volume node %r has a parent transform; it is not applied", node.GetName())
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    spacing, origin, direction = node_geometry(node)
    return Volume(array, spacing, origin, direction, {"source": f"MRML node {node.GetName()}"})


def _image_data(node: Any) -> Any:
    """The node's ``vtkImageData``; an error naming the node when it holds none."""
    image = node.GetImageData()
    if image is None:
        raise InputError(f"volume node {node.GetName()!r}: found no image data, expected voxels")
    return image


def node_geometry(node: Any) -> tuple[tuple[float, ...], tuple[float, ...], np.ndarray]:
    """``(spacing, origin, direction)`` of a volume node in LPS, without copying its voxels."""
    matrix = vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    direction_ras = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    direction = LPS_TO_RAS @ direction_ras
    spacing = np.asarray(node.GetSpacing(), dtype=float)
    origin = LPS_TO_RAS @ np.asarray(node.GetOrigin(), dtype=float)
    image = node.GetImageData()
    extent_start = np.asarray(image.GetExtent()[0::2], dtype=float) if image is not None else np.zeros(3)
    if extent_start.any():  # voxel (0, 0, 0) of the array sits at the extent's start
        origin = origin + direction @ (spacing * extent_start)
    return tuple(spacing), tuple(origin), direction


def _set_node_geometry(node: Any, volume: Volume) -> None:
    # Spacing, origin and directions are set separately (rather than one IJKToRAS matrix)
    # so that spacing is not recomputed from column norms: the round trip stays exact.
    origin_ras, direction_ras = _ras_geometry(volume)
    node.SetSpacing(*volume.spacing)
    node.SetOrigin(*origin_ras)
    node.SetIJKToRASDirectionMatrix(direction_ras)


def _ras_geometry(volume: Volume) -> tuple[np.ndarray, Any]:
    """The volume's origin in RAS, and its axes' RAS directions as a ``vtkMatrix4x4``."""
    direction_ras = LPS_TO_RAS @ volume.direction
    matrix = vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(direction_ras[r, c]))
    return LPS_TO_RAS @ np.asarray(volume.origin, dtype=float), matrix


def _image_data_from_array(array: np.ndarray, what: str) -> Any:
    """A deep-copied ``vtkImageData`` (origin 0, spacing 1, as MRML expects) from ``[k, j, i]``."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    elif array.dtype.kind in "iu" and array.dtype.itemsize == 8:
        # Slicer does not display 64-bit integer volumes; narrow when the values allow it.
        lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise InputError(
                f"{what}: found 64-bit integers in [{lo}, {hi}], expected values that fit in 32 bits"
            )
        array = array.astype(np.int32)
    elif array.dtype.kind not in "iuf":
        raise InputError(f"{what}: found voxel type {array.dtype}, expected integers or floats")
    k, j, i = array.shape
    image = vtkImageData()
    image.SetDimensions(int(i), int(j), int(k))
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


# ---------------------------------------------------------------------- segmentation
def add_segmentation(
    scene: Any,
    label: Volume,
    segments: Sequence[Mapping[str, Any]],
    reference_node: Any = None,
    name: str = "Segmentation",
) -> Any:
    """Add a label array as a segmentation node, one named and coloured segment per value.

    Args:
        scene: the ``vtkMRMLScene``.
        label: integer label array ``[k, j, i]`` with LPS geometry; 0 is background.
        segments: one mapping per label value with keys ``value`` (int > 0), ``name``,
            ``color`` (three floats in [0, 1]) and optionally ``terminology`` (a Slicer
            terminology entry string, see :mod:`VQMedSegLib.tasks`). Values absent from
            ``label`` become empty segments, so the scene always lists every structure.
        reference_node: volume node whose grid the segmentation is edited on in Slicer
            (usually the CT); ``None`` uses the label's own grid.
        name: segmentation node name.

    Returns:
        The ``vtkMRMLSegmentationNode``, segments ordered by label value.
    """
    specs = _segment_specs(segments)
    by_value = {spec["value"]: spec for spec in specs}
    present = {int(v) for v in label_values(label.array) if v != 0}
    unknown = sorted(present - set(by_value))
    if unknown:
        raise InputError(
            f"label for segmentation {name!r}: found values {unknown} with no segment description, "
            f"expected only {sorted(by_value)} (and 0 for background)"
        )
    if reference_node is not None:
        mismatch = _grid_mismatch(reference_node, label)
        if mismatch:
            logger.warning(
                "segmentation %r: label grid differs from reference %r (%s); Slicer resamples on edit",
                name, reference_node.GetName(), "; ".join(mismatch),
            )

    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.SetAttribute(ROLE_ATTRIBUTE, "prediction")
    if reference_node is not None:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)

    segmentation = segmentation_node.GetSegmentation()
    if present:
        _add_label_segments(label, [spec for spec in specs if spec["value"] in present], segmentation)
    for index, spec in enumerate(specs):
        segment_id = segmentation.GetSegmentIdBySegmentName(spec["name"])
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", spec["name"], spec["color"])
        segment = segmentation.GetSegment(segment_id)
        segment.SetName(spec["name"])
        segment.SetColor(*spec["color"])
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTag(LABEL_VALUE_TAG, str(spec["value"]))
        if spec.get("terminology"):
            segment.SetTerminology(spec["terminology"])
        segmentation.SetSegmentIndex(segment_id, index)
    return segmentation_node


def _add_label_segments(label: Volume, specs: list[dict[str, Any]], segmentation: Any) -> None:
    """One segment per spec, its value's voxels of ``label`` (each value present), all
    sharing one binary labelmap, as Slicer's labelmap import makes them: the label's
    voxels cropped to the box around the non-zero ones, in the label's own place.
    (Through the import, with its temporary labelmap and colour-table nodes, this took
    0.37 s at 512 x 512 x 150, on the GUI thread; this takes 0.02 s.)"""
    array = np.asarray(label.array)
    narrow = np.uint8 if max(spec["value"] for spec in specs) < 256 else np.int32
    nonzero = array != 0
    plane = nonzero.any(axis=0)
    (ks,), (js,), (is_,) = (np.nonzero(nonzero.any(axis=(1, 2))), np.nonzero(plane.any(axis=1)),
                           np.nonzero(plane.any(axis=0)))
    box = (slice(ks[0], ks[-1] + 1), slice(js[0], js[-1] + 1), slice(is_[0], is_[-1] + 1))
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(is_[0]), int(is_[-1]), int(js[0]), int(js[-1]), int(ks[0]), int(ks[-1]))
    origin_ras, direction_ras = _ras_geometry(label)
    image.SetSpacing(*label.spacing)
    image.SetOrigin(*origin_ras)
    image.SetDirectionMatrix(direction_ras)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array[box], dtype=narrow).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    binary = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    for spec in specs:
        segment = slicer.vtkSegment()
        segment.SetName(spec["name"])
        segment.SetLabelValue(spec["value"])
        segment.AddRepresentation(binary, image)
        if not segmentation.AddSegment(segment):
            raise InputError(f"label value {spec['value']} ({spec['name']}): MRML could not add it as a segment")


def labelmap_from_segmentation(
    segmentation_node: Any,
    reference_node: Any,
    values: Mapping[str, int] | None = None,
    only: str | None = None,
) -> Volume:
    """Export a segmentation back to a label array on the grid of ``reference_node``;
    where segments overlap, the later segment's value wins.

    Args:
        segmentation_node: a ``vtkMRMLSegmentationNode``.
        reference_node: volume node giving the output grid (e.g. the CT).
        values: label value per segment name; by default the value stored by
            :func:`add_segmentation` (segment tag :data:`LABEL_VALUE_TAG`), else the
            segment's position + 1.
        only: the name of the one segment to export (default: every segment).

    Returns:
        A :class:`Volume` of ``int16`` labels on the reference grid (0 = background).
    """
    scene = segmentation_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    out = np.zeros(_image_data(reference_node).GetDimensions()[::-1], dtype=np.int16)  # its grid; its voxels are not needed
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        if only is not None and segment.GetName() != only:
            continue
        value = _segment_value(segment, index, values)
        tables_before = _node_ids(scene, "vtkMRMLColorTableNode")
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "VQMedSeg temporary export")
        try:
            ids = vtkStringArray()
            ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_node
            ):
                raise InputError(
                    f"segment {segment.GetName()!r} of {segmentation_node.GetName()!r}: export to a "
                    f"labelmap on {reference_node.GetName()!r} failed, expected a binary labelmap segment"
                )
            mask = volume_from_node(labelmap).array
        finally:
            _remove_volume_node(scene, labelmap)
            # The export adds a colour table for the labelmap; it is not part of the scene.
            for table_id in _node_ids(scene, "vtkMRMLColorTableNode") - tables_before:
                scene.RemoveNode(scene.GetNodeByID(table_id))
        if mask.shape != out.shape:
            raise InputError(
                f"segment {segment.GetName()!r}: exported shape {mask.shape}, expected the reference shape {out.shape}"
            )
        out[mask != 0] = value
    return Volume(out, *node_geometry(reference_node), {"source": f"segmentation {segmentation_node.GetName()}"})


def _segment_value(segment: Any, index: int, values: Mapping[str, int] | None) -> int:
    name = segment.GetName()
    if values is not None:
        if name not in values:
            raise InputError(f"values: found no entry for segment {name!r}, expected one of {sorted(values)}")
        return int(values[name])
    tag = reference("")
    if segment.GetTag(LABEL_VALUE_TAG, tag) and str(tag.get()).strip().lstrip("-").isdigit():
        return int(str(tag.get()))
    return index + 1


def _segment_specs(segments: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not segments:
        raise InputError("segments: found none, expected at least one {value, name, color} description")
    specs: list[dict[str, Any]] = []
    for n, raw in enumerate(segments):
        missing = {"value", "name", "color"} - set(raw)
        if missing:
            raise InputError(f"segments[{n}]: found keys {sorted(raw)}, missing {sorted(missing)}")
        value = raw["value"]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < int(value) < 32768:
            raise InputError(f"segments[{n}] value: found {value!r}, expected an integer in 1..32767")
        name = str(raw["name"]).strip()
        if not name:
            raise InputError(f"segments[{n}] name: found {raw['name']!r}, expected a non-empty name")
        color = tuple(float(c) for c in raw["color"])
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise InputError(f"segments[{n}] color: found {raw['color']!r}, expected three values in [0, 1]")
        specs.append({"value": int(value), "name": name, "color": color, "terminology": raw.get("terminology") or ""})
    for key in ("value", "name"):
        seen = [spec[key] for spec in specs]
        duplicates = sorted({v for v in seen if seen.count(v) > 1}, key=str)
        if duplicates:
            raise InputError(f"segments: found repeated {key}s {duplicates}, expected each {key} once")
    return sorted(specs, key=lambda spec: spec["value"])


def _grid_mismatch(node: Any, volume: Volume) -> list[str]:
    image = node.GetImageData()
    if image is None:
        return ["reference has no image data"]
    dims = image.GetDimensions()
    spacing = node.GetSpacing()
    matrix = vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(matrix)
    probe = Volume(
        np.broadcast_to(np.zeros(1, np.uint8), dims[::-1]),  # geometry only; no voxels allocated
        spacing,
        tuple(LPS_TO_RAS @ np.asarray(node.GetOrigin())),
        LPS_TO_RAS @ np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)]),
    )
    return probe.geometry_mismatch(volume)


def _node_ids(scene: Any, class_name: str) -> set[str]:
    return {scene.GetNthNodeByClass(n, class_name).GetID() for n in range(scene.GetNumberOfNodesByClass(class_name))}


def _remove_volume_node(scene: Any, node: Any) -> None:
    display = node.GetDisplayNode()
    if display is not None:
        scene.RemoveNode(display)
    storage = node.GetStorageNode()
    if storage is not None:
        scene.RemoveNode(storage)
    scene.RemoveNode(node)


# ----------------------------------------------------------------------- uncertainty
def colour_table_node(scene: Any, colormap: str = "viridis", n_colors: int = 256) -> Any:
    """Return (creating once per scene) a colour table node sampled from a matplotlib colormap.

    Slicer's own Viridis table ships as a file with the app, not with slicer-core, so the
    table is built here; Slicer saves it with the scene.

    Args:
        scene: the ``vtkMRMLScene``.
        colormap: a matplotlib colormap name; perceptually uniform ones (``viridis``,
            ``cividis``, ``magma``) suit uncertainty maps.
        n_colors: number of table entries.

    Returns:
        A ``vtkMRMLColorTableNode`` named :func:`colour_table_name`.
    """
    name = colour_table_name(colormap)
    existing = scene.GetFirstNode(name, "vtkMRMLColorTableNode")
    if existing is not None and existing.GetNumberOfColors() == n_colors:
        return existing
    rgba = _colormap_rgba(colormap, n_colors)
    node = scene.CreateNodeByClass("vtkMRMLColorTableNode")
    node.SetTypeToUser()
    node.SetName(name)
    node.SetHideFromEditors(False)  # listed in Slicer's colour selectors (and saved under Data/)
    node.SetNumberOfColors(n_colors)
    for index, (r, g, b, a) in enumerate(rgba):
        node.SetColor(index, f"{colormap}{index:03d}", float(r), float(g), float(b), float(a))
    node.SetAttribute("Category", "Continuous")
    scene.AddNode(node)
    node.UnRegister(None)  # the scene holds the reference now
    return node


def colour_table_name(colormap: str) -> str:
    """Name given to the colour table built from ``colormap`` (distinct from Slicer's own tables)."""
    return f"VQMedSeg {colormap}"


def _colormap_rgba(colormap: str, n_colors: int) -> np.ndarray:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[colormap]
    except KeyError:
        raise InputError(
            f"colormap {colormap!r}: expected a matplotlib colormap name such as viridis, cividis or magma"
        ) from None
    return np.asarray(cmap.resampled(n_colors)(np.linspace(0.0, 1.0, n_colors)), dtype=float)


def add_uncertainty_overlay(scene: Any, volume: Volume, name: str, colormap: str = "viridis") -> Any:
    """Add an uncertainty map as a scalar volume shown through a perceptual colour table.

    Args:
        scene: the ``vtkMRMLScene``.
        volume: per-voxel uncertainty (entropy, variance ...) with LPS geometry.
        name: node name.
        colormap: matplotlib colormap for the display (256 entries).

    Returns:
        The ``vtkMRMLScalarVolumeNode``; its display node uses the colour table and a
        window spanning the finite data range.
    """
    array = volume.array if volume.array.dtype.kind == "f" else volume.array.astype(np.float32)
    lower, upper = finite_range(array)  # a constant map gets a window one wide: any non-empty window shows it
    node = add_volume(scene, volume.with_array(array), name, window=(lower, upper), role="uncertainty")
    node.GetDisplayNode().SetAndObserveColorNodeID(colour_table_node(scene, colormap).GetID())
    return node


def show_in_slice_views(scene: Any, background: Any, foreground: Any = None, opacity: float = 0.4) -> None:
    """Set what Slicer's three slice views show when the scene is opened.

    Slice composite nodes are singletons in Slicer (tags ``Red``, ``Yellow``, ``Green``);
    saved in the scene, they replace the app's on load, as in scenes Slicer saves itself.

    Args:
        scene: the ``vtkMRMLScene``.
        background: volume node in the background layer (e.g. the CT).
        foreground: volume node blended on top (e.g. the uncertainty map), or ``None``.
        opacity: foreground opacity in [0, 1].
    """
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"foreground opacity: found {opacity}, expected a value in [0, 1]")
    for view in SLICE_VIEWS:
        composite = scene.GetSingletonNode(view, "vtkMRMLSliceCompositeNode")
        if composite is None:
            composite = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetSingletonTag(view)
            composite.SetLayoutName(view)
            scene.AddNode(composite)
            composite.UnRegister(None)
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity if foreground is not None else 0.0)


# ------------------------------------------------------------------------- files
def write_mrb(scene: Any, path: str | os.PathLike) -> Path:
    """Save ``scene`` as a Slicer bundle at ``path``, atomically.

    MRML writes the bundle through a working folder next to its target and names the
    folder inside the zip after the file, so the bundle is written under its final name
    in a private temporary folder beside ``path`` and then renamed into place.

    Args:
        scene: the ``vtkMRMLScene``.
        path: destination ending in ``.mrb``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise InputError(f"scene file {path}: found suffix {path.suffix!r}, expected '.mrb'")
    with atomic_path(path) as tmp:
        work = Path(tempfile.mkdtemp(prefix=f".{path.stem}-", dir=path.parent))
        try:
            target = work.absolute() / path.name  # MRML refuses a bundle folder given relative to the working one
            messages = slicer.vtkMRMLMessageCollection()
            ok = scene.WriteToMRB(str(target), None, messages)
            if not ok or not target.is_file():
                raise InputError(
                    f"scene file {path}: MRML could not write the bundle "
                    f"({messages.GetAllMessagesAsString().strip() or 'no details'}), expected a writable folder"
                )
            if messages.GetNumberOfMessages():
                logger.info("writing %s: %s", path, messages.GetAllMessagesAsString().strip())
            os.replace(target, tmp)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    logger.info("wrote Slicer scene %s", path)
    return path


def read_mrb(path: str | os.PathLike) -> tuple[Any, SceneLogics]:
    """Load a Slicer bundle into a fresh scene (for tests and checks).

    The bundle is unpacked into a temporary folder that is removed once the data is in
    memory, so storage nodes of the returned scene point at files that no longer exist.

    Args:
        path: an ``.mrb`` file.

    Returns:
        ``(scene, logics)`` as from :func:`new_scene`.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"scene file {path}: not found, expected an existing .mrb file")
    scene, logics = new_scene()
    with tempfile.TemporaryDirectory(prefix="vqmedseg-mrb-") as unpack_dir:
        messages = slicer.vtkMRMLMessageCollection()
        mrml = slicer.vtkMRMLScene.UnpackSlicerDataBundle(str(path.absolute()), unpack_dir, messages)
        if not mrml or not Path(mrml).is_file():
            raise InputError(
                f"scene file {path}: found no .mrml scene inside "
                f"({messages.GetAllMessagesAsString().strip() or 'no details'}), expected a Slicer bundle"
            )
        scene.SetURL(mrml)
        if not scene.Import():
            raise InputError(f"scene file {path}: MRML could not import {Path(mrml).name}, expected a valid scene")
        scene.SetURL("")
    return scene, logics


def write_scene(
    path: str | os.PathLike,
    *,
    ct: Volume,
    label: Volume,
    segments: Sequence[Mapping[str, Any]],
    uncertainty: Volume | Mapping[str, Volume],
    mr: Volume | None = None,
    ct_name: str = "CT",
    mr_name: str = "MR",
    segmentation_name: str = "Prediction",
    uncertainty_name: str = "Uncertainty",
    ct_window: tuple[float, float] | None = None,
    colormap: str = "viridis",
    overlay_opacity: float = 0.4,
) -> Path:
    """Build and save the review scene: CT, optional MR, prediction and uncertainty maps.

    Args:
        path: destination ``.mrb``.
        ct: the CT volume; the prediction references its grid.
        label: predicted label array (see :func:`add_segmentation`).
        segments: segment descriptions for ``label``'s values.
        uncertainty: one map, or several keyed by node name (e.g. ``{"Entropy": ...}``).
        mr: optional MR volume, stored as is.
        ct_name, mr_name, segmentation_name, uncertainty_name: node names; the last is
            used when ``uncertainty`` is a single volume.
        ct_window: CT display range in HU, e.g. a task's ``ct_window``; ``None`` = automatic.
        colormap: matplotlib colormap for the uncertainty maps.
        overlay_opacity: opacity of the first uncertainty map over the CT in slice views.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    maps = {uncertainty_name: uncertainty} if isinstance(uncertainty, Volume) else dict(uncertainty)
    if not maps:
        raise InputError("uncertainty: found no maps, expected a Volume or a non-empty mapping of name to Volume")
    scene, logics = new_scene()
    try:
        ct_node = add_volume(scene, ct, ct_name, window=ct_window)
        if mr is not None:
            add_volume(scene, mr, mr_name)
        add_segmentation(scene, label, segments, reference_node=ct_node, name=segmentation_name)
        overlays = [add_uncertainty_overlay(scene, volume, name, colormap) for name, volume in maps.items()]
        show_in_slice_views(scene, ct_node, overlays[0], overlay_opacity)
        return write_mrb(scene, path)
    finally:
        scene.Clear(True)
        del logics  # released only once the scene is cleared
