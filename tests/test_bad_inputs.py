"""The bad-input table: every case runs launch.py as a new user would and must end in one clear line.

Error cases: non-zero exit, the last stderr line starts with ``error:`` and names the cause (key,
file or value), no ``Traceback`` on stderr (``--verbose`` alone shows one), and an earlier
finished trial (one tiny make-it-3d run shared by the module) is byte-identical afterwards.
Valid inputs (image formats, a tiny object, an object touching the border) must work; the last two
with a warning. Cases run two at a time (the table is ~40 interpreter start-ups); the ones that point
at the finished trial run one after another in a chain of their own, each followed by the
byte-identical check.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "tiny", "make-it-3d.yaml")
# the tiny make-it-3d pipeline at its smallest: a few steps, no test/export after training
FAST = ["use_timestamp=false", "after_train=[]",
        "stage.coarse.trainer.max_steps=2", "stage.coarse.checkpoint.every_n_train_steps=1",
        "stage.coarse.trainer.log_every_n_steps=1",
        "stage.refine.trainer.max_steps=1", "stage.refine.checkpoint.every_n_train_steps=1"]
SIZE = 64  # side of the generated photos
OBJ = (200, 30, 30)  # object colour of the generated photos
BG = (20, 120, 220)


def env():
    return dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def cli(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch.py"), *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def snapshot(folder: str) -> Dict[str, str]:
    """sha256 of every file (run.lock aside: it names the process using the trial, empty at rest)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if f == "run.lock" and dirpath == folder:
                continue
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- inputs
def square_mask(h=SIZE, w=SIZE):
    m = np.zeros((h, w), np.uint8)
    m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    return m


def rgb_photo(h=SIZE, w=SIZE, obj=OBJ):
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    img[square_mask(h, w) > 0] = obj
    return img


