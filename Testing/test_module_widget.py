"""The Slicer module's widget code, run on slicer-core's real MRML scene.

Real Slicer is not available to the test suite. Its Qt widgets, and the Slicer pieces
that slicer-core lacks (the scripted-module base classes, the parameter-node wrapper,
``slicer.app``, translation), are replaced here by small stand-ins, so that
``VQMedSeg.py``'s widget code itself runs against the library's real workflow: the
methods a button, a selector or a timer calls, with their real effects on the scene and
the workspace. What the stand-ins cannot show (the ``.ui`` file, the parameter node's
GUI connections) is checked statically in ``test_slicer_module.py``. The module's
self-test runs here too, but for its parameter-node round trip, which only Slicer runs.
"""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
import types
import unittest
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core (MRML without the Slicer app) is not installed: pip install slicer-core")

from VQMedSegLib.data.io import write_volume  # noqa: E402
from VQMedSegLib.data.phantoms import make_dataset  # noqa: E402
from VQMedSegLib.export import mrml  # noqa: E402

MODULE_FILE = Path(__file__).resolve().parents[1] / "VQMedSeg" / "VQMedSeg.py"


# ------------------------------------------------------------------ stand-ins for Qt
class Timer:
    """``qt.QTimer``: the test fires it by calling the slot while it is active.
    ``singleShot(0, slot)`` runs the slot when the event being handled is done:
    :func:`_events_done` does that."""

    posted: list = []  # slots of zero-delay single shots, waiting for the event loop

    def __init__(self):
        self.active, self.slots = False, []

    @staticmethod
    def singleShot(ms, slot):
        assert ms == 0, "only zero-delay single shots are emulated"
        Timer.posted.append(slot)

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self.slots.append(slot)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False


def _events_done():
    """The event loop's turn after an event: zero-delay single shots run."""
    while Timer.posted:
        Timer.posted.pop(0)()


def _call(slot, args):
    """Call ``slot`` with as many of the signal's arguments as it takes, as PythonQt does."""
    import inspect

    takes = [p for p in inspect.signature(slot).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[: len(takes)])


class Widget:
    """A Qt widget with the properties and methods the module's code uses; its signals
    reach the slots ``setup()`` connected when a test emits them."""

    def __init__(self):
        self.text, self.toolTip, self.enabled = "", "", True
        self.value, self.maximum, self.format, self.lines, self.items, self.cells = 0, 100, "", [], [], {}
        self.current, self.slots, self.blocked = -1, {}, False

    def connect(self, signal, slot):
        self.slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        assert signal in self.slots, f"nothing is connected to {signal}"
        self._emit(signal, *args)

    def _emit(self, signal, *args):
        """As Qt emits: to the connected slots, if any, unless signals are blocked."""
        if not self.blocked:
            for slot in self.slots.get(signal, []):
                _call(slot, args)

    def click(self):
        assert self.enabled, "the button is disabled"
        self.emit("clicked(bool)", False)

    def horizontalHeader(self):
        return types.SimpleNamespace(setStretchLastSection=lambda stretch: None)

    def setMRMLScene(self, scene):
        self.scene = scene

    def setValue(self, value):
        self.value = value

    def setMaximum(self, value):
        self.maximum = value

    def setFormat(self, text):
        self.format = text

    def appendPlainText(self, text):
        self.lines.append(text)

    def blockSignals(self, block):
        was, self.blocked = self.blocked, block
        return was

    def clear(self):
        self.items = []

    def addItem(self, text):
        self.items.append(text)

    def setCurrentIndex(self, index):
        self.current = index

    # QTableWidget, as Qt's own behaves (measured with PySide6's): a current row that is
    # removed hands over to the row above it, and each change of the current row is signalled
    def setRowCount(self, rows):
        self.cells = {k: v for k, v in self.cells.items() if k[0] < rows}
        if self.current >= rows:
            self.setCurrentCell(rows - 1, 0 if rows else -1)

    def setItem(self, row, column, item):
        self.cells[row, column] = item

    def setCurrentCell(self, row, column):
        if row != self.current:
            previous, self.current = self.current, row
            self._emit("currentCellChanged(int,int,int,int)", row, column, previous, 0 if previous >= 0 else -1)

    def pressRow(self, row):
        """A mouse click on a row, as Qt signals it: the row becomes current (if it was
        not), the press, the event loop's turn, then the click. A slot's exception does not
        stop the signals that follow (PythonQt prints it); the first is raised at the end."""
        raised = []

        def signal(name, *args):
            try:
                self._emit(name, *args)
            except Exception as exc:
                raised.append(exc)

        if row != self.current:
            previous, self.current = self.current, row
            signal("currentCellChanged(int,int,int,int)", row, 0, previous, 0 if previous >= 0 else -1)
        signal("cellPressed(int,int)", row, 0)
        _events_done()
        signal("cellClicked(int,int)", row, 0)
        if raised:
            raise raised[0]

    def arrowToRow(self, row):
        """The arrow keys moving the current row."""
        previous, self.current = self.current, row
        self._emit("currentCellChanged(int,int,int,int)", row, 0, previous, 0)
        _events_done()

    def arrowAlongRow(self, column):
        """The left/right arrow (or Home/End) keys moving the current cell within its row:
        Qt signals a new current cell whose row is the previous one."""
        self._emit("currentCellChanged(int,int,int,int)", self.current, column, self.current, 0)
        _events_done()


