# Owns everything the Slicer module does that is not Slicer: finding the `desam` engine, NIfTI-1 I/O,
# running `desam segment` out of process, and the Orthanc REST backend. Must never import slicer/qt/vtk.
"""Plain-Python side of the DeSAM Slicer module (testable without Slicer).

Slicer ships numpy but not nibabel, so the NIfTI-1 reader/writer here uses numpy + gzip only.
Volumes are numpy arrays in Slicer's KJI order (``arrayFromVolume``) with a 4x4 IJK-to-RAS matrix;
NIfTI stores RAS world coordinates, so that matrix is written unchanged as the sform (and qform).
"""

import base64
import gzip
import json
import os
import queue
import shutil
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import numpy as np

INSTALL_HELP_URL = "https://github.com/desam-project/desam#installing-the-engine"

# Slicer's terminology entry for the prostate (context~category~type~type modifier~anatomic context~
# region~region modifier): SCT 123037004 Anatomical Structure / SCT 41216001 Prostate.
PROSTATE_TERMINOLOGY_ENTRY = (
    "Segmentation category and type - 3D Slicer General Anatomy list"
    "~SCT^123037004^Anatomical Structure"
    "~SCT^41216001^Prostate"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~^^"
    "~^^"
)
# The prostate's recommendedDisplayRGBValue in Slicer's General Anatomy terminology (SCT 41216001); the
# SEG writer stores the same colour as RecommendedDisplayCIELabValue (src/dicom/codes.rs PROSTATE_RGB,
# kept equal by a test there).
PROSTATE_RGB = (230, 158, 140)
PROSTATE_COLOR = tuple(c / 255.0 for c in PROSTATE_RGB)

# Fraction of the whole run each engine stage stands for (encode dominates).
STAGE_WEIGHTS = {
    "load": 0.05,
    "preprocess": 0.05,
    "encode": 0.60,
    "decode": 0.20,
    "postprocess": 0.05,
    "write": 0.05,
}
STAGE_ORDER = ["load", "preprocess", "encode", "decode", "postprocess", "write"]


# ----------------------------------------------------------------------------------------- errors
class DeSAMError(Exception):
    """Base class: ``str(err)`` is a one-line message fit for the user."""


class EngineNotFound(DeSAMError):
    pass


class EngineError(DeSAMError):
    """The engine ran and failed (non-zero exit or an error event)."""

    def __init__(self, message, returncode=None, stderr_tail=""):
        super().__init__(message)
        self.returncode = returncode
        self.stderr_tail = stderr_tail


class Cancelled(DeSAMError):
    pass


class NiftiError(DeSAMError):
    pass


class OrthancError(DeSAMError):
    pass


# ------------------------------------------------------------------------------------ the engine
def _engine_names():
    return ["desam.exe", "desam"] if os.name == "nt" else ["desam"]


def _is_executable(path):
    return os.path.isfile(path) and os.access(path, os.X_OK)


# Where the Debian package `desam` installs the engine (tried after PATH).
SYSTEM_ENGINE_PATHS = ["/usr/bin/desam"]
# Where the Debian package installs its models (the tarball has share/desam/models beside bin/).
SYSTEM_MODELS_FOLDER = "/usr/share/desam/models"


def find_engine(settings_value=None):
    """Path of the `desam` executable.

    ``settings_value`` is the `DeSAM/EnginePath` setting: an executable, or a folder holding one (or its
    ``bin/``: the unpacked tarball desam-VERSION-linux-x86_64). When empty, the environment variable
    DESAM_BIN, then PATH, then the Debian package's /usr/bin/desam are tried.
    Raises EngineNotFound with a message that says what was tried and where to get the engine.
    """
    tried = []
    value = (settings_value or "").strip()
    if value:
        value = os.path.expanduser(value)
        candidates = [value]
        if os.path.isdir(value):
            candidates = [os.path.join(value, n) for n in _engine_names()]
            candidates += [os.path.join(value, "bin", n) for n in _engine_names()]
        for c in candidates:
            if _is_executable(c):
                return os.path.abspath(c)
        tried.append(value)
        raise EngineNotFound(
            "The DeSAM engine was not found at the configured path %r (it must be the `desam` "
            "executable or a folder containing it). Install it as described in %s and set "
            "Engine path in the DeSAM module." % (value, INSTALL_HELP_URL)
        )
    env = os.environ.get("DESAM_BIN", "").strip()
    if env:
        if _is_executable(env):
            return os.path.abspath(env)
        tried.append("DESAM_BIN=" + env)
    for n in _engine_names():
        found = shutil.which(n)
        if found:
            return os.path.abspath(found)
    tried.append("PATH")
    # Slicer may start with a PATH of its own: the Debian package's place is tried by name too.
    for c in SYSTEM_ENGINE_PATHS:
        if _is_executable(c):
            return c
        tried.append(c)
    raise EngineNotFound(
        "The DeSAM engine (`desam`) is not installed or not configured (looked in: %s). "
        "Install it as described in %s and set Engine path in the DeSAM module."
        % (", ".join(tried), INSTALL_HELP_URL)
    )