def rgba_photo(h=SIZE, w=SIZE, box=None, obj=OBJ):
    img = np.zeros((h, w, 4), np.uint8)
    t, l, b, r = box or (h // 4, w // 4, 3 * h // 4, 3 * w // 4)
    img[t:b, l:r] = (*obj, 255)
    return img


def make_inputs(d: str) -> None:
    save = lambda name, arr, **kw: Image.fromarray(arr).save(os.path.join(d, name), **kw)  # noqa: E731
    save("mask.png", square_mask())
    # broken files
    buf = os.path.join(d, "good.png")
    save("good.png", rgb_photo())
    with open(buf, "rb") as f:
        data = f.read()
    with open(os.path.join(d, "corrupt.png"), "wb") as f:
        f.write(data[: len(data) // 2])  # a PNG cut in half
    with open(os.path.join(d, "text.png"), "w") as f:
        f.write("this is a text file, not a picture\n")
    save("empty_alpha.png", np.zeros((SIZE, SIZE, 4), np.uint8))
    save("one_px.png", np.full((1, 1, 3), 128, np.uint8))
    save("white.png", np.full((SIZE, SIZE, 3), 255, np.uint8))
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    save("gradient.png", np.stack([np.tile(ramp, (SIZE, 1))] * 3, -1).astype(np.uint8))
    os.makedirs(os.path.join(d, "a_folder.png"))
    os.makedirs(os.path.join(d, "other"))
    save("other/rgba.png", rgba_photo(obj=(30, 200, 30)))
    with open(os.path.join(d, "bad.yaml"), "w") as f:
        f.write("extends: %s\nname: broken\ndata:\n  image_path: load/synthetic/rgba.png\n   heights: [32]\n"
                % CONFIG)
    with open(os.path.join(d, "stray.ckpt"), "wb") as f:
        f.write(b"PK\x03\x04 not really a checkpoint")
    # valid images in unusual formats
    gray = np.full((SIZE, SIZE), 50, np.uint8)
    gray[square_mask() > 0] = 200
    save("gray.png", gray)
    g16 = np.full((SIZE, SIZE), 10000, np.uint16)
    g16[square_mask() > 0] = 50000
    Image.fromarray(g16).save(os.path.join(d, "gray16.png"))
    assert Image.open(os.path.join(d, "gray16.png")).mode.startswith("I")
    pal = Image.fromarray((square_mask() > 0).astype(np.uint8), mode="L").convert("P")
    pal.putpalette([0, 0, 0, *OBJ] + [0] * 762)
    pal.save(os.path.join(d, "palette.png"), transparency=0)
    Image.fromarray(rgb_photo()).convert("CMYK").save(os.path.join(d, "cmyk.jpg"), quality=95)
    assert Image.open(os.path.join(d, "cmyk.jpg")).mode == "CMYK"
    # EXIF orientation 6: the file stores the picture turned; viewers (and it3d) turn it upright.
    # Upright: 48 wide x 64 tall, a red top half and a green bottom half on blue, with its mask.
    up = np.empty((64, 48, 3), np.uint8)
    up[:] = BG
    up[8:32, 8:40] = OBJ
    up[32:56, 8:40] = (30, 200, 30)
    m = np.zeros((64, 48), np.uint8)
    m[8:56, 8:40] = 255
    save("exif_mask.png", m)
    stored = Image.fromarray(up).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(os.path.join(d, "exif.jpg"), exif=exif, quality=95)
    from PIL import ImageOps

    assert np.abs(np.asarray(ImageOps.exif_transpose(Image.open(os.path.join(d, "exif.jpg")))).astype(int)
                  - up).mean() < 8
    save("rgba.webp", rgba_photo(), lossless=True)
    save("tiny_object.png", rgba_photo(256, 256, box=(123, 123, 133, 133)))  # 100 px of 65536: 0.15 %
    save("at_border.png", rgba_photo(box=(16, 0, 48, 30)))  # touches the left edge


# ----------------------------------------------------------------------------- checks of valid runs
def framed(res) -> np.ndarray:
    """The preprocessing stage's framed RGBA of the case's trial."""
    pre = os.path.join(res.trial, "preprocess")
    (name,) = [f for f in os.listdir(pre) if f.endswith("_rgba.png")]
    return np.asarray(Image.open(os.path.join(pre, name))).astype(int)


def centre_colour(res, expected, tol=8):
    rgba = framed(res)
    c = rgba.shape[0] // 2
    assert rgba[c, c, 3] > 250 and rgba[2, 2, 3] == 0, "object in the middle, nothing in the corner"
    assert np.abs(rgba[c - 3:c + 3, c - 3:c + 3, :3].mean((0, 1)) - np.array(expected)).max() <= tol, \
        rgba[c, c]


def exif_upright(res):
    rgba = framed(res)
    s = rgba.shape[0]
    top, bottom = rgba[int(s * 0.3), s // 2, :3], rgba[int(s * 0.7), s // 2, :3]
    # upright: red over green (unturned it would be the stored, sideways picture: red left of green)
    assert np.abs(top - OBJ).max() <= 12 and np.abs(bottom - (30, 200, 30)).max() <= 12, (top, bottom)


# ----------------------------------------------------------------------------- the table
@dataclass
class Case:
    id: str
    args: List[str]
    expect: Optional[str] = None  # substring of the error line; None: the run must succeed
    warn: Optional[str] = None  # substring of a warning line (successful runs)
    check: Optional[Callable] = None  # check(result) for successful runs
    finished: bool = False  # points at the shared finished trial: run in the serial chain
    config: List[str] = field(default_factory=lambda: ["--config", CONFIG])
    mode: str = "--train"


def img(name):
    return "data.image_path={in}/" + name


CASES = [
    # --- command line and config files
    Case("unknown-key", ["stage.coarse.system.no_such_key=1"], "unknown config key 'system.no_such_key'"),
    Case("unknown-guidance", ["stage.coarse.system.guidance.clip_d.type=clip-dd"],
         "guidance 'clip-dd' not found; did you mean 'clip-d'?"),
    Case("yaml-syntax", [], "line 5, column 11", config=["--config", "{in}/bad.yaml"]),
    Case("config-missing", [], "config file not found: {in}/nope.yaml", config=["--config", "{in}/nope.yaml"]),
    Case("two-modes", ["--test"], "not allowed with argument --train"),
    Case("unknown-flag", ["--trian"], "unknown flag --trian"),
    Case("bad-gpu", ["--gpu", "zero"], "--gpu zero"),
    Case("override-syntax", ["stage.coarse.trainer.max_steps"], "bad override 'stage.coarse.trainer.max_steps'"),
    Case("missing-image-key", [], "missing required value 'data.image_path'",
         config=["--config", os.path.join(ROOT, "configs", "make-it-3d.yaml")]),
    Case("seed-abc", ["seed=abc"], "'seed'"),
    Case("seed-negative", ["seed=-1"], "seed"),
    Case("max-steps-abc", ["stage.coarse.trainer.max_steps=abc"], "trainer.max_steps"),
    Case("max-steps-negative", ["stage.coarse.trainer.max_steps=-5"], "trainer.max_steps"),
    Case("trainer-callbacks", ["stage.coarse.trainer.callbacks=[]"], "trainer.callbacks"),
    Case("probability-range", ["stage.coarse.data.ref_prob=1.5"], "data.ref_prob"),
    Case("resolution-zero", ["stage.coarse.data.heights=[0]"], "data.heights"),
    Case("bad-schedule", ["stage.coarse.system.guidance.clip_d.min_step_percent=[100,0.5,0.2,10]"],
         "system.guidance.clip_d.min_step_percent: schedule [start, v0, v1, end] needs 0 <= start <= end"),
    Case("after-train-mode", ["after_train=[tset]"], "after_train"),
    # --- the image
    Case("image-missing", [img("nope.png")], "image not found: {in}/nope.png"),
    Case("image-directory", [img("a_folder.png")], "{in}/a_folder.png is a directory"),
    Case("image-corrupt", [img("corrupt.png")], "cannot read image {in}/corrupt.png"),
    Case("image-text", [img("text.png")], "cannot read image {in}/text.png"),
    Case("image-1x1", [img("one_px.png")], "{in}/one_px.png is 1x1 pixels"),
    Case("alpha-empty", [img("empty_alpha.png")], "empty"),
    Case("all-white", [img("white.png")], "no object in {in}/white.png"),
    Case("no-object-segmented", [img("gradient.png"), "data.preprocess.mask.max_area=0.3"],
         "no object could be segmented in {in}/gradient.png"),
    Case("mask-missing", [img("good.png"), "data.mask_path={in}/nope_mask.png"], "{in}/nope_mask.png"),
    # --- checkpoints and trial dirs
    Case("export-untrained", [], "run --train first", mode="--export"),
    Case("resume-missing", ["resume={in}/nope.ckpt"], "resume: not found: {in}/nope.ckpt"),
    Case("resume-outside-trial", ["resume={tmp}/a/b/c/stray.ckpt"], "not inside a trial dir"),
    Case("resume-truncated", ["resume={tmp}/copy/coarse/ckpts/last.ckpt"], "unreadable"),
    Case("weights-truncated", ["stage.coarse.system.weights={in}/stray.ckpt"], "unreadable"),
    Case("changed-config", ["exp_root_dir={fin_root}", "tag=synthetic", "data.image_path={in}/other/rgba.png"],
         "finished with a different config", finished=True),
    Case("changed-steps", ["trial_dir={fin}", "stage.coarse.trainer.max_steps=3"],
         "trainer.max_steps: 2 -> 3", finished=True),
    Case("no-such-stage", ["--stage", "coarze"], "did you mean 'coarse'", mode="--export",
         config=["--config", "{fin}/configs/parsed.yaml"], finished=True),
    # --- valid inputs that must work (--preprocess: the whole reading / framing path, in seconds)
    Case("grayscale", [img("gray.png"), "data.mask_path={in}/mask.png"], mode="--preprocess",
         check=lambda r: centre_colour(r, (200, 200, 200))),
    Case("png-16-bit", [img("gray16.png"), "data.mask_path={in}/mask.png"], mode="--preprocess",
         check=lambda r: centre_colour(r, (194.5,) * 3, tol=2)),
    Case("png-palette", [img("palette.png")], mode="--preprocess", check=lambda r: centre_colour(r, OBJ, tol=1)),
    Case("jpeg-cmyk", [img("cmyk.jpg"), "data.mask_path={in}/mask.png"], mode="--preprocess",
         check=lambda r: centre_colour(r, OBJ, tol=12)),
    Case("jpeg-exif-rotated", [img("exif.jpg"), "data.mask_path={in}/exif_mask.png"], mode="--preprocess",
         check=exif_upright),
    Case("webp", [img("rgba.webp")], mode="--preprocess", check=lambda r: centre_colour(r, OBJ, tol=1)),
    Case("tiny-object", [img("tiny_object.png")], mode="--preprocess", warn="covers only 0.15% of the photo",
         check=lambda r: centre_colour(r, OBJ, tol=2)),
    Case("object-at-border", [img("at_border.png")], mode="--preprocess", warn="touches the left edge",
         check=lambda r: centre_colour(r, OBJ, tol=2)),
]
ERRORS = [c for c in CASES if c.expect is not None]


@dataclass
class Result:
    case: Case
    proc: subprocess.CompletedProcess
    trial: str
    fmt: Callable[[str], str]
    finished_changed: List[str]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("finished"))
    r = cli("--config", CONFIG, "--train", f"exp_root_dir={root}", *FAST)
    assert r.returncode == 0, r.stderr[-3000:]
    trial = os.path.join(root, "tiny-make-it-3d", "synthetic")
    assert os.path.isfile(os.path.join(trial, "refine", "stats.json"))
    return trial


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("inputs"))
    make_inputs(d)
    return d


def _prepare(case: Case, tmp: str, inputs: str, fin: str):
    def fmt(s: str) -> str:
        return (s.replace("{in}", inputs).replace("{tmp}", tmp).replace("{fin_root}", os.path.dirname(os.path.dirname(fin)))
                .replace("{fin}", fin))

    os.makedirs(tmp, exist_ok=True)
    if case.id == "resume-outside-trial":
        os.makedirs(os.path.join(tmp, "a", "b", "c"))
        shutil.copy(os.path.join(inputs, "stray.ckpt"), os.path.join(tmp, "a", "b", "c", "stray.ckpt"))
    if case.id == "resume-truncated":  # an interrupted copy of the finished trial whose coarse checkpoint is cut
        shutil.copytree(fin, os.path.join(tmp, "copy"))
        os.remove(os.path.join(tmp, "copy", "coarse", "stats.json"))
        os.remove(os.path.join(tmp, "copy", "refine", "stats.json"))
        ck = os.path.join(tmp, "copy", "coarse", "ckpts", "last.ckpt")
        with open(ck, "rb") as f:
            data = f.read()
        with open(ck, "wb") as f:
            f.write(data[: len(data) // 3])
    args = [fmt(a) for a in case.config] + [case.mode] + [fmt(a) for a in case.args]
    if not case.finished and not any(a.startswith(("exp_root_dir=", "trial_dir=")) for a in case.args):
        args.append(f"exp_root_dir={tmp}/out")
    if case.config[1] == CONFIG:
        args += [a for a in FAST if a.split("=")[0] not in {c.split("=")[0] for c in case.args}]
    return args, fmt


def _trial_of(tmp: str) -> str:
    out = os.path.join(tmp, "out", "tiny-make-it-3d")
    subs = os.listdir(out) if os.path.isdir(out) else []
    return os.path.join(out, subs[0]) if len(subs) == 1 else ""


@pytest.fixture(scope="module")
def outcomes(request, finished, inputs, tmp_path_factory) -> Dict[str, Result]:
    """Runs the selected cases (two processes at a time); the finished-trial cases run in one serial chain."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [c for c in CASES if c.id in wanted]
    before = snapshot(finished)
    base = str(tmp_path_factory.mktemp("cases"))

    def run_one(case: Case) -> Result:
        tmp = os.path.join(base, case.id)
        args, fmt = _prepare(case, tmp, inputs, finished)
        proc = cli(*args)
        after = snapshot(finished)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return Result(case, proc, _trial_of(tmp), fmt, changed)

    def chain(cs):
        return [run_one(c) for c in cs]

    serial = [c for c in cases if c.finished]
    free = [c for c in cases if not c.finished]
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [pool.submit(chain, serial)] + [pool.submit(run_one, c) for c in free]
        results = [r for j in jobs for r in (j.result() if isinstance(j.result(), list) else [j.result()])]
    table = os.environ.get("IT3D_BAD_INPUTS_TABLE")  # write the table of messages (for a report) there
    if table:
        with open(table, "w") as f:
            for r in results:
                lines = [ln for ln in r.proc.stderr.splitlines() if ln.startswith(("error:", "[WARNING]"))]
                short = lambda t: t.replace(inputs, "IN").replace(finished, "FIN").replace(base, "TMP")  # noqa: E731
                f.write(f"| {r.case.id} | {r.proc.returncode} | {' / '.join(short(ln) for ln in lines)} |\n")
    return {r.case.id: r for r in results}


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.id)
def test_bad_input_one_line(case, outcomes):
    r = outcomes[case.id]
    err = r.proc.stderr
    line = last_line(err)
    assert r.proc.returncode != 0, f"exit 0\n{err[-3000:]}"
    assert line.startswith("error: "), err[-3000:]
    assert r.fmt(case.expect) in line, line
    assert "Traceback" not in err, err[-3000:]
    assert not r.finished_changed, f"the finished trial changed: {r.finished_changed}"


@pytest.mark.parametrize("case", [c for c in CASES if c.expect is None], ids=lambda c: c.id)
def test_valid_input_works(case, outcomes):
    r = outcomes[case.id]
    err = r.proc.stderr
    assert r.proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    warnings = [ln for ln in err.splitlines() if ln.startswith("[WARNING]")]
    if case.warn:
        assert any(case.warn in ln for ln in warnings), err[-3000:]
    else:
        assert not warnings, warnings
    case.check(r)
    assert not r.finished_changed


def test_verbose_shows_the_traceback(inputs, tmp_path):
    r = cli("--config", CONFIG, "--train", "--verbose", f"exp_root_dir={tmp_path}", f"data.image_path={inputs}/text.png",
            *FAST)
    assert r.returncode == 1 and "Traceback" in r.stderr
    assert last_line(r.stderr).startswith(f"error: cannot read image {inputs}/text.png")


def test_finished_trial_lock_is_free_again(finished, outcomes):
    assert os.path.getsize(os.path.join(finished, "run.lock")) == 0  # released by every run that took it


def test_resume_outside_trial_creates_nothing(outcomes):
    r = outcomes["resume-outside-trial"]
    tmp = os.path.dirname(os.path.dirname(os.path.dirname(r.fmt("{tmp}/a/b/c"))))
    assert sorted(os.listdir(os.path.join(tmp, "a"))) == ["b"]
    assert not os.path.exists(os.path.join(tmp, "out"))


def test_config_errors_create_no_trial(outcomes):
    for cid in ("unknown-key", "max-steps-abc", "max-steps-negative", "probability-range", "image-missing",
                "image-1x1", "image-text", "all-white"):
        if cid in outcomes:
            assert not os.path.exists(outcomes[cid].fmt("{tmp}/out")), cid