class UI:
    def __getattr__(self, name):  # every widget of the .ui (their names are checked statically)
        widget = Widget()
        setattr(self, name, widget)
        return widget


# --------------------------------------------------------- stand-ins for Slicer's app
class ParameterNode:
    """What ``@parameterNodeWrapper`` makes of the module's parameter class: attributes
    with the class's defaults, kept by the Logic's one node (in Python here, not MRML),
    observed as the wrapper's MRML node is."""

    def __init__(self):
        import vtk

        self._observed = vtk.vtkObject()

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if not name.startswith("_") and name != "parameterNode":
            self._modified()

    def _modified(self):
        if self.__dict__.get("_modifying"):
            self.__dict__["_pending"] = True
        else:
            self._observed.Modified()  # as the MRML node does: the widget's observer updates the buttons

    def StartModify(self):  # as vtkMRMLNode's: one Modified event at the end
        was = self.__dict__.get("_modifying", False)
        self.__dict__["_modifying"] = True
        return was

    def EndModify(self, was):
        self.__dict__["_modifying"] = was
        if not was and self.__dict__.pop("_pending", False):
            self._observed.Modified()

    def AddObserver(self, *args):
        return self._observed.AddObserver(*args)

    def RemoveObserver(self, tag):
        self._observed.RemoveObserver(tag)

    def connectGui(self, ui):
        """As the wrapper's GUI connector of each node selector the ``.ui`` binds to a
        parameter: its slot stores the new node, connected when the widget connects the
        parameter node, after ``setup()``'s own slots; Qt calls slots in the order they were
        connected. (The other widgets' connectors are not emulated: tests set those
        parameters directly.)"""
        connected = []
        for name, parameter in _node_selectors_of_the_ui():
            def store(node, parameter=parameter):
                setattr(self, parameter, node)

            getattr(ui, name).connect("currentNodeChanged(vtkMRMLNode*)", store)
            connected.append((getattr(ui, name), store))
        return connected

    def disconnectGui(self, tag):
        for widget, slot in tag or []:
            widget.slots["currentNodeChanged(vtkMRMLNode*)"].remove(slot)


def _node_selectors_of_the_ui() -> list[tuple[str, str]]:
    """(widget name, parameter) of each qMRMLNodeComboBox with a SlicerParameterName in the .ui."""
    import xml.etree.ElementTree as ET

    found = []
    for widget in ET.parse(MODULE_FILE.parent / "Resources" / "UI" / "VQMedSeg.ui").iter("widget"):
        parameter = [prop.findtext("string") for prop in widget.findall("property") if prop.get("name") == "SlicerParameterName"]
        if widget.get("class") == "qMRMLNodeComboBox" and parameter:
            found.append((widget.get("name"), parameter[0]))
    assert found, "no node selector of the .ui is bound to a parameter"
    return found


def _parameter_node_wrapper(cls):
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    def wrap(node):
        for name, value in defaults.items():
            node.__dict__.setdefault(name, value)
        node.__dict__["parameterNode"] = node
        return node

    return wrap


class SelfTestBase(unittest.TestCase):
    """``ScriptedLoadableModuleTest``: a unittest case that shows messages as it goes."""

    def delayDisplay(self, message, requestedDelay=None):
        self.shown = getattr(self, "shown", []) + [message]


class LogicBase:
    """``ScriptedLoadableModuleLogic``: one parameter node per Logic."""

    def __init__(self):
        self._node = ParameterNode()

    def getParameterNode(self):
        return self._node