@dataclass
class ModelInfo:
    name: str
    path: str
    version: str = ""
    arch: str = ""
    description: str = ""

    def label(self):
        parts = [self.name]
        if self.version:
            parts.append(self.version)
        if self.arch:
            parts.append("(%s)" % self.arch)
        return " ".join(parts)


def _read_model_info(directory):
    meta = {}
    try:
        with open(os.path.join(directory, "model.json"), "r", encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    name = meta.get("name") or os.path.basename(os.path.normpath(directory))
    return ModelInfo(
        name=str(name),
        path=os.path.abspath(directory),
        version=str(meta.get("version", "") or ""),
        arch=str(meta.get("arch", "") or ""),
        description=str(meta.get("description", "") or ""),
    )


def installed_models_folder(engine):
    """The models an installed engine ships: ``share/desam/models`` beside its ``bin/`` (the tarball,
    or /usr for the Debian package), else the Debian package's folder; None when neither exists."""
    if engine:
        beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(engine)), "..", "share", "desam", "models"))
        if os.path.isdir(beside):
            return beside
    return SYSTEM_MODELS_FOLDER if os.path.isdir(SYSTEM_MODELS_FOLDER) else None


def engine_environment(startup=None):
    """The environment the engine runs in: ``startup`` (DeSAM.py passes Slicer's
    ``slicer.util.startupEnvironment()``) when given, else this process's. Slicer's launcher prepends
    its own library folders to LD_LIBRARY_PATH, which would win over the engine's RUNPATH and could
    load another libtorch; the startup environment is the one from before the launcher."""
    return dict(startup) if startup is not None else dict(os.environ)


def list_models(folder):
    """Model directories (folders holding a model.json) in ``folder``, sorted by name.

    ``folder`` itself counts when it holds a model.json. A missing folder gives an empty list.
    """
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    if os.path.isfile(os.path.join(folder, "model.json")):
        found.append(_read_model_info(folder))
    for entry in sorted(os.listdir(folder)):
        d = os.path.join(folder, entry)
        if os.path.isdir(d) and os.path.isfile(os.path.join(d, "model.json")):
            found.append(_read_model_info(d))
    return sorted(found, key=lambda m: (m.name.lower(), m.path))


# ------------------------------------------------------------------------------------- NIfTI-1
_NIFTI_DTYPES = {
    2: np.uint8,
    4: np.int16,
    8: np.int32,
    16: np.float32,
    64: np.float64,
    256: np.int8,
    512: np.uint16,
    768: np.uint32,
    1024: np.int64,
    1280: np.uint64,
}
_NIFTI_CODES = {np.dtype(v).str[1:]: k for k, v in _NIFTI_DTYPES.items()}
_NIFTI_HEADER_SIZE = 348
_NIFTI_VOX_OFFSET = 352


