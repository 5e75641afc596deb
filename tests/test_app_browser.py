"""The web app in a real headless Chromium (selenium + Debian's chromedriver), on the tiny Make-It-3D config:
bad uploads are refused in the page; a photo goes in; progress advances (stage, step / total, validation
view); the 3D view loads the GLB; the download link returns the trial's GLB; the other downloads are whole.

Set ``IT3D_APP_SCREENSHOT=path.png`` to keep the screenshot of the finished page.
"""
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zipfile

import numpy as np
import pytest
from PIL import Image

from it3d.eval import runner

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# the tiny config, shorter still: 4 coarse steps (validation at 2 and 4), 2 refine steps; coarse skips its own
# turntable and export (the page shows the last stage's)
OVERRIDES = ["stage.coarse.trainer.max_steps=4", "stage.coarse.trainer.val_check_interval=2",
             "stage.coarse.checkpoint.every_n_train_steps=2", "stage.coarse.after_train=[]",
             "stage.refine.trainer.max_steps=2", "stage.refine.trainer.val_check_interval=2",
             "stage.refine.checkpoint.every_n_train_steps=2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path):
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("chromium / chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium")
    pytest.importorskip("gradio")
    port = free_port()
    log = open(tmp_path / "app.log", "w")
    env = dict(os.environ, PYTHONPATH=runner.CUSTOM_DIR, GRADIO_ANALYTICS_ENABLED="False",
               GRADIO_TEMP_DIR=str(tmp_path / "gradio"))
    proc = subprocess.Popen([sys.executable, "-m", "it3d.app", "--tiny", "--out", str(tmp_path / "out"),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=runner.REPO_ROOT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail("the app did not start:\n" + (tmp_path / "app.log").read_text()[-3000:])
            time.sleep(0.5)
    yield url, tmp_path / "out", tmp_path / "app.log"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1900",
              "--use-angle=swiftshader", "--enable-unsafe-swiftshader",  # WebGL for the 3D view, on the CPU
              "--disable-background-networking", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(a)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def wait(fn, timeout, what, every=0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def css(d, sel):
    from selenium.webdriver.common.by import By

    return d.find_elements(By.CSS_SELECTOR, sel)


def upload(d, url, path):
    d.get(url)
    wait(lambda: css(d, "#it3d-photo input[type=file]"), 60, "the upload field")
    css(d, "#it3d-photo input[type=file]")[0].send_keys(str(path))


def message(d):
    return " ".join(e.text for e in css(d, "#it3d-message p"))


def status(d):
    return d.execute_script("var e = document.getElementById('it3d-status'); return e ? Object.assign({}, e.dataset) "
                            ": null;")


@pytest.mark.slow
def test_upload_progress_3d_view_and_downloads(app, browser, tmp_path):
    url, out, app_log = app
    d = browser
    # -- bad uploads: a clear message in the page, no run
    (tmp_path / "notes.txt").write_text("not a photo")
    upload(d, url, tmp_path / "notes.txt")
    wait(lambda: "notes.txt is not an image" in message(d), 30, "the not-an-image message")
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(tmp_path / "empty.png")
    upload(d, url, tmp_path / "empty.png")
    wait(lambda: "no object found in empty.png" in message(d), 30, "the no-object message")
    assert not os.path.isdir(out / "runs") or os.listdir(out / "runs") == []

    # -- a photo, the tiny preset (preselected with --tiny), short settings, Start
    photo = tmp_path / "toy cat.png"
    shutil.copyfile(os.path.join(runner.REPO_ROOT, "load", "synthetic", "rgba.png"), photo)
    upload(d, url, photo)
    d.execute_script("performance.setResourceTimingBufferSize(100000);")  # the page polls every second for minutes
    wait(lambda: any(e.get_attribute("src") for e in css(d, "#it3d-preview img")), 30, "the photo's preview")
    assert message(d) == ""
    from selenium.webdriver.common.by import By

    d.find_element(By.XPATH, "//*[contains(@class, 'label-wrap')][contains(., 'Advanced settings')]").click()
    wait(lambda: css(d, "#it3d-advanced textarea") and css(d, "#it3d-advanced textarea")[0].is_displayed(), 10,
         "the advanced settings")
    css(d, "#it3d-advanced textarea")[0].send_keys("\n".join(OVERRIDES))
    css(d, "#it3d-start")[0].click()
    wait(lambda: "queued" in message(d), 30, "the queued message")

    # -- live progress, read from the page every 0.3 s until the run is done
    seen, val_seen = [], False
    deadline = time.time() + 900
    while time.time() < deadline:
        st = status(d) or {}
        key = (st.get("state"), st.get("stage"), st.get("phase"), st.get("step"), st.get("total"))
        if not seen or seen[-1] != key:
            seen.append(key)
        val_seen = val_seen or any(e.get_attribute("src") for e in css(d, "#it3d-val img"))
        if st.get("state") in ("done", "failed", "cancelled", "interrupted"):
            break
        time.sleep(0.3)
    print("progress seen in the page:", *seen, sep="\n  ")
    job = os.listdir(out / "runs")[0]
    assert seen[-1][0] == "done", (seen, (out / "runs" / job / "logs" / "app-worker.log").read_text()[-3000:])
    training = [(stage, int(step), int(total)) for state, stage, phase, step, total in seen
                if state == "running" and phase == "train" and step and total]
    # the page polls every 0.3 s, so it may miss a stage's last step; the stages themselves ran every step
    for stage, n in (("coarse", 4), ("refine", 2)):
        times = json.loads((out / "runs" / job / "trial" / stage / "logs" / "step_times.json").read_text())
        assert times["steps"] == n, (stage, times)
    assert all(t == {"coarse": 4, "refine": 2}[s] for s, _, t in training), training  # the settings took effect
    order = [("preprocess", "coarse", "refine").index(s) * 100 + k for s, k, _ in training]
    assert order == sorted(order) and len(set(order)) >= 2, training  # it advanced, never back
    assert val_seen, "no validation view was shown while it ran"

    # -- the 3D view fetched the GLB and draws it
    wait(lambda: css(d, "#it3d-model canvas"), 60, "the 3D view's canvas")
    glbs = wait(lambda: d.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"
                                         ".filter(n => n.toLowerCase().includes('.glb'));"), 60, "the GLB request")
    canvas = css(d, "#it3d-model canvas")[0]
    time.sleep(2)
    px = np.asarray(Image.open(io.BytesIO(canvas.screenshot_as_png)).convert("RGB")).astype(np.float32)
    assert px.std() > 3 and len(np.unique(px.reshape(-1, 3) // 8, axis=0)) > 20, "the 3D view is blank"
    # -- the turntable plays
    wait(lambda: d.execute_script("var v = document.querySelector('#it3d-video video'); "
                                  "return v && v.readyState >= 2;"), 60, "the turntable's first frame")

    # -- downloads: the GLB link returns the trial's GLB, and the other files are whole
    links = wait(lambda: {e.get_attribute("href").split("/")[-1].split("?")[0]: e.get_attribute("href")
                          for e in css(d, "#it3d-downloads a[href]") if "file=" in (e.get_attribute("href") or "")
                          } if len(css(d, "#it3d-downloads a[href]")) >= 4 else None, 60, "four download links")
    names = sorted(links)
    assert names == ["toy_cat.glb", "toy_cat.ply", "toy_cat_obj.zip", "toy_cat_report.zip"], names
    glb = urllib.request.urlopen(links["toy_cat.glb"], timeout=30).read()
    trial_glb = (out / "runs" / job / "trial" / "refine" / "save" / "export" / "mesh.glb").read_bytes()
    assert glb == trial_glb  # the download is the trial's GLB ...
    assert urllib.request.urlopen(glbs[-1], timeout=30).read() == trial_glb  # ... and so is what the 3D view shows
    magic, version, length = struct.unpack("<4sII", glb[:12])
    assert (magic, version, length) == (b"glTF", 2, len(glb))
    chunk_len, chunk_type = struct.unpack("<I4s", glb[12:20])
    gltf = json.loads(glb[20:20 + chunk_len])
    assert chunk_type == b"JSON" and gltf["meshes"] and gltf["accessors"][0]["count"] > 0
    obj = zipfile.ZipFile(io.BytesIO(urllib.request.urlopen(links["toy_cat_obj.zip"], timeout=30).read()))
    assert sorted(obj.namelist()) == ["mesh.mtl", "mesh.obj", "mesh_texture.png"]
    assert "map_Kd mesh_texture.png" in obj.read("mesh.mtl").decode()
    ply = urllib.request.urlopen(links["toy_cat.ply"], timeout=30).read()
    assert ply.startswith(b"ply\n") and b"element vertex" in ply[:400]
    rep = zipfile.ZipFile(io.BytesIO(urllib.request.urlopen(links["toy_cat_report.zip"], timeout=30).read()))
    html = rep.read("report.html").decode()
    # the report is self-contained: the input photo and the turntable are embedded (data URIs), nothing to unzip
    assert "<video" in html and 'src="data:image/png;base64,' in html and 'src="data:video/mp4;base64,' in html

    shot = tmp_path / "finished.png"
    d.save_screenshot(str(shot))
    img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float32)
    assert img.std() > 10
    if os.environ.get("IT3D_APP_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["IT3D_APP_SCREENSHOT"])
    assert "Traceback" not in app_log.read_text()
