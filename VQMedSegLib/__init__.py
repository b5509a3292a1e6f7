"""VQMedSeg library: label-efficient CT/MR segmentation (VQ-BEGAL, VQ-Seg).

Pure Python on torch, MONAI, SimpleITK and numpy; it never imports Slicer or Qt.
"""

__version__ = "0.1.0"
