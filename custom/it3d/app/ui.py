"""The page: upload or pick a photo, choose a method and a preset, start; watch; turn it around; download.

Every second a timer re-reads the selected run's files (:mod:`it3d.app.status`) and refreshes the status
(stage, step / total, elapsed, ETA, queue position), the latest validation view and, once they exist, the
turntable, the 3D view of the GLB and the downloads. The runs list holds every job in ``<out>/runs``, so
after a restart of the app (or of the machine) a run is selected again, and Resume continues its trial.
"""
from __future__ import annotations

import html
import os
from typing import Dict, List, Optional

import gradio as gr

from ..core.errors import It3dError
from . import jobs, presets, status

CSS = "#it3d-message .err{color:#b00;font-weight:600} #it3d-message .ok{color:#060}"


def _msg(text: str, ok: bool = False) -> str:
    return f'<p class="{"ok" if ok else "err"}">{html.escape(text)}</p>' if text else ""


def _label(out: str, job_id: str) -> str:
    job = jobs.read_json(os.path.join(jobs.runs_dir(out), job_id, "job.json"), {}) or {}
    method = next((k for k, v in presets.METHODS.items() if v == job.get("method")), job.get("method"))
    return f"{job_id} ({method}, {job.get('preset')})"


def build(sched: jobs.Scheduler, examples: List[str], tiny: bool = False) -> gr.Blocks:
    out = sched.out
    preset_names = presets.preset_names(tiny)

    def choices():
        return [(_label(out, j), j) for j in jobs.list_jobs(out)]

    def on_photo(path: Optional[str]):
        if not path:
            return None, ""
        try:
            jobs.check_photo(path)
        except It3dError as e:
            return None, _msg(str(e))
        return path, ""

    def on_start(path: Optional[str], method: str, preset: str, advanced: str):
        if not path:
            return gr.skip(), _msg("upload a photo (or pick an example) first")
        lines = [ln.strip() for ln in (advanced or "").splitlines()]
        overrides = [ln for ln in lines if ln and not ln.startswith("#")]
        try:
            job_id = jobs.new_job(out, path, presets.METHODS[method], preset, overrides, os.path.basename(path))
            sched.submit(job_id)
        except It3dError as e:
            return gr.skip(), _msg(str(e))
        return gr.update(choices=choices(), value=job_id), _msg(f"run {job_id} queued", ok=True)

    def on_cancel(job_id: Optional[str]):
        if not job_id:
            return _msg("no run selected")
        return _msg(f"run {job_id} cancelled", ok=True) if sched.cancel(job_id) else \
            _msg(f"run {job_id} is not queued or running")

    def on_resume(job_id: Optional[str]):
        if not job_id:
            return _msg("no run selected")
        state = sched.state(job_id)["state"]
        if state not in ("failed", "cancelled", "interrupted", "new"):
            return _msg(f"run {job_id} is {state}: nothing to resume")
        try:
            sched.submit(job_id)
        except It3dError as e:
            return _msg(str(e))
        return _msg(f"run {job_id} resumes its trial", ok=True)

    def refresh(job_id: Optional[str], shown: Dict, known: List):
        """-> status, validation image, turntable, 3D view, downloads, shown, runs list, known ids."""
        ids = jobs.list_jobs(out)
        runs_update = gr.update(choices=choices()) if ids != known else gr.skip()
        if not job_id or job_id not in ids:
            return (status.status_html(None), None, None, None, None, {}, runs_update, ids)
        run_dir = sched.run_dir(job_id)
        v = status.view(run_dir, sched.state(job_id))
        res = status.results(run_dir)
        new = {"job": job_id, "val": _stamp(v.get("val_image")), "video": _stamp(res["turntable"]),
               "glb": _stamp(res["glb"]), "files": [_stamp(p) for p in res.values()]}
        same = shown.get("job") == job_id
        val = gr.skip() if same and shown.get("val") == new["val"] else v.get("val_image")
        video = gr.skip() if same and shown.get("video") == new["video"] else res["turntable"]
        model = gr.skip() if same and shown.get("glb") == new["glb"] else res["glb"]
        files = gr.skip()
        if not (same and shown.get("files") == new["files"]):
            stem = os.path.splitext(os.path.basename(jobs.load_job(run_dir)["image"]))[0]
            files = status.downloads(run_dir, stem) or None
        return status.status_html(v), val, video, model, files, new, runs_update, ids

    with gr.Blocks(title="it3d: one photo to a 3D asset", analytics_enabled=False) as demo:
        gr.Markdown("# it3d: one photo to a 3D asset\nMake-It-3D and Customize-It-3D. Upload a photo of one "
                    "object (RGBA with a transparent background, or a plain photo: the object is found "
                    "automatically), choose a method and a preset, press Start.")
        shown, known = gr.State({}), gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                photo = gr.File(label="Photo", file_count="single", type="filepath", elem_id="it3d-photo")
                preview = gr.Image(label="Your photo", type="filepath", interactive=False, height=220,
                                   elem_id="it3d-preview")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[photo], label="Examples")
                method = gr.Radio(list(presets.METHODS), value="Make-It-3D", label="Method", elem_id="it3d-method")
                preset = gr.Radio(preset_names, value="tiny" if tiny else "preview", label="Preset",
                                  info="; ".join(f"{p}: {presets.PRESETS[p]}" for p in preset_names),
                                  elem_id="it3d-preset")
                with gr.Accordion("Advanced settings", open=False):
                    advanced = gr.Textbox(lines=4, label="key=value, one per line (any config key)",
                                          placeholder="stage.coarse.trainer.max_steps=2000\nseed=1",
                                          elem_id="it3d-advanced")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="it3d-start")
                    cancel = gr.Button("Cancel", elem_id="it3d-cancel")
                    resume = gr.Button("Resume", elem_id="it3d-resume")
                message = gr.HTML("", elem_id="it3d-message")
            with gr.Column(scale=2):
                runs = gr.Dropdown(choices=choices(), value=None, label="Runs (every run in the output folder)",
                                   elem_id="it3d-runs")
                status_box = gr.HTML(status.status_html(None), elem_id="it3d-status-box")
                val_image = gr.Image(label="Latest validation view", type="filepath", interactive=False, height=200,
                                     elem_id="it3d-val")
                with gr.Row():
                    video = gr.Video(label="Turntable", interactive=False, autoplay=True, loop=True,
                                     elem_id="it3d-video")
                    model = gr.Model3D(label="3D model (GLB)", elem_id="it3d-model", height=360)
                files = gr.File(label="Downloads: GLB, OBJ (zip), PLY, report (zip)", file_count="multiple",
                                interactive=False, elem_id="it3d-downloads")
        timer = gr.Timer(1.0)
        photo.change(on_photo, [photo], [preview, message])
        start.click(on_start, [photo, method, preset, advanced], [runs, message])
        cancel.click(on_cancel, [runs], [message])
        resume.click(on_resume, [runs], [message])
        outs = [status_box, val_image, video, model, files, shown, runs, known]
        timer.tick(refresh, [runs, shown, known], outs, show_progress="hidden")
        runs.change(refresh, [runs, gr.State({}), known], outs, show_progress="hidden")
    return demo


def _stamp(path: Optional[str]):
    """What identifies a file's current content cheaply: (path, mtime, size)."""
    if not path or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return [path, st.st_mtime_ns, st.st_size]
