# Import/structure check of the Slicer module DeSAM.py with slicer/qt/ctk/vtk stubbed ONLY for this
# check (Slicer cannot be installed here), plus the logic's delegation to DeSAMLib with the real engine.
import importlib
import json
import sys
import types
from unittest import mock

import numpy as np
import pytest

from conftest import REPO_ROOT, SLICER_MODULE_DIR

SLICER_DIR = REPO_ROOT / "plugin-manifest" / "slicer"


class _Settings:
    """qt.QSettings stand-in backed by a dict (Slicer's settings are per-application)."""

    store = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class _Matrix4x4:
    def __init__(self):
        self.m = np.eye(4)

    def GetElement(self, r, c):
        return float(self.m[r, c])

    def SetElement(self, r, c, v):
        self.m[r, c] = v


class _Base:
    def __init__(self, parent=None):
        self.parent = parent


class _ParameterNode:
    """vtkMRMLScriptedModuleNode stand-in: string parameters and node references."""

    def __init__(self):
        self.parameters, self.references = {}, {}

    def GetParameter(self, key):
        return self.parameters.get(key, "")

    def SetParameter(self, key, value):
        self.parameters[key] = value

    def GetNodeReference(self, role):
        return self.references.get(role)

    def SetNodeReferenceID(self, role, node_id):
        self.references[role] = node_id

    def StartModify(self):
        return 0

    def EndModify(self, was_modified):
        pass


class _ComboBox:
    """QComboBox stand-in with items (text, data)."""

    def __init__(self, *args):
        self.items, self.currentIndex, self.toolTip = [], -1, ""

    def addItems(self, texts):
        for t in texts:
            self.addItem(t)

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.currentIndex = 0

    def clear(self):
        self.items, self.currentIndex = [], -1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentText(self):
        return self.items[self.currentIndex][0] if self.currentIndex >= 0 else ""

    def itemData(self, index):
        return self.items[index][1] if 0 <= index < len(self.items) else None

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self.items) if t == text), -1)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def setToolTip(self, text):
        self.toolTip = text

    def connect(self, signal, slot):
        pass


class _Logic:
    def __init__(self, parent=None):
        self._parameterNode = _ParameterNode()

    def getParameterNode(self):
        return self._parameterNode


class _Widget(_Base):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.layout = mock.MagicMock(name="layout")

    def setup(self):
        pass


class _ObservationMixin:
    def __init__(self):
        self.observations = []

    def addObserver(self, obj, event, method, *args):
        self.observations.append((obj, event, method))

    def removeObserver(self, obj, event, method):
        pass

    def removeObservers(self, method=None):
        self.observations = []


def _stub_module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__getattr__ = lambda attr: mock.MagicMock(name="%s.%s" % (name, attr))
    return m


@pytest.fixture()
def desam_module(monkeypatch):
    """DeSAM.py imported with stub Slicer modules; removed from sys.modules afterwards."""
    _Settings.store = {}
    util = _stub_module("slicer.util", VTKObservationMixin=_ObservationMixin,
                        arrayFromVolume=mock.MagicMock(name="arrayFromVolume"),
                        updateSegmentBinaryLabelmapFromArray=mock.MagicMock(name="updateSegment"),
                        errorDisplay=mock.MagicMock(name="errorDisplay"))
    slm = _stub_module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=_Base,
                       ScriptedLoadableModuleWidget=_Widget, ScriptedLoadableModuleLogic=_Logic,
                       ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (), {}))
    slicer = _stub_module("slicer", util=util, ScriptedLoadableModule=slm, mrmlScene=mock.MagicMock(name="scene"),
                          app=mock.MagicMock(name="app"))
    stubs = {
        "slicer": slicer,
        "slicer.util": util,
        "slicer.ScriptedLoadableModule": slm,
        "qt": _stub_module("qt", QSettings=_Settings, QComboBox=_ComboBox),
        "ctk": _stub_module("ctk"),
        "vtk": _stub_module("vtk", vtkMatrix4x4=_Matrix4x4),
    }
    for name, module in stubs.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.syspath_prepend(str(SLICER_MODULE_DIR))
    for name in ("DeSAM",):
        sys.modules.pop(name, None)
    module = importlib.import_module("DeSAM")
    yield module
    sys.modules.pop("DeSAM", None)


def test_module_classes_and_metadata(desam_module):
    for cls, base in [("DeSAM", "ScriptedLoadableModule"), ("DeSAMWidget", "ScriptedLoadableModuleWidget"),
                      ("DeSAMLogic", "ScriptedLoadableModuleLogic"), ("DeSAMTest", "ScriptedLoadableModuleTest")]:
        klass = getattr(desam_module, cls)
        assert issubclass(klass, getattr(sys.modules["slicer.ScriptedLoadableModule"], base))
    assert issubclass(desam_module.DeSAMWidget, sys.modules["slicer.util"].VTKObservationMixin)
    parent = types.SimpleNamespace()
    desam_module.DeSAM(parent)
    assert parent.categories == ["Segmentation"]
    assert parent.title and parent.contributors and parent.acknowledgementText
    assert "Segment prostate" in parent.helpText and desam_module.desam_engine.INSTALL_HELP_URL in parent.helpText
    assert "MICCAI 2024" in parent.acknowledgementText
    # The self-test has setUp (clears the scene) and runTest.
    assert callable(desam_module.DeSAMTest.setUp) and callable(desam_module.DeSAMTest.runTest)


