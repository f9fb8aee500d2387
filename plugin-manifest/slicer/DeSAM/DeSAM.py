# Owns the 3D Slicer side of DeSAM: module description, GUI, and moving volumes/segmentations between
# the MRML scene and DeSAMLib. Must not run inference in-process or install torch into Slicer.
"""3D Slicer scripted module: fully automatic prostate MR segmentation with the DeSAM engine.

Inference runs out of process: the local `desam` executable (``desam segment``) or an Orthanc server
with the DeSAM plugin. Everything that does not need Slicer lives in DeSAMLib/engine.py.
"""

import logging
import os
import shutil
import tempfile
import threading

import numpy as np
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DeSAMLib import engine as desam_engine

SETTING_ENGINE_PATH = "DeSAM/EnginePath"
SETTING_MODELS_FOLDER = "DeSAM/ModelsFolder"
SETTING_ORTHANC_URL = "DeSAM/OrthancURL"
SETTING_ORTHANC_USER = "DeSAM/OrthancUser"
SETTING_QA_THRESHOLD = "DeSAM/QAThreshold"
SETTING_REVIEWER = "DeSAM/Reviewer"
# Attributes of a segmentation node loaded from Orthanc: where it came from (enables "Send to Orthanc
# as reviewed").
ATTR_ORTHANC_URL = "DeSAM.OrthancURL"
ATTR_SERIES_UID = "DeSAM.SeriesInstanceUID"
ATTR_SOURCE_VOLUME = "DeSAM.SourceVolumeID"

MODES = ["box", "grid"]
DEVICES = ["auto", "cpu", "cuda"]
BACKEND_LOCAL = "Local engine"
BACKEND_ORTHANC = "Orthanc server"


#
# DeSAM
#
class DeSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeSAM Prostate"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["The desam project contributors"]
        self.parent.helpText = (
            "Fully automatic prostate segmentation of MR volumes with DeSAM (decoupled Segment "
            "Anything Model). Select a volume and a model, then press <b>Segment prostate</b>. "
            "Inference runs in the separate <code>desam</code> engine (CPU or CUDA) or on an Orthanc "
            "server with the DeSAM plugin, so nothing is installed into Slicer's Python. "
            "Set the engine path and the models folder under <i>Settings</i>. "
            'See <a href="%s">installing the engine</a>.' % desam_engine.INSTALL_HELP_URL
        )
        self.parent.acknowledgementText = (
            "DeSAM: Gao Y. and Xia W., \"DeSAM: Decoupled Segment Anything Model for Generalizable "
            "Medical Image Segmentation\", MICCAI 2024. Built on Meta AI's Segment Anything and "
            "LiteMedSAM. The module layout follows the 3D Slicer scripted module template."
        )


