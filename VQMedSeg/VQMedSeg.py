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
)

from slicer import vtkMRMLScalarVolumeNode


HOMEPAGE_URL = "https://github.com/vqmedseg/SlicerVQMedSeg"
README_URL = f"{HOMEPAGE_URL}#readme"
LIBRARY_PACKAGE = "VQMedSegLib"


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
You annotate a few slices that the module picks; it trains on them and segments the rest.
<ol>
<li>Load a CT (and, if you have one, an MR of the same patient) and select them under <b>Inputs</b>.</li>
<li>Choose the target (liver or lung tumour) and a workspace folder for the training data and models.</li>
<li>Ask for slice suggestions: the module ranks unlabelled slices by uncertainty.</li>
<li>Annotate the suggested slices in the Segment Editor.</li>
<li>Mark those slices as annotated.</li>
<li>Train. Training runs in a separate process; the log and progress appear here.</li>
<li>Review the prediction and its uncertainty map; annotate more where the model is unsure and repeat.</li>
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
    """

    ctVolume: vtkMRMLScalarVolumeNode
    mrVolume: vtkMRMLScalarVolumeNode
    target: Annotated[str, Choice(["liver", "lung-tumour"])] = "liver"
    workspace: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"


#
# VQMedSegWidget
#


class VQMedSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
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
        self._setProgress(0, _("Idle"))

        # Needed for module reload.
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # The GUI is refreshed from the parameter node when the user comes back.
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # The parameter node is about to be reset; stop using it.
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
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
        if reason is None:
            self.ui.applyButton.toolTip = _("Check the inputs and create the workspace folder.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = reason
            self.ui.applyButton.enabled = False

    def onApplyButton(self) -> None:
        """Check the inputs, create the workspace and check that the library can be imported."""
        with slicer.util.tryWithErrorDisplay(_("Failed to prepare the workspace."), waitCursor=True):
            self._setProgress(0, _("Preparing workspace"))
            workspace = self.logic.prepareWorkspace(self._parameterNode)
            self._appendLog(_("Workspace ready: {path}").format(path=workspace))
            self._setProgress(50, _("Checking the VQMedSeg library"))
            if self.logic.libraryAvailable():
                self._appendLog(_("VQMedSeg library found."))
            else:
                self._appendLog(_("VQMedSeg library not found; see the application log for the reason."))
            self._setProgress(100, _("Done"))

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

    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> VQMedSegParameterNode:
        return VQMedSegParameterNode(super().getParameterNode())

    def setInputs(
        self,
        ctVolume: vtkMRMLScalarVolumeNode,
        mrVolume: vtkMRMLScalarVolumeNode | None = None,
        target: str = "liver",
        workspace: pathlib.Path | str | None = None,
        device: str = "auto",
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

    def prepareWorkspace(self, parameterNode: VQMedSegParameterNode) -> pathlib.Path:
        """Check the inputs and create the workspace folder; return its path."""
        reason = self.cannotApplyReason(parameterNode)
        if reason is not None:
            raise ValueError(reason)
        workspace = pathlib.Path(parameterNode.workspace).expanduser()
        if workspace.exists() and not workspace.is_dir():
            raise ValueError(f"workspace {workspace}: exists but is not a folder")
        workspace.mkdir(parents=True, exist_ok=True)
        return workspace

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

        workspace = logic.prepareWorkspace(parameterNode)
        self.assertTrue(workspace.is_dir())

    def test_LibraryAvailable(self):
        logic = VQMedSegLogic()
        self.assertTrue(logic.libraryAvailable())
        import VQMedSegLib

        self.assertTrue(VQMedSegLib.__version__)