def test_logic_has_no_gui_code():
    source = (SLICER_MODULE_DIR / "DeSAM.py").read_text()
    logic = source[source.index("class DeSAMLogic"):source.index("class DeSAMTest")]
    for gui in ("QPushButton", "QLabel", "QComboBox", "errorDisplay", "QProgressBar", "ctk."):
        assert gui not in logic, "DeSAMLogic uses %s" % gui


def test_engine_library_imports_no_slicer():
    source = (SLICER_MODULE_DIR / "DeSAMLib" / "engine.py").read_text()
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            assert stripped.split()[1].split(".")[0] not in ("slicer", "qt", "vtk", "ctk", "DeSAM"), line


def test_widget_setup_runs_against_stubs(desam_module, tmp_path):
    for name in ("prostate-b", "prostate-a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.json").write_text(json.dumps({"name": name, "version": "1"}))
    _Settings.store["DeSAM/ModelsFolder"] = str(tmp_path)
    widget = desam_module.DeSAMWidget(parent=mock.MagicMock())
    widget.setup()
    assert isinstance(widget.logic, desam_module.DeSAMLogic)
    # Scene close observers registered through VTKObservationMixin.
    assert len(widget.observations) >= 2
    assert [t for t, _ in widget.modelSelector.items] == ["prostate-a 1", "prostate-b 1"]
    assert [t for t, _ in widget.modeSelector.items] == ["box", "grid"]
    assert [t for t, _ in widget.deviceSelector.items] == ["auto", "cpu", "cuda"]
    params = widget.logic.getParameterNode().parameters
    assert params["ModelPath"] == str(tmp_path / "prostate-a")
    assert params["Mode"] == "box" and params["Device"] == "auto"


def test_send_reviewed_button_is_enabled_only_for_a_case_from_orthanc(desam_module):
    widget = desam_module.DeSAMWidget(parent=mock.MagicMock())
    widget.setup()
    widget.updateButtons()
    assert widget.sendReviewedButton.enabled is False, "no segmentation from Orthanc yet"
    node = mock.MagicMock(name="segmentation")
    node.GetID.return_value = "vtkMRMLSegmentationNode1"
    attributes = {desam_module.ATTR_ORTHANC_URL: "http://pacs:8042", desam_module.ATTR_SERIES_UID: "1.2.3"}
    node.GetAttribute.side_effect = attributes.get
    sys.modules["slicer"].mrmlScene.GetNodeByID.side_effect = lambda node_id: node if node_id == node.GetID() else None
    widget._orthancSegmentation = node
    widget.updateButtons()
    assert widget.sendReviewedButton.enabled is True
    widget.setRunning(True)
    assert widget.sendReviewedButton.enabled is False, "not while a run is going on"
    widget.setRunning(False)
    # A segmentation made by the local engine carries no Orthanc origin: the logic refuses it.
    local = mock.MagicMock(name="local segmentation")
    local.GetAttribute.return_value = None
    with pytest.raises(desam_module.desam_engine.OrthancError, match="not loaded from Orthanc"):
        widget.logic.sendReviewedToOrthanc(mock.MagicMock(), local, "Rossi^Anna")


def test_settings_keys_and_engine_lookup_delegate(desam_module, tmp_path):
    logic = desam_module.DeSAMLogic()
    logic.setSetting("DeSAM/EnginePath", str(tmp_path / "missing-desam"))
    with pytest.raises(desam_module.desam_engine.EngineNotFound) as err:
        logic.findEngine()
    assert "missing-desam" in str(err.value)
    (tmp_path / "m1").mkdir()
    (tmp_path / "m1" / "model.json").write_text(json.dumps({"name": "m1"}))
    logic.setSetting("DeSAM/ModelsFolder", str(tmp_path))
    assert [m.name for m in logic.availableModels()] == ["m1"]
    assert _Settings.store["DeSAM/ModelsFolder"] == str(tmp_path)