@pytest.fixture
def module(monkeypatch, tmp_path):
    """``VQMedSeg.py`` imported with slicer-core's scene as ``slicer.mrmlScene``."""
    scene, logics = mrml.new_scene()
    said = {"errors": [], "warnings": []}
    app = types.SimpleNamespace(temporaryPath=str(tmp_path), defaultScenePath=str(tmp_path), processEvents=lambda: None,
                                testingEnabled=lambda: False, setOverrideCursor=lambda cursor: None,
                                restoreOverrideCursor=lambda: None)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", app, raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: said["errors"].append(text))
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **kw: said["warnings"].append(text))
    monkeypatch.setattr(slicer.util, "confirmYesNoDisplay", lambda text, **kw: said.setdefault("asked", []).append(text) or True)

    class WidgetBase:  # ScriptedLoadableModuleWidget: a layout to add the .ui's widget to, and the resources' path
        def __init__(self, parent=None):
            self.parent, self.layout = parent, types.SimpleNamespace(addWidget=lambda widget: None)

        def resourcePath(self, name):
            return str(MODULE_FILE.parent / "Resources" / name)

        def setup(self):
            pass

    loaded = []
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: loaded.append(Path(path)) or Widget())
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda ui: UI())
    fakes = {
        "qt": types.SimpleNamespace(QTimer=Timer, QTableWidgetItem=lambda text: text, Qt=types.SimpleNamespace(WaitCursor=0)),
        "slicer.i18n": types.SimpleNamespace(tr=lambda text: text, translate=lambda context, text: text),
        "slicer.ScriptedLoadableModule": types.SimpleNamespace(
            ScriptedLoadableModule=object, ScriptedLoadableModuleWidget=WidgetBase, ScriptedLoadableModuleLogic=LogicBase,
            ScriptedLoadableModuleTest=SelfTestBase,
            __all__=["ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                     "ScriptedLoadableModuleTest"]),
        "slicer.parameterNodeWrapper": types.SimpleNamespace(
            parameterNodeWrapper=_parameter_node_wrapper, Choice=lambda values: values, WithinRange=lambda low, high: (low, high)),
    }
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, name, fake)
    spec = importlib.util.spec_from_file_location("VQMedSegModuleUnderTest", MODULE_FILE)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    Timer.posted.clear()
    under_test = types.SimpleNamespace(code=code, scene=scene, said=said, loaded=loaded, widgets=[])
    yield under_test  # conftest kills the jobs a failed test left running
    for widget in under_test.widgets:  # as Slicer does when it closes: the widget stops observing the scene
        widget.cleanup()
    under_test.widgets.clear()
    Timer.posted.clear()
    gc.collect()  # widgets (their timers hold their slots) go now, not in a later test's garbage collection
    del logics


def _widget(module):
    """The widget after its own ``setup()``, on stand-in Qt widgets and timers."""
    widget = module.code.VQMedSegWidget(parent=types.SimpleNamespace(isEntered=True))
    widget.setup()
    assert module.loaded[-1].is_file(), module.loaded[-1]  # the .ui file it loads
    module.widgets.append(widget)
    return widget


def _prepare(widget):
    """Press *Prepare workspace* and let the timer finish it; returns the case id."""
    widget.ui.applyButton.click()
    _fire_until_stopped(widget._prepareTimer)
    return widget.logic.caseId


def _with_recorded_prediction(module, widget, tmp_path, load=True):
    """A prepared workspace whose one case has a finished prediction (the phantom's liver),
    loaded into the scene with *Load last prediction* (unless not ``load``); returns the
    phantom and its CT node."""
    phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
    p = widget._parameterNode
    p.ctVolume, p.workspace, p.device = mrml.add_volume(module.scene, phantom.ct, "CT"), tmp_path / "ws", "cpu"
    widget.logic.libraryAvailable = lambda: True  # the library is importable here; Slicer adds it to the path
    case = _prepare(widget)
    ws = widget.logic.workflow.workspace
    liver = phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8))
    write_volume(liver, ws.prediction_dir(case) / "prediction.nrrd")
    write_volume(liver.with_array(liver.array * 0.5), ws.prediction_dir(case) / "uncertainty.nrrd")
    ws.update(lambda st: st.setdefault("predictions", {}).update({case: {"method": "supervised", "files": {
        "segmentation": f"predictions/{case}/prediction.nrrd", "uncertainty": f"predictions/{case}/uncertainty.nrrd"}}}))
    if load:
        widget.ui.loadResultsButton.click()
        _fire_until_stopped(widget._loadTimer)
    return phantom, p.ctVolume


