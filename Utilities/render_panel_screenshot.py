"""Render the module's panel layout from its Qt Designer file, for the extension catalogue.

Usage (a developer tool, not part of the extension; needs PySide6)::

    pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen python Utilities/render_panel_screenshot.py Resources/Screenshots/VQMedSeg-1.png

Slicer's own widgets (CTK, qMRML) are not available outside Slicer, so each is drawn as
the closest Qt widget: node selectors as combo boxes filled with example node names,
collapsible sections as group boxes, path fields as line edits, the slider as a slider.
The layout, the labels, the tooltips' widgets and their order are those of the .ui file.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

UI = Path(__file__).resolve().parents[1] / "VQMedSeg" / "Resources" / "UI" / "VQMedSeg.ui"
STAND_INS = {
    "qMRMLWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QSlider",
}
DROP = {"SlicerParameterName", "nodeTypes", "showChildNodeTypes", "noneEnabled", "addEnabled", "removeEnabled",
        "noneDisplay", "filters", "options", "collapsed", "singleStep", "minimum", "maximum", "value"}
EXAMPLE = {
    "ctSelector": ["Phantom CT"], "mrSelector": ["Phantom MR"], "referenceSelector": ["None"],
    "targetComboBox": ["liver", "lung-tumour"], "deviceComboBox": ["auto", "cpu", "cuda"],
    "presetComboBox": ["quick", "tiny", "cpu", "paper"], "strategyComboBox": ["begal", "random", "entropy", "mcdropout", "coreset", "egal"],
    "methodComboBox": ["begal", "vqseg", "supervised"], "uncertaintyComboBox": ["entropy", "qpm"],
}
TEXT = {"workspacePathLineEdit": "~/VQMedSeg/phantom-liver", "pythonPathLineEdit": ""}


def plain_ui() -> bytes:
    root = ET.parse(UI).getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        widget.set("class", STAND_INS.get(cls, cls))
        if cls == "ctkCollapsibleButton":
            for prop in widget.findall("property"):
                if prop.get("name") == "text":
                    prop.set("name", "title")
        for prop in list(widget.findall("property")):
            if prop.get("name") in DROP:
                widget.remove(prop)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    return ET.tostring(root)


def main(out: str) -> None:
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, Qt
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (QApplication, QComboBox, QLabel, QLineEdit, QPlainTextEdit, QProgressBar, QSlider, QSpinBox,
                                   QTableWidget, QTableWidgetItem)

    app = QApplication.instance() or QApplication(sys.argv)
    data = QByteArray(plain_ui())
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()  # must outlive load()
    panel = loader.load(buffer)
    if panel is None:
        raise SystemExit(f"{UI}: Qt could not load it: {loader.errorString()}")
    for name, items in EXAMPLE.items():
        panel.findChild(QComboBox, name).addItems(items)
    for name, text in TEXT.items():
        panel.findChild(QLineEdit, name).setText(text)
    slider = panel.findChild(QSlider, "opacitySlider")
    slider.setOrientation(Qt.Horizontal)
    slider.setValue(40)
    table = panel.findChild(QTableWidget, "suggestionsTable")
    rows = [("phantom-liver-000", 14, 0.912, "high"), ("phantom-liver-000", 31, 0.874, "high"), ("phantom-liver-000", 22, 0.105, "low")]
    table.setRowCount(len(rows))
    for r, row in enumerate(rows):
        for c, value in enumerate(row):
            table.setItem(r, c, QTableWidgetItem(f"{value:.3f}" if isinstance(value, float) else str(value)))
    table.resizeColumnsToContents()
    table.horizontalHeader().setStretchLastSection(True)
    table.setMaximumHeight(130)
    budget = panel.findChild(QProgressBar, "budgetProgressBar")
    budget.setMaximum(40)
    budget.setValue(10)
    panel.findChild(QProgressBar, "progressBar").setValue(35)
    for name, value in (("budgetSpinBox", 40), ("perRoundSpinBox", 10), ("iterationsSpinBox", 0)):
        spin = panel.findChild(QSpinBox, name)
        spin.setMaximum(1000000)
        spin.setValue(value)
    panel.findChild(QSpinBox, "iterationsSpinBox").setSpecialValueText("preset")
    panel.findChild(QLabel, "statusLabel").setText("liver: 1 case(s), 10 of 40 slices labelled, 1 round(s) done; last model: begal-r1")
    log = panel.findChild(QPlainTextEdit, "logTextEdit")
    log.setPlainText("Training (VQ-BEGAL round), then segmenting\niteration 50: loss 0.4113\nvalidation: dice 0.8124")
    log.setMaximumHeight(90)
    panel.resize(460, panel.sizeHint().height() + 40)
    panel.grab().save(out)
    print(f"{out}: {panel.width()} x {panel.height()}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "VQMedSeg-1.png")