def _quaternion_from_affine(affine):
    """qform parameters (b, c, d, qfac, offsets, pixdim) for a 4x4 affine (NIfTI-1 method 2)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.sqrt((m * m).sum(axis=0))
    spacing[spacing == 0] = 1.0
    r = m / spacing
    qfac = 1.0
    if np.linalg.det(r) < 0:
        qfac = -1.0
        r[:, 2] = -r[:, 2]
    # Nearest proper rotation (orthonormalise via SVD) so the quaternion is well defined.
    u, _, vt = np.linalg.svd(r)
    r = u @ vt
    trace = r[0, 0] + r[1, 1] + r[2, 2]
    if trace > 0:
        s = 0.5 / np.sqrt(trace + 1.0)
        a = 0.25 / s
        b = (r[2, 1] - r[1, 2]) * s
        c = (r[0, 2] - r[2, 0]) * s
        d = (r[1, 0] - r[0, 1]) * s
    elif r[0, 0] > r[1, 1] and r[0, 0] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[0, 0] - r[1, 1] - r[2, 2])
        a = (r[2, 1] - r[1, 2]) / s
        b = 0.25 * s
        c = (r[0, 1] + r[1, 0]) / s
        d = (r[0, 2] + r[2, 0]) / s
    elif r[1, 1] > r[2, 2]:
        s = 2.0 * np.sqrt(1.0 + r[1, 1] - r[0, 0] - r[2, 2])
        a = (r[0, 2] - r[2, 0]) / s
        b = (r[0, 1] + r[1, 0]) / s
        c = 0.25 * s
        d = (r[1, 2] + r[2, 1]) / s
    else:
        s = 2.0 * np.sqrt(1.0 + r[2, 2] - r[0, 0] - r[1, 1])
        a = (r[1, 0] - r[0, 1]) / s
        b = (r[0, 2] + r[2, 0]) / s
        c = (r[1, 2] + r[2, 1]) / s
        d = 0.25 * s
    if a < 0:  # NIfTI stores b, c, d with a >= 0
        b, c, d = -b, -c, -d
    return (b, c, d), qfac, spacing


def _affine_from_quaternion(b, c, d, qfac, pixdim, offsets):
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    r = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ]
    )
    scale = np.array([pixdim[0], pixdim[1], pixdim[2] * (qfac if qfac != 0 else 1.0)])
    affine = np.eye(4)
    affine[:3, :3] = r * scale
    affine[:3, 3] = offsets
    return affine


def write_nifti(array_kji, ijk_to_ras, path):
    """Write a 3-D array in KJI order with its 4x4 IJK-to-RAS matrix as NIfTI-1 (.nii or .nii.gz).

    Both sform and qform are set (code 1, scanner anatomical) so any reader gets the same grid.
    """
    arr = np.asarray(array_kji)
    if arr.ndim != 3:
        raise NiftiError("expected a 3-D volume, got shape %s" % (arr.shape,))
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    key = arr.dtype.str[1:]
    if key not in _NIFTI_CODES:
        arr = arr.astype(np.float32)
        key = arr.dtype.str[1:]
    code = _NIFTI_CODES[key]
    affine = np.asarray(ijk_to_ras, dtype=np.float64)
    if affine.shape != (4, 4):
        raise NiftiError("IJK-to-RAS must be 4x4, got %s" % (affine.shape,))
    nk, nj, ni = arr.shape
    (qb, qc, qd), qfac, spacing = _quaternion_from_affine(affine)

    hdr = bytearray(_NIFTI_HEADER_SIZE)
    struct.pack_into("<i", hdr, 0, _NIFTI_HEADER_SIZE)
    struct.pack_into("<8h", hdr, 40, 3, ni, nj, nk, 1, 1, 1, 1)
    struct.pack_into("<h", hdr, 70, code)
    struct.pack_into("<h", hdr, 72, arr.dtype.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, qfac, spacing[0], spacing[1], spacing[2], 0, 0, 0, 0)
    struct.pack_into("<f", hdr, 108, float(_NIFTI_VOX_OFFSET))
    struct.pack_into("<f", hdr, 112, 1.0)  # scl_slope
    struct.pack_into("<f", hdr, 116, 0.0)  # scl_inter
    hdr[123] = 2 | 8  # xyzt_units: mm, s
    struct.pack_into("<h", hdr, 252, 1)  # qform_code: scanner
    struct.pack_into("<h", hdr, 254, 1)  # sform_code: scanner
    struct.pack_into("<6f", hdr, 256, qb, qc, qd, affine[0, 3], affine[1, 3], affine[2, 3])
    for row in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * row, *affine[row, :4])
    hdr[344:348] = b"n+1\x00"

    payload = bytes(hdr) + b"\x00\x00\x00\x00" + np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


def read_nifti(path):
    """Read a NIfTI-1 file: (array in KJI order, 4x4 IJK-to-RAS matrix).

    The affine comes from the sform when set, else the qform, else pixdim (as the standard says).
    Scaling (scl_slope/scl_inter) is applied when the slope is neither 0 nor 1.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise NiftiError("cannot read %s: %s" % (path, e))
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise NiftiError("%s is not a valid gzip file: %s" % (path, e))
    if len(raw) < _NIFTI_HEADER_SIZE:
        raise NiftiError("%s is too short to be NIfTI-1" % path)
    if struct.unpack_from("<i", raw, 0)[0] == _NIFTI_HEADER_SIZE:
        e = "<"
    elif struct.unpack_from(">i", raw, 0)[0] == _NIFTI_HEADER_SIZE:
        e = ">"
    else:
        raise NiftiError("%s is not a NIfTI-1 file (sizeof_hdr is not 348; NIfTI-2 is not supported)" % path)
    if raw[344:347] not in (b"n+1", b"ni1"):
        raise NiftiError("%s has no NIfTI-1 magic" % path)
    if raw[344:347] == b"ni1":
        raise NiftiError("%s is a .hdr/.img pair; use a single-file .nii or .nii.gz" % path)
    dim = struct.unpack_from(e + "8h", raw, 40)
    ndim = dim[0]
    if ndim < 3 or any(d > 1 for d in dim[4 : 1 + ndim]):
        if ndim < 2 or any(d > 1 for d in dim[4 : 1 + ndim]):
            raise NiftiError("%s is not a 3-D volume (dim=%s)" % (path, list(dim[: 1 + ndim])))
    ni, nj = dim[1], dim[2]
    nk = dim[3] if ndim >= 3 else 1
    code = struct.unpack_from(e + "h", raw, 70)[0]
    if code not in _NIFTI_DTYPES:
        raise NiftiError("%s has unsupported NIfTI datatype %d" % (path, code))
    dtype = np.dtype(_NIFTI_DTYPES[code]).newbyteorder(e)
    pixdim = struct.unpack_from(e + "8f", raw, 76)
    vox_offset = int(struct.unpack_from(e + "f", raw, 108)[0])
    slope, inter = struct.unpack_from(e + "2f", raw, 112)
    qform_code, sform_code = struct.unpack_from(e + "2h", raw, 252)
    quatern = struct.unpack_from(e + "6f", raw, 256)
    srows = struct.unpack_from(e + "12f", raw, 280)

    count = ni * nj * nk
    end = vox_offset + count * dtype.itemsize
    if len(raw) < end:
        raise NiftiError("%s is truncated (%d bytes of voxel data missing)" % (path, end - len(raw)))
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=vox_offset).reshape(nk, nj, ni)
    arr = arr.astype(dtype.newbyteorder("="))
    if slope not in (0.0, 1.0) or (slope != 0.0 and inter != 0.0):
        arr = arr.astype(np.float32) * np.float32(slope) + np.float32(inter)

    if sform_code > 0:
        affine = np.eye(4)
        affine[:3, :] = np.array(srows, dtype=np.float64).reshape(3, 4)
    elif qform_code > 0:
        qfac = pixdim[0] if pixdim[0] in (-1.0, 1.0) else 1.0
        affine = _affine_from_quaternion(
            quatern[0], quatern[1], quatern[2], qfac, pixdim[1:4], quatern[3:6]
        )
    else:
        affine = np.diag([pixdim[1] or 1.0, pixdim[2] or 1.0, pixdim[3] or 1.0, 1.0])
    return arr, affine