def _reference(module, phantom, ct_node, name="reference", shift=0):
    liver = (phantom.ct_label.array == 1).astype(np.uint8)
    return mrml.add_segmentation(module.scene, phantom.ct_label.with_array(np.roll(liver, shift, axis=2)),
                                 [{"value": 1, "name": "Liver", "color": (1, 0, 0)}], reference_node=ct_node, name=name)


def _fire_until_stopped(timer, timeout=60.0):
    deadline = time.monotonic() + timeout
    while timer.active and time.monotonic() < deadline:
        for slot in timer.slots or [None]:
            slot and slot()
        time.sleep(0.01)
    assert not timer.active, f"the timer still runs after {timeout} s"


def _wait_until_the_job_holds_the_workspace(widget, timeout=120.0):
    """Past the job's start-up: its process holds the workspace's job lock."""
    from VQMedSegLib.jobs.runner import running_job

    deadline = time.monotonic() + timeout
    while running_job(widget.logic.workflow.workspace) is None and time.monotonic() < deadline:
        widget.logic.poll()
        time.sleep(0.1)
    assert running_job(widget.logic.workflow.workspace) is not None, "the job never took the workspace"


def test_choosing_a_reference_scores_it_in_the_background_and_shows_the_scores_when_ready(module, tmp_path):
    widget = _widget(module)
    phantom, ct_node = _with_recorded_prediction(module, widget, tmp_path)
    assert widget.ui.uncertaintyComboBox.items == ["entropy"]  # the file of the workspace's "uncertainty" entry

    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", _reference(module, phantom, ct_node, "truth"))
    assert widget.ui.scoresLabel.text == "Scoring against truth..." and widget._scoreTimer.active
    _fire_until_stopped(widget._scoreTimer)
    assert widget.ui.scoresLabel.text.startswith("Dice 1.000, HD95 0.0 mm"), widget.ui.scoresLabel.text

    # another reference, then none before the first answer is shown: no stale scores appear
    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", _reference(module, phantom, ct_node, "shifted", shift=3))
    assert widget.ui.scoresLabel.text == "Scoring against shifted..."
    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", None)
    assert widget.ui.scoresLabel.text == ""
    _fire_until_stopped(widget._scoreTimer)
    assert widget.ui.scoresLabel.text == "" and module.said["errors"] == []

    # a shifted reference scores below 1, shown once ready
    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", _reference(module, phantom, ct_node, "shifted again", shift=3))
    _fire_until_stopped(widget._scoreTimer)
    dice = float(widget.ui.scoresLabel.text.split()[1].rstrip(","))
    assert 0.3 < dice < 1.0, widget.ui.scoresLabel.text

    # the panel's request replaced from elsewhere (the console calling the Logic's start_scoring) while it waits
    # in line: no "Scoring against ..." is left on show
    import threading

    busy = threading.Event()
    widget.logic.workflow._worker().submit(busy.wait, 60)
    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", _reference(module, phantom, ct_node, "waiting"))
    console = widget.logic.workflow.start_scoring(widget.logic.caseId, _reference(module, phantom, ct_node, "console"))
    busy.set()
    console.result(timeout=60)
    _fire_until_stopped(widget._scoreTimer)
    assert widget.ui.scoresLabel.text == "" and module.said["errors"] == []

    # the scene closed while scores are on their way: they are not shown beside an empty scene
    widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", _reference(module, phantom, ct_node, "last"))
    module.scene.Clear(0)  # its start and end events reach the widget's observers
    _fire_until_stopped(widget._scoreTimer)
    assert widget.ui.scoresLabel.text == "" and widget.logic.loadedResults() is None and module.said["errors"] == []


def test_a_reference_that_cannot_be_scored_says_why_and_shows_no_scores(module, tmp_path):
    widget = _widget(module)
    phantom, ct_node = _with_recorded_prediction(module, widget, tmp_path)
    organs = _reference(module, phantom, ct_node, "organs")
    organs.GetSegmentation().GetNthSegment(0).SetName("kidney")
    organs.GetSegmentation().AddEmptySegment("", "spleen")
    with pytest.raises(Exception, match="none is named 'Liver'"):
        widget.ui.referenceSelector.emit("currentNodeChanged(vtkMRMLNode*)", organs)  # Slicer's tryWithErrorDisplay shows it, then re-raises
    assert module.said["errors"] and "none is named 'Liver'" in module.said["errors"][0]
    assert widget.ui.scoresLabel.text == "" and not widget._scoreTimer.active