def test_logic_process_runs_the_real_engine_and_codes_the_segment(desam_module, desam_bin, tiny_model, tmp_path):
    slicer = sys.modules["slicer"]
    voxels = (np.indices((4, 40, 48)).sum(axis=0) % 50 * 20).astype(np.int16)
    ijk_to_ras = np.array([[-0.6, 0, 0, 80.0], [0, -0.6, 0, 95.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
    volume = mock.MagicMock(name="volumeNode")
    volume.GetParentTransformNode.return_value = None
    volume.GetTransformNodeID.return_value = None
    volume.GetName.return_value = "T2"
    volume.GetIJKToRASMatrix.side_effect = lambda m: m.m.__setitem__(slice(None), ijk_to_ras)
    slicer.util.arrayFromVolume.return_value = voxels
    segmentation = mock.MagicMock(name="segmentation")
    segmentation.GetSegmentIdBySegmentName.return_value = ""
    segmentation.AddEmptySegment.return_value = "Prostate"
    segment = mock.MagicMock(name="segment", spec=["SetColor", "SetTag", "GetTerminologyEntryTagName"])
    segment.GetTerminologyEntryTagName.return_value = "TerminologyEntry"
    segmentation.GetSegment.return_value = segment
    seg_node = mock.MagicMock(name="segNode")
    seg_node.GetSegmentation.return_value = segmentation
    slicer.mrmlScene.AddNewNodeByClass.return_value = seg_node

    logic = desam_module.DeSAMLogic()
    logic.setSetting("DeSAM/EnginePath", desam_bin)
    progress = []
    node, result = logic.process(volume, tiny_model, mode="box", device="cpu", onProgress=progress.append)

    assert node is seg_node
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode.assert_called_once_with(volume)
    (mask, node_arg, segment_id, reference), _ = slicer.util.updateSegmentBinaryLabelmapFromArray.call_args
    assert mask.shape == voxels.shape and mask.dtype == np.uint8
    assert node_arg is seg_node and segment_id == "Prostate" and reference is volume
    voxel_ml = abs(np.linalg.det(ijk_to_ras[:3, :3])) / 1000
    assert result.volume_ml == pytest.approx(mask.sum() * voxel_ml, rel=1e-3, abs=1e-6)
    segment.SetTag.assert_any_call("TerminologyEntry", desam_module.desam_engine.PROSTATE_TERMINOLOGY_ENTRY)
    assert progress and progress[-1].fraction == 1.0
    assert "mL" in logic.resultText(result)


def test_widget_shows_user_facing_errors(desam_module, desam_bin, tmp_path):
    slicer = sys.modules["slicer"]
    (tmp_path / "broken-model").mkdir()
    (tmp_path / "broken-model" / "model.json").write_text(json.dumps({"name": "broken"}))
    _Settings.store["DeSAM/ModelsFolder"] = str(tmp_path)
    _Settings.store["DeSAM/EnginePath"] = str(tmp_path / "no-engine-here")
    widget = desam_module.DeSAMWidget(parent=mock.MagicMock())
    widget.setup()
    volume = mock.MagicMock(name="volumeNode")
    volume.GetParentTransformNode.return_value = None
    widget.inputSelector.currentNode.return_value = volume
    slicer.util.arrayFromVolume.return_value = np.zeros((2, 16, 16), np.int16)

    # Missing engine: the result line carries the message with a link to the install section.
    widget.onApplyButton()
    url = desam_module.desam_engine.INSTALL_HELP_URL
    assert "no-engine-here" in widget.resultLabel.text and '<a href="%s">' % url in widget.resultLabel.text
    assert "no-engine-here" in slicer.util.errorDisplay.call_args[0][0]
    assert widget._running is False

    # A real engine failing on a model folder without weights: its one-line message is shown.
    widget.enginePathEdit.currentPath = desam_bin
    widget.onEnginePathChanged(desam_bin)
    slicer.util.errorDisplay.reset_mock()
    widget.onApplyButton()
    message = slicer.util.errorDisplay.call_args[0][0]
    assert message.startswith("DeSAM engine failed: ") and "\n" not in message
    assert widget.resultLabel.text == message and widget._running is False


def test_terminology_entry_codes():
    sys.path.insert(0, str(SLICER_MODULE_DIR))
    from DeSAMLib import engine

    fields = engine.PROSTATE_TERMINOLOGY_ENTRY.split("~")
    assert len(fields) == 7
    assert fields[1] == "SCT^123037004^Anatomical Structure"
    assert fields[2] == "SCT^41216001^Prostate"
    assert fields[4] == "Anatomic codes - DICOM master list"


def test_extension_files():
    top = (SLICER_DIR / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer",
                "add_subdirectory(DeSAM)", "Slicer_EXTENSION_GENERATE_CONFIG", "Slicer_EXTENSION_CPACK"):
        assert key in top, key
    module_cmake = (SLICER_MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module_cmake
    # Every file the CMake lists exists.
    for rel in ("DeSAM.py", "DeSAMLib/__init__.py", "DeSAMLib/engine.py", "Resources/Icons/DeSAM.png"):
        assert (SLICER_MODULE_DIR / rel).is_file(), rel
        assert rel.replace("DeSAM", "${MODULE_NAME}") in module_cmake or rel in module_cmake, rel
    entry = json.loads((SLICER_DIR / "DeSAM.json").read_text())
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.0.json#")
    assert set(entry) >= {"scm_url", "scm_revision", "category", "build_dependencies", "build_subdirectory"}
    assert entry["category"] == "Segmentation" and isinstance(entry["build_dependencies"], list)
    from PIL import Image

    with Image.open(SLICER_MODULE_DIR / "Resources" / "Icons" / "DeSAM.png") as icon:
        assert icon.size == (128, 128)