def same_grid(shape_a, affine_a, shape_b, affine_b, tol=1e-3):
    """True when two volumes share shape and IJK-to-RAS (within ``tol`` mm/units; float32 headers)."""
    if tuple(shape_a) != tuple(shape_b):
        return False
    return bool(np.allclose(np.asarray(affine_a), np.asarray(affine_b), atol=tol, rtol=1e-5))


# ------------------------------------------------------------------------------ running the CLI
@dataclass
class Progress:
    """One progress event from the engine, with the overall fraction of the run done."""

    stage: str
    done: int
    total: int
    fraction: float
    raw: dict = field(default_factory=dict)

    def text(self):
        if self.total:
            return "%s %d/%d" % (self.stage, self.done, self.total)
        return self.stage


@dataclass
class Result:
    mask_path: str
    report: dict
    report_path: Optional[str] = None
    events: List[dict] = field(default_factory=list)
    stderr: str = ""

    @property
    def volume_ml(self):
        v = self.report.get("volume_ml")
        return float(v) if v is not None else None

    @property
    def quality(self):
        v = self.report.get("quality")
        if isinstance(v, dict):  # tolerate {"score": ...}
            v = v.get("score")
        return float(v) if v is not None else None

    @property
    def flagged(self):
        return bool(self.report.get("flagged", False))

    def summary(self):
        """The result line the module shows: volume, QA score and whether it is flagged."""
        parts = []
        if self.volume_ml is not None:
            parts.append("Prostate volume %.1f mL" % self.volume_ml)
        if self.quality is not None:
            parts.append("QA score %.2f" % self.quality)
        if self.flagged:
            threshold = self.report.get("qa_threshold")
            if isinstance(threshold, (int, float)):
                parts.append("FLAGGED for review (QA score below the model's threshold %.2f)" % threshold)
            else:
                parts.append("FLAGGED for review (QA score below the model's threshold)")
        return ", ".join(parts) if parts else "Done"


def progress_fraction(stage, done, total):
    """Overall fraction of the run completed when ``stage`` has done ``done`` of ``total`` units."""
    if stage not in STAGE_WEIGHTS:
        return None
    before = sum(STAGE_WEIGHTS[s] for s in STAGE_ORDER[: STAGE_ORDER.index(stage)])
    part = (float(done) / float(total)) if total else 1.0
    part = min(max(part, 0.0), 1.0)
    return min(1.0, before + STAGE_WEIGHTS[stage] * part)


class ProgressTracker(object):
    """Overall fraction from a stream of stage events. The engine interleaves encoding and decoding
    (one encoder batch, then its slices' decoding), so each stage's latest part counts by its weight
    and the fraction never goes backwards; a stage never reported before a later one counts as done."""

    def __init__(self):
        self.parts = {}
        self.last = 0.0

    def update(self, stage, done, total):
        if stage not in STAGE_WEIGHTS:
            return None
        part = (float(done) / float(total)) if total else 1.0
        self.parts[stage] = max(min(max(part, 0.0), 1.0), self.parts.get(stage, 0.0))
        for earlier in STAGE_ORDER[: STAGE_ORDER.index(stage)]:
            self.parts.setdefault(earlier, 1.0)
        frac = sum(STAGE_WEIGHTS[s] * p for s, p in self.parts.items())
        self.last = max(self.last, min(1.0, frac))
        return self.last