def test_the_panels_buttons_take_a_case_from_prepare_to_suggestions_marked_slices_training_and_results(module, tmp_path):
    """The clinician's and the researcher's loop through the widget's own slots: each
    button's slot, the timer that follows the jobs, and the state the panel shows."""
    widget = _widget(module)
    phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
    p = widget._parameterNode
    p.ctVolume, p.workspace, p.device, p.preset = mrml.add_volume(module.scene, phantom.ct, "CT"), tmp_path / "ws", "cpu", "tiny"
    p.strategy, p.perRound, p.method, p.iterations = "random", 4, "supervised", 20
    widget._checkCanApply()
    assert widget.ui.applyButton.enabled and not widget.ui.suggestButton.enabled and not widget.ui.predictButton.enabled

    _prepare(widget)
    assert widget.ui.statusLabel.text.startswith("liver: 1 case(s), 0 of 16 slices labelled"), widget.ui.statusLabel.text
    assert widget.ui.suggestButton.enabled and not widget.ui.markAnnotatedButton.enabled
    assert widget.ui.predictButton.toolTip == "No trained model yet: train one first."

    widget.ui.suggestButton.click()
    assert widget._timer.active and not widget.ui.suggestButton.enabled and not widget.ui.applyButton.enabled
    _fire_until_stopped(widget._timer, timeout=300)
    assert len(widget._suggestions) == 4 and len({row for row, _ in widget.ui.suggestionsTable.cells}) == 4
    assert widget.ui.suggestionsTable.current == -1  # no row selected: Mark needs a slice shown first
    assert not widget.ui.markAnnotatedButton.enabled

    # a click shows the slice in the Segment Editor on the annotation; the user draws; Mark stores that slice
    first = widget._suggestions[0]
    widget.ui.suggestionsTable.pressRow(0)
    assert widget.ui.markAnnotatedButton.enabled
    editor = module.scene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
    annotation = editor.GetSegmentationNode()
    assert annotation.GetAttribute("VQMedSeg.Role") == "annotation"
    liver = (phantom.ct_label.array == 1).astype(np.uint8)
    drawn = mrml.add_segmentation(module.scene, phantom.ct_label.with_array(liver), [{"value": 1, "name": "Liver", "color": (1, 0, 0)}],
                                  reference_node=p.ctVolume, name="drawn")
    annotation.GetSegmentation().DeepCopy(drawn.GetSegmentation())
    widget.ui.markAnnotatedButton.click()
    assert f"Slice {first['slice']} of {first['case']} stored as annotated (1 labelled in this case)." in widget.ui.logTextEdit.lines
    assert widget.ui.statusLabel.text.startswith("liver: 1 case(s), 1 of 16 slices labelled")
    assert first not in widget._suggestions and len(widget._suggestions) == 3 and not widget.ui.markAnnotatedButton.enabled
    for row in range(3):
        widget.ui.suggestionsTable.pressRow(0)
        widget.ui.markAnnotatedButton.click()
    assert widget.ui.statusLabel.text.startswith("liver: 1 case(s), 4 of 16 slices labelled")

    # training, then the queued prediction, followed by the timer; the result arrives in the panel
    widget.ui.startCancelButton.click()
    assert widget.ui.startCancelButton.text == "Cancel" and not widget.ui.loadResultsButton.enabled
    _fire_until_stopped(widget._timer, timeout=600)
    assert module.said["warnings"] == [] and module.said["errors"] == []
    assert widget.ui.startCancelButton.text == "Start training" and widget.ui.progressBar.value == 100
    assert "last model: " in widget.ui.statusLabel.text and "(supervised)" in widget.ui.statusLabel.text
    assert widget.ui.predictButton.enabled and widget.ui.uncertaintyComboBox.items == ["entropy"]
    segmentation = widget.logic.loadedResults()["segmentation"]
    assert segmentation.GetScene() is module.scene and segmentation.GetSegmentation().GetNthSegment(0).GetName() == "Liver"

    # *Segment with the last model*, keeping every piece this time: a new result replaces the one on show
    p.keepAllComponents = True
    widget.ui.predictButton.click()
    assert widget.ui.logTextEdit.lines[-1] == "Segmenting CT with the last model" and not widget.ui.predictButton.enabled
    _fire_until_stopped(widget._timer, timeout=300)
    again = widget.logic.loadedResults()["segmentation"]
    assert again is not segmentation and again.GetScene() is module.scene and segmentation.GetScene() is None
    assert module.said["warnings"] == [] and widget.ui.predictButton.enabled


