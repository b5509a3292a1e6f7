"""Outputs for people: Slicer scenes (:mod:`.mrml`, needs slicer-core), PNG overviews (:mod:`.overview`) and
the figures of result files (:mod:`.figures`).

Nothing is imported here, so importing the package never loads Slicer's MRML.
"""