def parse_progress_line(line):
    """Decode one stdout line of ``--progress json``; None for lines that are not JSON objects."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def build_segment_command(engine, input_path, model_dir, output_path, mode="box", device="auto",
                          report_path=None, threads=None):
    cmd = [engine, "segment", input_path, "--model", model_dir, "-o", output_path,
           "--mode", mode, "--device", device, "--progress", "json"]
    if report_path:
        cmd += ["--report", report_path]
    if threads:
        cmd += ["--threads", str(int(threads))]
    return cmd


def _engine_message_from_stderr(stderr_text):
    lines = [l.strip() for l in stderr_text.splitlines() if l.strip()]
    for l in reversed(lines):
        if "error" in l.lower():
            return l[len("desam: error: "):] if l.startswith("desam: error: ") else l
    return lines[-1] if lines else ""


def _pump(stream, sink, tag):
    try:
        for line in iter(stream.readline, ""):
            sink.put((tag, line))
    finally:
        sink.put((tag, None))


def run_segmentation(engine, input_path, model_dir, output_path, mode="box", device="auto",
                     on_progress: Optional[Callable[[Progress], None]] = None,
                     cancel_event: Optional[threading.Event] = None,
                     report_path=None, threads=None,
                     on_idle: Optional[Callable[[], None]] = None,
                     on_log: Optional[Callable[[str], None]] = None,
                     on_start: Optional[Callable[[subprocess.Popen], None]] = None,
                     poll_interval=0.05, kill_grace=5.0, env=None) -> Result:
    """Run ``desam segment`` and return its Result.

    stdout JSON lines feed ``on_progress``; other lines and stderr go to ``on_log``. ``on_idle`` is
    called every ``poll_interval`` seconds (Slicer passes ``slicer.app.processEvents`` so the GUI and
    its Cancel button stay live). Setting ``cancel_event`` terminates the engine (then kills it after
    ``kill_grace`` s) and raises Cancelled. ``on_start`` receives the Popen (for logging its pid).
    ``env``: the engine's environment (see engine_environment). A non-zero exit or an error event raises EngineError with
    the engine's one-line message.
    """
    if report_path is None:
        base = output_path[:-7] if output_path.endswith(".nii.gz") else os.path.splitext(output_path)[0]
        report_path = base + ".report.json"
    cmd = build_segment_command(engine, input_path, model_dir, output_path, mode, device,
                                report_path, threads)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, text=True, bufsize=1, env=engine_environment(env),
                                encoding="utf-8", errors="replace")
    except OSError as e:
        raise EngineNotFound("cannot start the DeSAM engine %r: %s. Install it as described in %s."
                             % (engine, e, INSTALL_HELP_URL))
    if on_start:
        on_start(proc)
    lines = queue.Queue()
    readers = [threading.Thread(target=_pump, args=(proc.stdout, lines, "out"), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, lines, "err"), daemon=True)]
    for t in readers:
        t.start()

    events, stderr_lines = [], []
    tracker = ProgressTracker()
    final_report, error_message = None, None
    open_streams = 2
    try:
        while open_streams:
            if cancel_event is not None and cancel_event.is_set():
                _stop(proc, kill_grace)
                raise Cancelled("Segmentation cancelled.")
            try:
                tag, line = lines.get(timeout=poll_interval)
            except queue.Empty:
                if on_idle:
                    on_idle()
                continue
            if line is None:
                open_streams -= 1
                continue
            if tag == "err":
                stderr_lines.append(line.rstrip("\n"))
                if on_log:
                    on_log(line.rstrip("\n"))
                continue
            event = parse_progress_line(line)
            if event is None:
                if on_log and line.strip():
                    on_log(line.rstrip("\n"))
                continue
            events.append(event)
            kind = event.get("event")
            if kind == "stage" and on_progress:
                stage = str(event.get("stage", ""))
                done, total = int(event.get("done", 0) or 0), int(event.get("total", 0) or 0)
                frac = tracker.update(stage, done, total)
                on_progress(Progress(stage, done, total, frac if frac is not None else 0.0, event))
            elif kind == "done":
                final_report = event.get("report") or {}
                if on_progress:
                    on_progress(Progress("done", 1, 1, 1.0, event))
            elif kind == "error":
                error_message = str(event.get("message", "")).strip()
        while proc.poll() is None:
            if cancel_event is not None and cancel_event.is_set():
                _stop(proc, kill_grace)
                raise Cancelled("Segmentation cancelled.")
            if on_idle:
                on_idle()
            time.sleep(poll_interval)
    except BaseException:
        if proc.poll() is None:
            _stop(proc, kill_grace)
        raise
    stderr_text = "\n".join(stderr_lines)
    if proc.returncode != 0 or error_message:
        msg = error_message or _engine_message_from_stderr(stderr_text) or (
            "the engine exited with status %s" % proc.returncode)
        raise EngineError("DeSAM engine failed: " + msg, proc.returncode, stderr_text[-4000:])
    if not os.path.isfile(output_path):
        raise EngineError("DeSAM engine reported success but wrote no mask at %s" % output_path,
                          proc.returncode, stderr_text[-4000:])
    if final_report is None and os.path.isfile(report_path):
        try:
            with open(report_path, "r", encoding="utf-8") as f:
                final_report = json.load(f)
        except (OSError, ValueError):
            final_report = None
    return Result(mask_path=output_path, report=final_report or {},
                  report_path=report_path if os.path.isfile(report_path) else None,
                  events=events, stderr=stderr_text)


def _stop(proc, grace):
    """Terminate the engine, then kill it if it has not gone after ``grace`` seconds."""
    try:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    except OSError:
        pass


def segment_array(engine, array_kji, ijk_to_ras, model_dir, workdir, mode="box", device="auto",
                  **kwargs):
    """Segment an in-memory volume: write NIfTI, run the engine, read the mask back on the same grid.

    Returns (mask array in KJI order as uint8, Result). Raises EngineError if the mask comes back on a
    different grid than the input (the module must never place a mask on the wrong voxels).
    """
    os.makedirs(workdir, exist_ok=True)
    input_path = os.path.join(workdir, "input.nii.gz")
    output_path = os.path.join(workdir, "mask.nii.gz")
    write_nifti(array_kji, ijk_to_ras, input_path)
    result = run_segmentation(engine, input_path, model_dir, output_path, mode=mode, device=device,
                              report_path=os.path.join(workdir, "report.json"), **kwargs)
    mask, mask_affine = read_nifti(output_path)
    _, written_affine = read_nifti(input_path)  # float32-rounded like the engine saw it
    if not same_grid(mask.shape, mask_affine, np.shape(array_kji), written_affine):
        raise EngineError("DeSAM engine returned a mask on a different grid (shape %s, expected %s)"
                          % (mask.shape, np.shape(array_kji)))
    return (mask > 0).astype(np.uint8), result


# ------------------------------------------------------------------------ writing a reviewed SEG
# The review state the Orthanc plugin stores and `desam-train pull` collects (its default).
REVIEWED_STATE = "reviewed"
REVIEWED_DESCRIPTION = "DeSAM prostate reviewed"


def build_write_seg_command(engine, series_dir, mask_path, output_path, creator, description,
                            algorithm_name="DeSAM", algorithm_version="reviewed"):
    """The ``desam write-seg`` command line: a MANUAL DICOM-SEG of ``mask_path`` over ``series_dir``."""
    return [engine, "write-seg", str(series_dir), "--mask", str(mask_path), "-o", str(output_path),
            "--creator", creator, "--description", description, "--algorithm-type", "manual",
            "--algorithm-name", algorithm_name, "--algorithm-version", algorithm_version]


def write_reviewed_seg(engine, series_dir, mask_kji, ijk_to_ras, output_path, reviewer,
                       description=REVIEWED_DESCRIPTION, algorithm_name="DeSAM", algorithm_version="reviewed",
                       timeout=600):
    """Writes a reviewed (MANUAL) DICOM-SEG of a corrected mask with the engine's own SEG writer.

    ``mask_kji`` lies on the grid ``ijk_to_ras`` (Slicer's volume); the engine places it on the DICOM
    series in ``series_dir`` by world coordinates. The SEG references that series, names ``reviewer`` as
    ContentCreatorName and gets a new SeriesInstanceUID. Returns the engine's JSON line (UIDs, voxels).
    """
    if not str(reviewer or "").strip():
        raise DeSAMError("Enter the reviewer's name before sending a reviewed segmentation.")
    mask_path = os.path.splitext(str(output_path))[0] + ".mask.nii.gz"
    write_nifti((np.asarray(mask_kji) > 0).astype(np.uint8), ijk_to_ras, mask_path)
    cmd = build_write_seg_command(engine, series_dir, mask_path, output_path, str(reviewer).strip(), description,
                                  algorithm_name, algorithm_version)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise EngineNotFound("cannot start the DeSAM engine %r: %s. Install it as described in %s."
                             % (engine, e, INSTALL_HELP_URL))
    if proc.returncode != 0:
        msg = _engine_message_from_stderr(proc.stderr) or "the engine exited with status %s" % proc.returncode
        raise EngineError("DeSAM could not write the reviewed SEG: " + msg, proc.returncode, proc.stderr[-4000:])
    for line in reversed(proc.stdout.splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    raise EngineError("DeSAM wrote no report for the reviewed SEG", proc.returncode, proc.stderr[-4000:])


def send_reviewed_to_orthanc(engine, backend, series_instance_uid, mask_kji, ijk_to_ras, reviewer, workdir,
                             state=REVIEWED_STATE, description=REVIEWED_DESCRIPTION, algorithm_name="DeSAM",
                             algorithm_version="reviewed"):
    """The "Send to Orthanc as reviewed" round trip: the MR series from Orthanc, a new MANUAL SEG of the
    corrected mask over it, ``POST /instances``, then the plugin's review route on the new SEG series.

    Nothing already stored is changed (the automatic SEG stays as it was). Returns a dict with the new
    SEG's Orthanc series and instance ids, its UIDs and the review route's answer.
    """
    os.makedirs(workdir, exist_ok=True)
    series_id = backend.find_series(series_instance_uid)
    series_dir = os.path.join(workdir, "series")
    backend.download_series(series_id, series_dir)
    out = os.path.join(workdir, "reviewed.dcm")
    written = write_reviewed_seg(engine, series_dir, mask_kji, ijk_to_ras, out, reviewer, description,
                                 algorithm_name, algorithm_version)
    with open(out, "rb") as f:
        stored = backend.upload_instance(f.read())
    seg_series = stored.get("ParentSeries")
    if not seg_series:
        raise OrthancError("Orthanc stored the reviewed SEG but named no series: %s" % stored)
    answer = backend.review(seg_series, str(reviewer).strip(), state)
    return {"seg_series": seg_series, "seg_instance": stored.get("ID"),
            "series_instance_uid": written.get("series_instance_uid"),
            "sop_instance_uid": written.get("sop_instance_uid"), "voxels": written.get("voxels"),
            "review": answer}


# ------------------------------------------------------------------------------ Orthanc backend
class OrthancBackend:
    """Segment a series held by an Orthanc server running the DeSAM plugin (urllib only)."""

    def __init__(self, url, username=None, password=None, timeout=30.0):
        if not url:
            raise OrthancError("No Orthanc URL configured.")
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._auth = None
        if username:
            token = base64.b64encode(("%s:%s" % (username, password or "")).encode("utf-8"))
            self._auth = "Basic " + token.decode("ascii")

    def _request(self, method, path, body=None, content_type="application/json", raw=False):
        data = None
        headers = {"Accept": "application/json" if not raw else "*/*"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
            headers["Content-Type"] = content_type
        if self._auth:
            headers["Authorization"] = self._auth
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            detail = ""
            try:
                text = e.read().decode("utf-8", "replace")
                j = json.loads(text)
                detail = j.get("Details") or j.get("Message") or j.get("error") or text
            except Exception:
                pass
            raise OrthancError("Orthanc %s %s failed: HTTP %d %s" % (method, path, e.code, detail or e.reason))
        except (urllib.error.URLError, OSError) as e:
            raise OrthancError("Cannot reach Orthanc at %s: %s" % (self.url, getattr(e, "reason", e)))
        if raw:
            return payload
        if not payload:
            return {}
        try:
            return json.loads(payload.decode("utf-8"))
        except ValueError:
            raise OrthancError("Orthanc %s %s returned non-JSON data" % (method, path))

    def system(self):
        return self._request("GET", "/system")

    def find_series(self, series_instance_uid):
        """Orthanc's id of the series with this SeriesInstanceUID (via /tools/lookup)."""
        hits = self._request("POST", "/tools/lookup", series_instance_uid.encode("ascii"),
                             content_type="text/plain")
        for h in hits or []:
            if h.get("Type") == "Series":
                return h["ID"]
        raise OrthancError("Series %s is not stored in Orthanc at %s" % (series_instance_uid, self.url))

    def start(self, series_id, model=None, mode=None, force=False):
        """Queue the series (body {"Mode", "Force"}; the plugin's configured model is used)."""
        body = {}
        if model:
            body["Model"] = model
        if mode:
            body["Mode"] = mode
        if force:
            body["Force"] = True
        return self._request("POST", "/desam/series/%s/segment" % urllib.parse.quote(series_id), body)

    def status(self, series_id):
        return self._request("GET", "/desam/series/%s" % urllib.parse.quote(series_id))

    @staticmethod
    def interpret_status(status):
        """(state, SEG instance id or None, report dict) from a ``GET /desam/series/{id}`` answer.

        The plugin answers ``{"Series", "Result": {"Status": done|empty|failed, "SegInstance",
        "VolumeMl", "QualityScore", "NeedsReview", "Error", ...} or null, "Queued", "Running"}``.
        state is "queued", "running", "done", "empty", "failed" or "unknown".
        """
        status = status or {}
        if status.get("Queued"):
            return "queued", None, {}
        if status.get("Running"):
            return "running", None, {}
        result = status.get("Result")
        if isinstance(result, dict):
            state = str(result.get("Status", "unknown")).lower()
            report = {"volume_ml": result.get("VolumeMl"), "quality": result.get("QualityScore"),
                      "flagged": bool(result.get("NeedsReview", status.get("NeedsReview", False))),
                      "model": {"name": result.get("ModelName", ""), "version": result.get("ModelVersion", "")}}
            report = {k: v for k, v in report.items() if v is not None}
            if state == "failed" and result.get("Error"):
                report["error"] = result["Error"]
            return state, result.get("SegInstance"), report
        # Older/other shapes: a flat state and a SEG id somewhere.
        state = str(status.get("State") or status.get("Status") or status.get("Phase") or "unknown").lower()
        return state, OrthancBackend.seg_instance(status), {}

    def wait(self, series_id, on_progress=None, cancel_event=None, poll_interval=1.0, timeout=3600.0,
             on_idle=None, first_poll_delay=0.5):
        """Poll the plugin until the job for the series is over; returns (SEG instance id, report)."""
        deadline = time.time() + timeout
        delay = first_poll_delay  # the job is queued by the POST; give the worker a moment
        while True:
            end = time.time() + delay
            while time.time() < end:
                if cancel_event is not None and cancel_event.is_set():
                    raise Cancelled("Segmentation cancelled (the Orthanc job keeps running on the server).")
                if on_idle:
                    on_idle()
                time.sleep(0.05)
            delay = poll_interval
            state, seg, report = self.interpret_status(self.status(series_id))
            if on_progress:
                on_progress(Progress(state, 0, 0, 1.0 if seg else 0.0, {"state": state}))
            if state in ("queued", "running"):
                pass
            elif seg:
                return seg, report
            elif state == "empty":
                raise OrthancError("Orthanc's DeSAM found no prostate in this series (no SEG stored).")
            elif state in ("failure", "failed", "error"):
                raise OrthancError("Orthanc DeSAM job failed: %s" % (report.get("error") or state))
            if time.time() > deadline:
                raise OrthancError("Timed out waiting for Orthanc to segment series %s" % series_id)

    @staticmethod
    def seg_instance(status):
        """The Orthanc instance id of the finished SEG named in a status JSON, if any."""
        for key in ("SegInstance", "SegInstanceId", "seg_instance", "Instance"):
            if status.get(key):
                return status[key]
        for key in ("SegInstances", "Segmentations"):  # a list: the newest SEG comes last
            value = status.get(key)
            if isinstance(value, list) and value:
                last = value[-1]
                return last.get("ID") or last.get("Instance") if isinstance(last, dict) else last
        seg = status.get("Seg") or status.get("seg") or status.get("Result") or {}
        if isinstance(seg, dict):
            for key in ("SegInstance", "Instance", "ID", "InstanceId", "instance"):
                if seg.get(key):
                    return seg[key]
        return None

    def download_series(self, series_id, folder):
        """Every instance of an Orthanc series into ``folder`` (created); returns the file paths."""
        os.makedirs(folder, exist_ok=True)
        info = self._request("GET", "/series/%s" % urllib.parse.quote(series_id))
        paths = []
        for n, instance in enumerate(info.get("Instances") or []):
            paths.append(self.download_instance(instance, os.path.join(folder, "%05d.dcm" % n)))
        if not paths:
            raise OrthancError("Series %s has no instances in Orthanc at %s" % (series_id, self.url))
        return paths

    def upload_instance(self, data):
        """``POST /instances``: stores one DICOM file; returns Orthanc's answer (ID, ParentSeries, ...)."""
        return self._request("POST", "/instances", data, content_type="application/dicom")

    def review(self, seg_series_id, reviewer, state=REVIEWED_STATE):
        """Marks a SEG series with the plugin's review route (the state ``desam-train pull`` collects)."""
        return self._request("POST", "/desam/series/%s/review" % urllib.parse.quote(seg_series_id),
                             {"State": state, "Reviewer": reviewer})

    def download_instance(self, instance_id, path):
        data = self._request("GET", "/instances/%s/file" % urllib.parse.quote(instance_id), raw=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def segment_series(self, series_instance_uid, out_path, model=None, mode=None, on_progress=None,
                       cancel_event=None, on_idle=None, poll_interval=1.0, timeout=3600.0):
        """Whole round trip: look the series up, start the job, wait, download the SEG to out_path."""
        series_id = self.find_series(series_instance_uid)
        self.start(series_id, model=model, mode=mode)
        seg, report = self.wait(series_id, on_progress, cancel_event, poll_interval, timeout, on_idle)
        self.download_instance(seg, out_path)
        return report