def test_a_suggestion_is_shown_once_per_click_or_arrow_key_and_a_refreshed_table_shows_none(module, tmp_path):
    """Qt signals a click on a new row twice (the row becomes current, then the click); a
    slice is shown once per action, and not again when the current cell moves along its row.
    After *Mark*, the refreshed table shows no slice by
    itself: a second press of *Mark* then has nothing to store."""
    from conftest import run_main

    widget = _widget(module)
    phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
    p = widget._parameterNode
    p.ctVolume, p.workspace, p.device, p.preset = mrml.add_volume(module.scene, phantom.ct, "CT"), tmp_path / "ws", "cpu", "tiny"
    _prepare(widget)
    run_main("query", "--workspace", p.workspace, "--strategy", "random", "--n", "4", "--preset", "tiny", "--device", "cpu")
    widget._refreshState()  # as when the query's job ends
    rows = [(s["case"], s["slice"]) for s in widget._suggestions]
    assert len(rows) == 4
    shown = []
    jump = widget.logic.jumpToSuggestion
    widget.logic.jumpToSuggestion = lambda case, index: shown.append((case, index)) or jump(case, index)
    table = widget.ui.suggestionsTable

    table.pressRow(0)
    assert shown == [rows[0]]  # once, not once for the new current row and again for the click
    table.pressRow(0)  # the same row again: the user may have moved the views since
    assert shown == [rows[0]] * 2
    table.arrowToRow(1)
    assert shown[2:] == [rows[1]]
    table.pressRow(1)  # a press on the row the arrow keys made current shows it again
    assert shown[2:] == [rows[1]] * 2
    table.arrowAlongRow(2)  # left/right within the row: the same suggestion, not shown again
    assert shown[2:] == [rows[1]] * 2
    table.pressRow(3)
    assert shown[4:] == [rows[3]] and widget.logic.shownSlice() == rows[3]

    # marking the last row: the table shrinks, and Qt would hand the current row to the one above
    widget.ui.markAnnotatedButton.click()
    assert shown[4:] == [rows[3]], "the refreshed table showed a slice nobody chose"
    assert widget.logic.shownSlice() is None and not widget.ui.markAnnotatedButton.enabled
    assert [(s["case"], s["slice"]) for s in widget._suggestions] == rows[:3]
    labelled = widget.logic.workflow.workspace.labelled_slices()
    assert {c: list(v) for c, v in labelled.items()} == {rows[3][0]: [rows[3][1]]}


def test_load_last_prediction_reads_its_files_in_the_background_and_a_closed_scene_gets_nothing(module, tmp_path,
                                                                                                  monkeypatch):
    """*Load last prediction* held the GUI thread 0.68 s at 512 x 512 x 150, 0.58 s of it
    reading the files: they are read on the worker, and a timer makes the nodes. The button
    waits meanwhile; a scene closed before the files are read gets nothing."""
    import threading

    from VQMedSegLib.data import io

    widget = _widget(module)
    _with_recorded_prediction(module, widget, tmp_path, load=False)
    release, readers, real = threading.Event(), [], io.read_volume

    def held(*args, **kwargs):
        readers.append(threading.current_thread())
        if threading.current_thread() is not threading.main_thread():
            release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(io, "read_volume", held)
    button = widget.ui.loadResultsButton
    button.click()
    assert widget._loadTimer.active and not button.enabled and widget.logic.loadedResults() is None
    assert not widget.ui.applyButton.enabled  # no other workspace or case before this one's result is in
    deadline = time.monotonic() + 30
    while not readers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert readers and threading.main_thread() not in readers
    release.set()
    _fire_until_stopped(widget._loadTimer)
    loaded = widget.logic.loadedResults()
    assert loaded["segmentation"].GetScene() is module.scene and widget.ui.uncertaintyComboBox.items == ["entropy"]
    assert button.enabled and widget.ui.applyButton.enabled and module.said["errors"] == []

    # again, with the scene closed while the files are read
    release.clear()
    button.click()
    module.scene.Clear(0)
    release.set()
    _fire_until_stopped(widget._loadTimer)
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert module.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0 and module.said["errors"] == []


def test_a_slice_that_cannot_be_shown_is_reported_once_per_click(module, monkeypatch):
    """An error box runs the event loop while it is open: the press that follows the row's
    change must still count as shown, not show (and fail) a second time."""
    widget = _widget(module)
    widget._suggestions = [{"case": "c", "slice": 3, "score": 0.5, "purpose": "both"},
                           {"case": "c", "slice": 4, "score": 0.4, "purpose": "both"}]

    def fail(case, index):
        raise RuntimeError(f"cannot show slice {index}")

    widget.logic.jumpToSuggestion = fail
    shown_errors = module.said["errors"]
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: (shown_errors.append(text), _events_done()))  # modal
    table = widget.ui.suggestionsTable
    for row in (1, 0):
        try:
            table.pressRow(row)
        except RuntimeError:
            pass  # tryWithErrorDisplay re-raises; PythonQt prints it and delivers the next signal
    assert len(shown_errors) == 2 and "slice 4" in shown_errors[0] and "slice 3" in shown_errors[1], shown_errors