#
# DeSAMWidget
#
class DeSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._running = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = DeSAMLogic()

        # --- inputs
        form = qt.QFormLayout()
        self.layout.addLayout(form)

        self.inputSelector = slicer.qMRMLNodeComboBox()
        self.inputSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.inputSelector.selectNodeUponCreation = True
        self.inputSelector.addEnabled = False
        self.inputSelector.removeEnabled = False
        self.inputSelector.noneEnabled = False
        self.inputSelector.showHidden = False
        self.inputSelector.setMRMLScene(slicer.mrmlScene)
        self.inputSelector.setToolTip("MR volume to segment (T2-weighted axial works best).")
        form.addRow("Input volume:", self.inputSelector)

        self.backendSelector = qt.QComboBox()
        self.backendSelector.addItems([BACKEND_LOCAL, BACKEND_ORTHANC])
        self.backendSelector.setToolTip("Run the local `desam` engine, or ask the Orthanc server the "
                                        "volume was loaded from (DeSAM plugin).")
        form.addRow("Run on:", self.backendSelector)

        modelRow = qt.QHBoxLayout()
        self.modelSelector = qt.QComboBox()
        self.modelSelector.setToolTip("Model folders (with model.json) found in the models folder.")
        self.refreshModelsButton = qt.QPushButton("Refresh")
        modelRow.addWidget(self.modelSelector, 1)
        modelRow.addWidget(self.refreshModelsButton)
        form.addRow("Model:", modelRow)

        self.modeSelector = qt.QComboBox()
        self.modeSelector.addItems(MODES)
        self.modeSelector.setToolTip("box: one whole-slice box prompt per slice; grid: grid points "
                                     "prompts merged with non-maximum suppression.")
        form.addRow("Prompt mode:", self.modeSelector)

        self.deviceSelector = qt.QComboBox()
        self.deviceSelector.addItems(DEVICES)
        self.deviceSelector.setToolTip("auto uses CUDA when the engine finds a GPU, else the CPU.")
        form.addRow("Device:", self.deviceSelector)

        # --- run
        self.applyButton = qt.QPushButton("Segment prostate")
        self.applyButton.toolTip = "Run DeSAM on the input volume and add a Prostate segment."
        self.applyButton.enabled = False
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        runRow = qt.QHBoxLayout()
        runRow.addWidget(self.applyButton, 1)
        runRow.addWidget(self.cancelButton)
        self.layout.addLayout(runRow)

        self.progressBar = qt.QProgressBar()
        self.progressBar.setRange(0, 100)
        self.progressBar.setValue(0)
        self.layout.addWidget(self.progressBar)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.layout.addWidget(self.statusLabel)
        self.resultLabel = qt.QLabel("")
        self.resultLabel.wordWrap = True
        self.resultLabel.openExternalLinks = True
        self.layout.addWidget(self.resultLabel)

        # --- review: the corrected segmentation goes back to the Orthanc it came from
        reviewForm = qt.QFormLayout()
        self.layout.addLayout(reviewForm)
        self.reviewerEdit = qt.QLineEdit(self.logic.setting(SETTING_REVIEWER))
        self.reviewerEdit.setToolTip("Your name as it should appear in the reviewed SEG (ContentCreatorName), "
                                     "e.g. Rossi^Anna.")
        reviewForm.addRow("Reviewer:", self.reviewerEdit)
        self.sendReviewedButton = qt.QPushButton("Send to Orthanc as reviewed")
        self.sendReviewedButton.enabled = False
        self.sendReviewedButton.toolTip = ("Store the corrected segmentation in Orthanc as a new SEG series "
                                           "marked reviewed (the automatic SEG is kept).")
        reviewForm.addRow(self.sendReviewedButton)

        # --- settings (Slicer application settings, shared by all scenes)
        import ctk

        settingsBox = ctk.ctkCollapsibleButton()
        settingsBox.text = "Settings"
        settingsBox.collapsed = True
        self.layout.addWidget(settingsBox)
        settingsForm = qt.QFormLayout(settingsBox)
        self.enginePathEdit = ctk.ctkPathLineEdit()
        self.enginePathEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.enginePathEdit.currentPath = self.logic.setting(SETTING_ENGINE_PATH)
        self.enginePathEdit.setToolTip("The `desam` executable (empty: DESAM_BIN or PATH).")
        settingsForm.addRow("Engine path:", self.enginePathEdit)
        self.modelsFolderEdit = ctk.ctkPathLineEdit()
        self.modelsFolderEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.modelsFolderEdit.currentPath = self.logic.setting(SETTING_MODELS_FOLDER)
        self.modelsFolderEdit.setToolTip("Folder holding model directories (each with model.json).")
        settingsForm.addRow("Models folder:", self.modelsFolderEdit)
        self.orthancUrlEdit = qt.QLineEdit(self.logic.setting(SETTING_ORTHANC_URL))
        self.orthancUrlEdit.setToolTip("e.g. http://localhost:8042 (used with 'Run on: Orthanc server').")
        settingsForm.addRow("Orthanc URL:", self.orthancUrlEdit)
        self.orthancUserEdit = qt.QLineEdit(self.logic.setting(SETTING_ORTHANC_USER))
        settingsForm.addRow("Orthanc user:", self.orthancUserEdit)
        self.orthancPasswordEdit = qt.QLineEdit()
        self.orthancPasswordEdit.echoMode = qt.QLineEdit.Password
        self.orthancPasswordEdit.setToolTip("Not stored; asked again each session.")
        settingsForm.addRow("Orthanc password:", self.orthancPasswordEdit)
        self.engineStatusLabel = qt.QLabel("")
        self.engineStatusLabel.wordWrap = True
        self.engineStatusLabel.openExternalLinks = True
        settingsForm.addRow(self.engineStatusLabel)

        self.layout.addStretch(1)

        # --- connections
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.modelSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.modeSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.deviceSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.backendSelector.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)
        self.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.enginePathEdit.connect("currentPathChanged(QString)", self.onEnginePathChanged)
        self.modelsFolderEdit.connect("currentPathChanged(QString)", self.onModelsFolderChanged)
        self.orthancUrlEdit.connect("editingFinished()", self.onOrthancSettingsChanged)
        self.orthancUserEdit.connect("editingFinished()", self.onOrthancSettingsChanged)
        self.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.reviewerEdit.connect("editingFinished()", self.onReviewerChanged)
        self.sendReviewedButton.connect("clicked(bool)", self.onSendReviewedButton)

        self.refreshModels()
        self.checkEngine()
        self.initializeParameterNode()

    def cleanup(self):
        self.removeObservers()

    def onReload(self):
        # Slicer's Reload only re-reads DeSAM.py; reload the helper package too.
        import importlib

        import DeSAMLib.engine

        importlib.reload(DeSAMLib.engine)
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # --- parameter node
    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.SetNodeReferenceID("InputVolume", first.GetID())
        if not self._parameterNode.GetParameter("ModelPath") and self.modelSelector.count:
            # No model chosen in this scene yet: take the one the selector shows.
            self._parameterNode.SetParameter("ModelPath", self.modelSelector.itemData(self.modelSelector.currentIndex) or "")

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            p = self._parameterNode
            self.inputSelector.setCurrentNode(p.GetNodeReference("InputVolume"))
            self._selectText(self.modeSelector, p.GetParameter("Mode"))
            self._selectText(self.deviceSelector, p.GetParameter("Device"))
            self._selectText(self.backendSelector, p.GetParameter("Backend"))
            modelPath = p.GetParameter("ModelPath")
            for i in range(self.modelSelector.count):
                if self.modelSelector.itemData(i) == modelPath:
                    self.modelSelector.setCurrentIndex(i)
            self.updateButtons()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            p = self._parameterNode
            p.SetNodeReferenceID("InputVolume", self.inputSelector.currentNodeID)
            p.SetParameter("Mode", self.modeSelector.currentText)
            p.SetParameter("Device", self.deviceSelector.currentText)
            p.SetParameter("Backend", self.backendSelector.currentText)
            data = self.modelSelector.itemData(self.modelSelector.currentIndex)
            p.SetParameter("ModelPath", data or "")
        finally:
            self._parameterNode.EndModify(wasModified)
        self.updateButtons()

    @staticmethod
    def _selectText(combo, text):
        if text:
            index = combo.findText(text)
            if index >= 0:
                combo.setCurrentIndex(index)

    def updateButtons(self):
        hasInput = self.inputSelector.currentNode() is not None
        local = self.backendSelector.currentText == BACKEND_LOCAL
        hasModel = self.modelSelector.count > 0 and bool(self.modelSelector.itemData(self.modelSelector.currentIndex))
        ready = hasInput and (hasModel or not local) and not self._running
        self.applyButton.enabled = ready
        self.cancelButton.enabled = self._running
        if not hasInput:
            self.applyButton.toolTip = "Select an input volume."
        elif local and not hasModel:
            self.applyButton.toolTip = "No model found: set the models folder under Settings."
        else:
            self.applyButton.toolTip = "Run DeSAM on the input volume and add a Prostate segment."
        # Enabled when the case came from Orthanc (its segmentation node remembers the server).
        self.sendReviewedButton.enabled = self.orthancSegmentation() is not None and not self._running

    def orthancSegmentation(self):
        """The segmentation node last loaded from Orthanc, while it is still in the scene."""
        node = getattr(self, "_orthancSegmentation", None)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is not node:
            return None
        return node if node.GetAttribute(ATTR_ORTHANC_URL) else None

    # --- settings
    def onEnginePathChanged(self, path):
        self.logic.setSetting(SETTING_ENGINE_PATH, path)
        self.checkEngine()

    def onModelsFolderChanged(self, path):
        self.logic.setSetting(SETTING_MODELS_FOLDER, path)
        self.refreshModels()

    def onOrthancSettingsChanged(self):
        self.logic.setSetting(SETTING_ORTHANC_URL, self.orthancUrlEdit.text.strip())
        self.logic.setSetting(SETTING_ORTHANC_USER, self.orthancUserEdit.text.strip())

    def onReviewerChanged(self):
        self.logic.setSetting(SETTING_REVIEWER, self.reviewerEdit.text.strip())

    def onSendReviewedButton(self):
        segNode = self.orthancSegmentation()
        if segNode is None:
            return
        volume = slicer.mrmlScene.GetNodeByID(segNode.GetAttribute(ATTR_SOURCE_VOLUME) or "")
        volume = volume or self.inputSelector.currentNode()
        self.setRunning(True)
        try:
            qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
            sent = self.logic.sendReviewedToOrthanc(
                volume, segNode, self.reviewerEdit.text.strip(), self.orthancUserEdit.text.strip(),
                self.orthancPasswordEdit.text)
            self.statusLabel.text = "Stored in Orthanc as reviewed: SEG series %s." % sent["seg_series"]
        except desam_engine.DeSAMError as e:
            self.statusLabel.text = ""
            slicer.util.errorDisplay(str(e), windowTitle="DeSAM", detailedText=getattr(e, "stderr_tail", "") or None)
        finally:
            qt.QApplication.restoreOverrideCursor()
            self.setRunning(False)

    def checkEngine(self):
        try:
            path = self.logic.findEngine()
            self.engineStatusLabel.text = "Engine: %s" % path
        except desam_engine.EngineNotFound as e:
            self.engineStatusLabel.text = self._linkify(str(e))

    @staticmethod
    def _linkify(message):
        url = desam_engine.INSTALL_HELP_URL
        return message.replace(url, '<a href="%s">%s</a>' % (url, url))

    def refreshModels(self):
        current = self.modelSelector.itemData(self.modelSelector.currentIndex) if self.modelSelector.count else None
        self.modelSelector.clear()
        for model in self.logic.availableModels():
            self.modelSelector.addItem(model.label(), model.path)
        if current:
            for i in range(self.modelSelector.count):
                if self.modelSelector.itemData(i) == current:
                    self.modelSelector.setCurrentIndex(i)
        self.updateParameterNodeFromGUI()

    # --- running
    def setRunning(self, running):
        self._running = running
        self.updateButtons()

    def onProgress(self, progress):
        self.progressBar.setValue(int(round(100 * progress.fraction)))
        self.statusLabel.text = progress.text()
        slicer.app.processEvents()

    def onCancelButton(self):
        self.statusLabel.text = "Cancelling..."
        self.logic.cancel()

    def onApplyButton(self):
        volume = self.inputSelector.currentNode()
        self.resultLabel.text = ""
        self.progressBar.setValue(0)
        self.setRunning(True)
        try:
            qt.QApplication.setOverrideCursor(qt.Qt.BusyCursor)
            if self.backendSelector.currentText == BACKEND_ORTHANC:
                segNode, result = self.logic.processWithOrthanc(
                    volume, self.orthancUrlEdit.text.strip(), self.orthancUserEdit.text.strip(),
                    self.orthancPasswordEdit.text, mode=self.modeSelector.currentText,
                    onProgress=self.onProgress, onIdle=slicer.app.processEvents)
                self._orthancSegmentation = segNode
            else:
                segNode, result = self.logic.process(
                    volume, self.modelSelector.itemData(self.modelSelector.currentIndex),
                    mode=self.modeSelector.currentText, device=self.deviceSelector.currentText,
                    onProgress=self.onProgress, onIdle=slicer.app.processEvents,
                    onLog=logging.info)
            self.progressBar.setValue(100)
            self.statusLabel.text = "Created segmentation '%s'." % segNode.GetName()
            self.resultLabel.text = self.logic.resultText(result)
        except desam_engine.Cancelled as e:
            self.statusLabel.text = str(e)
            self.progressBar.setValue(0)
        except desam_engine.EngineNotFound as e:
            self.statusLabel.text = ""
            self.resultLabel.text = self._linkify(str(e))
            slicer.util.errorDisplay(str(e), windowTitle="DeSAM engine not found")
        except desam_engine.DeSAMError as e:
            self.statusLabel.text = ""
            self.resultLabel.text = str(e)
            details = getattr(e, "stderr_tail", "")
            if details:
                slicer.util.errorDisplay(str(e), windowTitle="DeSAM", detailedText=details)
            else:
                slicer.util.errorDisplay(str(e), windowTitle="DeSAM")
        finally:
            qt.QApplication.restoreOverrideCursor()
            self.setRunning(False)


