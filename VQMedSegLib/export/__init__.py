"""Outputs for people: Slicer scenes (:mod:`.mrml`, needs slicer-core) and PNG overviews (:mod:`.overview`).

Nothing is imported here, so importing the package never loads Slicer's MRML.
"""