def test_a_prediction_job_whose_result_cannot_be_loaded_says_so_and_ends(module, tmp_path):
    """After a prediction job, a result that cannot be read is shown as an error and the job
    ends (the progress no longer says the result is loading); Cancel is not offered while
    the result loads, since the job itself has ended."""
    from concurrent.futures import Future

    from VQMedSegLib.workflow.logic import JobState

    widget = _widget(module)
    _with_recorded_prediction(module, widget, tmp_path, load=False)
    flow, case = widget.logic.workflow, widget.logic.caseId
    (flow.workspace.prediction_dir(case) / "prediction.nrrd").write_bytes(b"NRRD0004\nnot an image\n")
    pending = Future()
    flow.job = JobState(kind="predict", job_id="finished-predict", status="done", message="loading the result",
                        loading={case: pending})
    widget._timer.start()
    widget.onPollTimer()
    assert widget._timer.active and "loading the result" in widget.ui.progressBar.format
    assert widget.ui.startCancelButton.text == "Cancel" and not widget.ui.startCancelButton.enabled
    pending.set_result(None)  # replaced by the real read of the broken file
    flow.job.loading = {case: flow.start_loading(case)}
    _fire_until_stopped(widget._timer)
    assert len(module.said["errors"]) == 1 and module.said["errors"][0].startswith(f"The prediction of {case} could not be loaded")
    assert widget.ui.progressBar.format.startswith("predict: done") and widget.ui.startCancelButton.enabled
    assert widget.logic.loadedResults() is None and widget.ui.startCancelButton.text == "Start training"


def _endless_training(module, widget, tmp_path):
    """Prepared, three slices marked, and a training that would run for hours started
    with the panel's button and past its start-up."""
    phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
    p = widget._parameterNode
    p.ctVolume, p.workspace, p.device, p.preset = mrml.add_volume(module.scene, phantom.ct, "CT"), tmp_path / "ws", "cpu", "tiny"
    p.method, p.iterations = "supervised", 100000
    _prepare(widget)
    widget.logic.markAnnotated(widget.logic.caseId, [4, 8, 12], _reference(module, phantom, p.ctVolume, "truth"))
    widget.ui.startCancelButton.click()
    _wait_until_the_job_holds_the_workspace(widget)


def test_cancel_on_the_panel_stops_the_training_after_asking_and_the_panel_says_so(module, tmp_path):
    widget = _widget(module)
    _endless_training(module, widget, tmp_path)
    widget.ui.startCancelButton.click()  # the same button, now Cancel
    assert module.said["asked"] == ["Stop the running job? Training can resume from its last checkpoint."]
    assert "Cancel requested." in widget.ui.logTextEdit.lines
    _fire_until_stopped(widget._timer, timeout=120)
    assert any(line.startswith("The train job was cancelled") for line in widget.ui.logTextEdit.lines), widget.ui.logTextEdit.lines[-5:]
    assert module.said["warnings"] == [] and widget.ui.startCancelButton.text == "Start training"
    assert widget.logic.loadedResults() is None and not widget.ui.predictButton.enabled


def test_after_a_module_reload_prepare_follows_the_running_job_and_its_cancel_stops_it(module, tmp_path):
    """Reload (or Slicer restarted) while training runs: the new widget has no process
    handle. Prepare finds the job through the workspace and follows it; Cancel stops it."""
    first = _widget(module)
    _endless_training(module, first, tmp_path)
    p = first._parameterNode

    again = _widget(module)  # the reloaded module: another widget and Logic, the same scene
    for name in ("ctVolume", "workspace", "device", "preset"):
        setattr(again._parameterNode, name, getattr(p, name))
    _prepare(again)
    assert "A job is already running on this workspace; following it." in again.ui.logTextEdit.lines
    assert again._timer.active and again.ui.startCancelButton.text == "Cancel" and not again.ui.applyButton.enabled
    again.onPollTimer()
    assert again.ui.progressBar.format.startswith("train:"), again.ui.progressBar.format
    again.ui.startCancelButton.click()
    assert "Cancel requested." in again.ui.logTextEdit.lines
    _fire_until_stopped(again._timer, timeout=120)
    assert any(line.startswith("The train job was cancelled") for line in again.ui.logTextEdit.lines), again.ui.logTextEdit.lines[-5:]
    assert again.ui.startCancelButton.text == "Start training" and again.ui.applyButton.enabled
    first.logic.workflow.job.proc.wait(timeout=30)  # the first Logic's child has exited too