#
# DeSAMLogic
#
class DeSAMLogic(ScriptedLoadableModuleLogic):
    """Scene-side logic; no widgets. Inference is delegated to DeSAMLib.engine."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.cancelEvent = threading.Event()
        self.keepTemporaryFiles = False

    def setDefaultParameters(self, parameterNode):
        defaults = {"Mode": "box", "Device": "auto", "Backend": BACKEND_LOCAL, "ModelPath": ""}
        for key, value in defaults.items():
            if not parameterNode.GetParameter(key):
                parameterNode.SetParameter(key, value)

    # --- application settings
    @staticmethod
    def setting(key, default=""):
        value = qt.QSettings().value(key)
        return str(value) if value else default

    @staticmethod
    def setSetting(key, value):
        qt.QSettings().setValue(key, value or "")

    @staticmethod
    def engineEnvironment():
        """Slicer's startup environment (without the launcher's LD_LIBRARY_PATH), when this Slicer has it."""
        startup = getattr(getattr(slicer, "util", None), "startupEnvironment", None)
        return desam_engine.engine_environment(startup() if startup is not None else None)

    def findEngine(self):
        return desam_engine.find_engine(self.setting(SETTING_ENGINE_PATH))

    def availableModels(self):
        # No models folder chosen: the models the installed engine ships (tarball or Debian package).
        folder = self.setting(SETTING_MODELS_FOLDER)
        if not folder:
            try:
                folder = desam_engine.installed_models_folder(self.findEngine())
            except desam_engine.EngineNotFound:
                folder = desam_engine.installed_models_folder(None)
        return desam_engine.list_models(folder)

    def qaThreshold(self):
        try:
            return float(self.setting(SETTING_QA_THRESHOLD)) if self.setting(SETTING_QA_THRESHOLD) else None
        except ValueError:
            return None

    def resultText(self, result):
        text = result.summary()
        threshold = self.qaThreshold()
        if threshold is not None and result.quality is not None and result.quality < threshold and not result.flagged:
            text += ", FLAGGED for review (QA score below %.2f)" % threshold
        return text

    def cancel(self):
        self.cancelEvent.set()

    # --- geometry
    @staticmethod
    def volumeArrayAndGeometry(volumeNode):
        """(voxels in KJI order, 4x4 IJK-to-RAS numpy matrix) of a scalar volume node."""
        if volumeNode is None:
            raise ValueError("No input volume.")
        if volumeNode.GetParentTransformNode() is not None:
            logging.warning("DeSAM: the input volume is under a transform; the mask is computed on the "
                            "volume's own grid and placed under the same transform.")
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ijkToRas = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)
        return array, ijkToRas

    # --- inference
    def segmentArray(self, array, ijkToRas, modelDir, mode="box", device="auto", onProgress=None,
                     onIdle=None, onLog=None, enginePath=None, workdir=None, threads=None):
        """Run the engine on an in-memory volume; returns (mask uint8 KJI, engine Result)."""
        engine = enginePath or self.findEngine()
        if not modelDir:
            raise desam_engine.DeSAMError("No model selected: set the models folder in the DeSAM settings.")
        self.cancelEvent.clear()
        ownTemp = workdir is None
        workdir = workdir or tempfile.mkdtemp(prefix="desam-")
        try:
            return desam_engine.segment_array(
                engine, array, ijkToRas, modelDir, workdir, mode=mode, device=device,
                on_progress=onProgress, cancel_event=self.cancelEvent, on_idle=onIdle, on_log=onLog,
                threads=threads, env=self.engineEnvironment())
        finally:
            if ownTemp and not self.keepTemporaryFiles:
                shutil.rmtree(workdir, ignore_errors=True)

    def process(self, inputVolume, modelDir, mode="box", device="auto", onProgress=None, onIdle=None,
                onLog=None, segmentationNode=None):
        """Segment ``inputVolume`` with the local engine; returns (segmentation node, Result)."""
        engine = self.findEngine()  # fail before copying the volume
        array, ijkToRas = self.volumeArrayAndGeometry(inputVolume)
        mask, result = self.segmentArray(array, ijkToRas, modelDir, mode=mode, device=device,
                                         onProgress=onProgress, onIdle=onIdle, onLog=onLog,
                                         enginePath=engine)
        segNode = self.createSegmentation(inputVolume, mask, segmentationNode, result)
        return segNode, result

    def createSegmentation(self, volumeNode, mask, segmentationNode=None, result=None):
        """Put a binary mask (KJI, on the volume's grid) into a segmentation node as 'Prostate'."""
        if segmentationNode is None:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(volumeNode.GetName() + " DeSAM"))
            segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        if volumeNode.GetTransformNodeID():
            segmentationNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName("Prostate")
        if not segmentId:
            segmentId = segmentation.AddEmptySegment("Prostate", "Prostate", list(desam_engine.PROSTATE_COLOR))
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.asarray(mask, dtype=np.uint8), segmentationNode, segmentId, volumeNode)
        segment = segmentation.GetSegment(segmentId)
        segment.SetColor(*desam_engine.PROSTATE_COLOR)
        if hasattr(segment, "SetTerminology"):
            segment.SetTerminology(desam_engine.PROSTATE_TERMINOLOGY_ENTRY)
        else:
            segment.SetTag(segment.GetTerminologyEntryTagName(), desam_engine.PROSTATE_TERMINOLOGY_ENTRY)
        if result is not None:
            for key in ("volume_ml", "quality", "flagged"):
                if key in result.report:
                    segment.SetTag("DeSAM." + key, str(result.report[key]))
            model = result.report.get("model")
            if isinstance(model, dict):
                model = " ".join(str(model[k]) for k in ("name", "version") if model.get(k))
            if model:
                segment.SetTag("DeSAM.model", str(model))
        return segmentationNode

    # --- Orthanc backend
    @staticmethod
    def seriesInstanceUIDOf(volumeNode):
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        if not uids or not getattr(slicer, "dicomDatabase", None):
            raise desam_engine.OrthancError(
                "The volume was not loaded from DICOM, so its Orthanc series is unknown. Load the series "
                "from Orthanc (DICOM module or DICOMweb) or use the local engine.")
        uid = slicer.dicomDatabase.instanceValue(uids[0], "0020,000E")
        if not uid:
            raise desam_engine.OrthancError("SeriesInstanceUID of the input volume not found in the DICOM database.")
        return uid

    def processWithOrthanc(self, inputVolume, url, username=None, password=None, mode=None, model=None,
                           onProgress=None, onIdle=None):
        """Ask the Orthanc DeSAM plugin to segment the input's series, then load the SEG it stored."""
        self.cancelEvent.clear()
        seriesUid = self.seriesInstanceUIDOf(inputVolume)
        backend = desam_engine.OrthancBackend(url or self.setting(SETTING_ORTHANC_URL), username, password)
        workdir = tempfile.mkdtemp(prefix="desam-orthanc-")
        try:
            segPath = os.path.join(workdir, "seg.dcm")
            report = backend.segment_series(seriesUid, segPath, model=model, mode=mode, on_progress=onProgress,
                                            cancel_event=self.cancelEvent, on_idle=onIdle)
            segNode = self.loadDicomSeg(segPath)
            segNode.SetAttribute(ATTR_ORTHANC_URL, backend.url)
            segNode.SetAttribute(ATTR_SERIES_UID, seriesUid)
            segNode.SetAttribute(ATTR_SOURCE_VOLUME, inputVolume.GetID())
            return segNode, desam_engine.Result(mask_path=segPath, report=report)
        finally:
            if not self.keepTemporaryFiles:
                shutil.rmtree(workdir, ignore_errors=True)

    def sendReviewedToOrthanc(self, volumeNode, segmentationNode, reviewer, username=None, password=None):
        """Sends the (corrected) Prostate segment of a segmentation loaded from Orthanc back to that Orthanc
        as a new SEG series marked reviewed (DeSAMLib.engine.send_reviewed_to_orthanc)."""
        url = segmentationNode.GetAttribute(ATTR_ORTHANC_URL)
        if not url:
            raise desam_engine.OrthancError("This segmentation was not loaded from Orthanc.")
        seriesUid = segmentationNode.GetAttribute(ATTR_SERIES_UID) or self.seriesInstanceUIDOf(volumeNode)
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentation.GetSegmentIdBySegmentName("Prostate") or segmentation.GetNthSegmentID(0)
        if not segmentId:
            raise desam_engine.DeSAMError("The segmentation has no segment to send.")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)
        _, ijkToRas = self.volumeArrayAndGeometry(volumeNode)
        backend = desam_engine.OrthancBackend(url, username, password)
        workdir = tempfile.mkdtemp(prefix="desam-review-")
        try:
            return desam_engine.send_reviewed_to_orthanc(self.findEngine(), backend, seriesUid, mask, ijkToRas,
                                                         reviewer, workdir)
        finally:
            if not self.keepTemporaryFiles:
                shutil.rmtree(workdir, ignore_errors=True)

    @staticmethod
    def loadDicomSeg(path):
        from DICOMLib import DICOMUtils

        folder = os.path.dirname(path)
        DICOMUtils.importDicom(folder)
        segSeriesUid = slicer.dicomDatabase.fileValue(path, "0020,000E")
        loaded = DICOMUtils.loadSeriesByUID([segSeriesUid])
        for nodeId in loaded or []:
            node = slicer.mrmlScene.GetNodeByID(nodeId)
            if node is not None and node.IsA("vtkMRMLSegmentationNode"):
                return node
        raise desam_engine.OrthancError("The SEG downloaded from Orthanc could not be loaded (is the "
                                        "DICOM segmentation plugin / QuantitativeReporting installed?).")


#
# DeSAMTest
#
class DeSAMTest(ScriptedLoadableModuleTest):
    """Self-tests: no GPU, no network. The engine run is skipped when no engine/model is configured."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_nifti_keeps_oblique_geometry()
        self.setUp()
        self.test_mask_becomes_prostate_segment()
        self.setUp()
        self.test_engine_on_synthetic_volume()

    @staticmethod
    def _syntheticVolume(name="DeSAMTestVolume"):
        """A 24x40x48 (KJI) volume with an oblique, anisotropic, off-origin grid and a bright ellipsoid."""
        k, j, i = np.mgrid[0:24, 0:40, 0:48]
        ellipsoid = ((i - 24) / 12.0) ** 2 + ((j - 20) / 10.0) ** 2 + ((k - 12) / 6.0) ** 2 <= 1.0
        voxels = (100 + 700 * ellipsoid).astype(np.int16)
        node = slicer.util.addVolumeFromArray(voxels, name=name)
        angle = np.deg2rad(17.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag([0.6, 0.6, 3.0])
        ijkToRas[:3, 3] = [-21.5, 14.0, -60.25]
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijkToRas))
        return node, voxels, ellipsoid, ijkToRas

    def test_nifti_keeps_oblique_geometry(self):
        self.delayDisplay("NIfTI round trip keeps the volume's grid")
        node, voxels, _, ijkToRas = self._syntheticVolume()
        array, matrix = DeSAMLogic.volumeArrayAndGeometry(node)
        self.assertTrue(np.allclose(matrix, ijkToRas))
        path = os.path.join(tempfile.mkdtemp(prefix="desam-test-"), "v.nii.gz")
        desam_engine.write_nifti(array, matrix, path)
        back, backMatrix = desam_engine.read_nifti(path)
        self.assertTrue(np.array_equal(back, voxels))
        self.assertTrue(desam_engine.same_grid(back.shape, backMatrix, voxels.shape, ijkToRas))
        # Slicer's own NIfTI reader must see the same grid.
        loaded = slicer.util.loadVolume(path)
        loadedMatrix = vtk.vtkMatrix4x4()
        loaded.GetIJKToRASMatrix(loadedMatrix)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(loadedMatrix), ijkToRas, atol=1e-3))
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        self.delayDisplay("Test passed")

    def test_mask_becomes_prostate_segment(self):
        self.delayDisplay("A mask becomes a coded Prostate segment on the volume's grid")
        node, _, ellipsoid, _ = self._syntheticVolume()
        logic = DeSAMLogic()
        segNode = logic.createSegmentation(node, ellipsoid.astype(np.uint8))
        segmentId = segNode.GetSegmentation().GetSegmentIdBySegmentName("Prostate")
        self.assertTrue(segmentId)
        back = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentId, node)
        self.assertEqual(int(back.sum()), int(ellipsoid.sum()))
        self.assertTrue(np.array_equal(back > 0, ellipsoid))
        segment = segNode.GetSegmentation().GetSegment(segmentId)
        tag = vtk.mutable("")
        segment.GetTag(segment.GetTerminologyEntryTagName(), tag)
        self.assertIn("SCT^41216001^Prostate", str(tag))
        self.delayDisplay("Test passed")

    def test_engine_on_synthetic_volume(self):
        logic = DeSAMLogic()
        try:
            logic.findEngine()
        except desam_engine.EngineNotFound as e:
            self.delayDisplay("Skipping the engine run: %s" % e)
            return
        models = logic.availableModels()
        if not models:
            self.delayDisplay("Skipping the engine run: no model in the models folder")
            return
        self.delayDisplay("Engine run on a synthetic volume (CPU)")
        node, _, _, _ = self._syntheticVolume()
        fractions = []
        segNode, result = logic.process(node, models[0].path, mode="box", device="cpu",
                                        onProgress=lambda p: fractions.append(p.fraction))
        self.assertTrue(fractions and fractions[-1] == 1.0)
        segmentId = segNode.GetSegmentation().GetSegmentIdBySegmentName("Prostate")
        back = slicer.util.arrayFromSegmentBinaryLabelmap(segNode, segmentId, node)
        self.assertEqual(back.shape, slicer.util.arrayFromVolume(node).shape)
        self.delayDisplay("Test passed: " + result.summary())