def test_prepare_copies_the_volumes_in_the_background_and_a_failed_copy_keeps_the_panel_on_its_case(module, tmp_path,
                                                                                                   monkeypatch):
    import threading

    from VQMedSegLib.jobs.workspace import Workspace

    widget = _widget(module)
    phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
    p = widget._parameterNode
    p.ctVolume, p.mrVolume = mrml.add_volume(module.scene, phantom.ct, "CT"), mrml.add_volume(module.scene, phantom.mr, "MR")
    p.workspace, p.device, p.preset = tmp_path / "ws", "cpu", "tiny"
    release, real = threading.Event(), Workspace.add_case
    monkeypatch.setattr(Workspace, "add_case", lambda self, *a, **kw: release.wait(60) and real(self, *a, **kw))
    widget.ui.applyButton.click()
    assert widget.ui.statusLabel.text == "Copying the volumes into the workspace..." and widget._prepareTimer.active
    assert not widget.ui.applyButton.enabled and widget.ui.applyButton.toolTip == "The volumes are being copied into the workspace."
    assert not (widget.ui.suggestButton.enabled or widget.ui.startCancelButton.enabled or widget.ui.loadResultsButton.enabled)
    widget.onPrepareTimer()
    assert widget._prepareTimer.active  # still copying
    p.workspace = tmp_path / "typed meanwhile"  # the log names the folder the case went into
    release.set()
    _fire_until_stopped(widget._prepareTimer)
    assert widget.logic.caseId == "CT" and widget.ui.logTextEdit.lines[-1] == f"Workspace ready: {tmp_path / 'ws'} (case CT)"
    p.workspace = tmp_path / "ws"
    assert widget.ui.statusLabel.text.startswith("liver: 1 case(s), 0 of 16 slices labelled")
    assert widget.ui.applyButton.enabled and widget.ui.suggestButton.enabled

    # another CT under the same name in a workspace that holds one: refused when the copy ends; the panel keeps its case
    WorkflowLogicForOther = type(widget.logic.workflow)
    WorkflowLogicForOther(module.scene).prepare(mrml.add_volume(module.scene, phantom.ct.with_array(phantom.ct.array + 1), "CT"),
                                                None, folder=tmp_path / "other")
    p.mrVolume, p.workspace = None, tmp_path / "other"
    widget.ui.applyButton.click()
    _fire_until_stopped(widget._prepareTimer)
    assert len(module.said["errors"]) == 1 and "voxel values differ" in module.said["errors"][0]
    assert widget.logic.caseId == "CT" and widget.logic.workflow.workspace.root == tmp_path / "ws"
    assert widget.ui.statusLabel.text.startswith("liver: 1 case(s), 0 of 16 slices labelled") and widget.ui.suggestButton.enabled

    # the scene closed during a copy, the user in another module (the parameter node is gone until they come back)
    widget.parent.isEntered = False
    p.ctVolume, p.workspace = mrml.add_volume(module.scene, phantom.ct, "CT second"), tmp_path / "ws"
    release.clear()
    widget.ui.applyButton.click()
    module.scene.Clear(0)
    assert widget._parameterNode is None
    release.set()
    _fire_until_stopped(widget._prepareTimer)
    assert widget.logic.caseId == "CT_second" and widget.ui.logTextEdit.lines[-1] == f"Workspace ready: {tmp_path / 'ws'} (case CT_second)"
    assert widget.ui.statusLabel.text.startswith("liver: 2 case(s)") and len(module.said["errors"]) == 1


def test_the_modules_self_test_passes_on_slicer_cores_scene(module):
    """The self-test Slicer runs (Developer Tools > Reload and Test), here on slicer-core's
    scene: its query, training and prediction jobs through the Logic, the result loaded and
    scored, the overlay shown. Its parameter-node round trip needs Slicer's own
    ``parameterNodeWrapper`` (stored as MRML parameters, validated) and runs only in Slicer."""
    test = module.code.VQMedSegTest()
    for name in ("test_CannotApplyReason", "test_LibraryAvailable", "test_QueryTrainPredict"):
        test.setUp()
        getattr(test, name)()
    assert test.shown[-1].startswith("Test passed: Dice"), test.shown
    assert set(dir(test)) >= {"test_ParameterNodeRoundTrip", "runTest"}
