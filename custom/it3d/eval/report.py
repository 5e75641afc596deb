"""Result tables (CSV + Markdown) and self-contained HTML reports (pictures and videos embedded as
``data:`` URIs, no external assets; links only to the downloadable files: exports, logs, tables).

* :func:`write_tables` -> ``<out>/results.csv`` and ``<out>/results.md``: one row per input plus a
  ``mean`` row (mean over the finished inputs of every numeric column; unavailable values are
  ``nan`` in the CSV, ``n/a`` in Markdown, with the reason in the ``notes`` column).
* :func:`write_run_report` -> ``<run_dir>/report.html``: input image, reference-view render,
  turntable ``<video>``, normal / depth views, metrics, links to the exported files.
* :func:`write_benchmark_report` -> ``<out>/report.html``: the table with thumbnails, videos and
  links to each run's report.

Rebuild the tables and the benchmark report from the finished runs (e.g. after all shards)::

    python -m it3d.eval.report --out outputs/bench
"""
from __future__ import annotations

import argparse
import base64
import csv
import glob
import html
import io as _io
import json
import math
import os
from typing import Dict, List, Optional, Sequence

from ..core import io

FIXED = ("name", "status")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def columns(rows: Sequence[Dict]) -> List[str]:
    """Fixed columns, metrics, timing columns in first-seen order, then ``notes``."""
    from .metrics import METRICS

    cols = list(FIXED) + list(METRICS)
    for r in rows:
        for k in r:
            if k not in cols and k != "notes":
                cols.append(k)
    return cols + ["notes"]


def mean_row(rows: Sequence[Dict], cols: Sequence[str]) -> Dict:
    ok = [r for r in rows if r.get("status") == "ok"]
    out: Dict = {"name": "mean", "status": f"{len(ok)}/{len(rows)} ok", "notes": ""}
    for c in cols:
        if c in out:
            continue
        vals = [r[c] for r in ok if _is_num(r.get(c)) and math.isfinite(r[c])]
        if any(_is_num(r.get(c)) for r in ok):
            out[c] = sum(vals) / len(vals) if vals else math.nan
            if vals and len(vals) < len(ok):
                out["notes"] += f"{c}: mean of {len(vals)}/{len(ok)}; "
    return out


def fmt(v, markdown: bool = False) -> str:
    if v is None:
        return "n/a" if markdown else ""
    if _is_num(v):
        if isinstance(v, float) and math.isnan(v):
            return "n/a" if markdown else "nan"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
        return str(v)
    s = str(v)
    return s.replace("|", "\\|").replace("\n", " ") if markdown else s


def table_rows(rows: Sequence[Dict], with_mean: bool = True):
    rows = sorted(rows, key=lambda r: r["name"])
    cols = columns(rows)
    return cols, rows + ([mean_row(rows, cols)] if rows and with_mean else [])


def write_tables(out_dir: str, rows: Sequence[Dict], title: str = "") -> Dict[str, str]:
    cols, all_rows = table_rows(rows)
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(cols)
    for r in all_rows:
        w.writerow([fmt(r.get(c)) for c in cols])
    md = ([f"# {title}", ""] if title else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c), True) for c in cols) + " |" for r in all_rows]
    return {"csv": io.write_text(os.path.join(out_dir, "results.csv"), buf.getvalue()),
            "md": io.write_text(os.path.join(out_dir, "results.md"), "\n".join(md) + "\n")}


# ----------------------------------------------------------------------------- HTML
STYLE = """body{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#eee}td.l,th.l{text-align:left;max-width:36em}img.t{height:128px;background:#fff}video{height:192px;background:#000}
.row{display:flex;gap:1em;flex-wrap:wrap;align-items:flex-start}figure{margin:0}figcaption{font-size:12px;color:#555}
.fail{color:#b00}"""
# marks each <video> once its first frame decoded (data-state=loaded) or failed (data-state=error)
SCRIPT = """document.querySelectorAll('video').forEach(function(v){
v.addEventListener('loadeddata',function(){v.dataset.state='loaded'});
v.addEventListener('error',function(){v.dataset.state='error'},true);});"""


def rel(path: str, start: str) -> str:
    return os.path.relpath(path, start).replace(os.sep, "/")


def esc(s) -> str:
    return html.escape(str(s), quote=True)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{esc(title)}</h1>\n{body}\n<script>{SCRIPT}</script>"
            "</body></html>\n")


MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp", ".gif": "image/gif",
        ".mp4": "video/mp4", ".webm": "video/webm"}
EMBED_LIMIT = 32 * 2 ** 20  # a bigger video is linked instead (said on the page)


def data_uri(path: str) -> Optional[str]:
    """``data:<mime>;base64,...`` of a file (None when it is too big to embed)."""
    if os.path.getsize(path) > EMBED_LIMIT:
        return None
    mime = MIME.get(os.path.splitext(path)[1].lower(), "application/octet-stream")
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode('ascii')}"


def figure(src: Optional[str], caption: str, base: str) -> str:
    if not src or not os.path.isfile(src):
        return f"<figure><div class=\"fail\">({esc(caption)}: not found)</div></figure>"
    uri = data_uri(src) or rel(src, base)
    return (f"<figure><img class=\"t\" src=\"{esc(uri)}\" data-file=\"{esc(rel(src, base))}\" alt=\"{esc(caption)}\">"
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def video(src: Optional[str], base: str) -> str:
    if not src or not os.path.isfile(src):
        return "<div class=\"fail\">(no turntable video)</div>"
    uri = data_uri(src)
    note = "" if uri else f"<div>({esc(rel(src, base))} is too big to embed: linked)</div>"
    return (f"<video controls loop muted autoplay playsinline preload=\"auto\" data-file=\"{esc(rel(src, base))}\" "
            f"src=\"{esc(uri or rel(src, base))}\"></video>{note}")


def html_table(rows: Sequence[Dict], base: str, links: Optional[Dict[str, str]] = None, with_mean: bool = True) -> str:
    cols, all_rows = table_rows(rows, with_mean)
    head = "".join(f"<th class=\"l\">{esc(c)}</th>" if c in ("name", "status", "notes") else f"<th>{esc(c)}</th>"
                   for c in cols)
    body = []
    for r in all_rows:
        cells = []
        for c in cols:
            v = fmt(r.get(c), markdown=True).replace("\\|", "|")
            if c == "name" and links and r["name"] in links:
                v = f"<a href=\"{esc(rel(links[r['name']], base))}\">{esc(v)}</a>"
            else:
                v = esc(v)
            cls = " class=\"l\"" if c in ("name", "status", "notes") else ""
            cells.append(f"<td{cls}>{v}</td>")
        body.append(f"<tr data-name=\"{esc(r['name'])}\">" + "".join(cells) + "</tr>")
    return f"<table id=\"metrics\"><thead><tr>{head}</tr></thead><tbody>\n" + "\n".join(body) + "\n</tbody></table>"


def fidelity_section(exports: Dict[str, List[str]], base: str) -> str:
    """Export fidelity of every stage that wrote ``save/export/fidelity.json``: its preview and per-view figures."""
    parts = []
    for stage, files in (exports or {}).items():
        fid = next((f for f in files if os.path.basename(f) == "fidelity.json"), None)
        if fid is None or not os.path.isfile(fid):
            continue
        with open(fid) as f:
            rec = json.load(f)
        rows = "".join(f"<tr><td class=\"l\">{esc(v['view'])}</td><td>{fmt(v['psnr'])}</td><td>{fmt(v['mask_iou'])}</td></tr>"
                       for v in rec.get("views", []))
        ok = "meets" if rec.get("meets_targets") else "<span class=\"fail\">below</span>"
        prev = os.path.join(os.path.dirname(fid), "preview.png")
        img = (f"<img src=\"{esc(rel(prev, base))}\" alt=\"export preview\" style=\"max-width:100%\">"
               if os.path.isfile(prev) else "")
        parts.append(f"<h3>{esc(stage)}: {esc(rec.get('file', ''))} ({ok} the reference-view targets: PSNR >= "
                     f"{fmt(rec['targets']['reference_psnr_db'])} dB, mask IoU >= {fmt(rec['targets']['reference_mask_iou'])})"
                     f"</h3>\n<p>left: reference view (exported mesh above, trained stage below); right: novel views, "
                     f"each exported | trained</p>{img}\n<table class=\"fidelity\"><thead><tr><th class=\"l\">view</th>"
                     f"<th>PSNR (dB)</th><th>mask IoU</th></tr></thead><tbody>{rows}</tbody></table>")
    return "<h2>Export fidelity</h2>\n" + "\n".join(parts) if parts else ""


def write_run_report(run_dir: str, row: Dict, media: Dict) -> str:
    """``media``: input_thumb, render, normal, depth (image paths), video, exports {stage: [files]}."""
    figs = [figure(media.get("input_thumb"), "input", run_dir), figure(media.get("reference"), "reference (GT)", run_dir),
            figure(media.get("render"), "reference-view render", run_dir)]
    for kind in ("normal", "depth"):
        for i, p in enumerate(media.get(kind) or []):
            figs.append(figure(p, f"{kind} view {i}", run_dir))
    exports = "".join(
        f"<li>{esc(stage)}: " + ", ".join(f"<a href=\"{esc(rel(f, run_dir))}\">{esc(os.path.basename(f))}</a>"
                                           for f in files) + "</li>"
        for stage, files in (media.get("exports") or {}).items()) or "<li>(no exported files)</li>"
    logs = "".join(f"<a href=\"{esc(rel(p, run_dir))}\">{esc(os.path.basename(p))}</a> "
                   for p in sorted(glob.glob(os.path.join(run_dir, "logs", "*.log"))))
    body = (f"<p>status: <b>{esc(row.get('status'))}</b></p>\n<div class=\"row\">{''.join(figs)}</div>\n"
            f"<h2>Turntable</h2>\n{video(media.get('video'), run_dir)}\n<h2>Metrics</h2>\n"
            f"{html_table([row], run_dir, with_mean=False)}\n<h2>Exports</h2>\n<ul>{exports}</ul>\n"
            f"{fidelity_section(media.get('exports'), run_dir)}\n<p>logs: {logs}</p>")
    return io.write_text(os.path.join(run_dir, "report.html"), page(f"it3d run: {row['name']}", body))


def write_benchmark_report(out_dir: str, rows: Sequence[Dict], title: str = "it3d benchmark") -> str:
    links, gallery = {}, []
    for r in sorted(rows, key=lambda r: r["name"]):
        run_dir = os.path.join(out_dir, "runs", r["name"])
        media = load_media(run_dir)
        links[r["name"]] = os.path.join(run_dir, "report.html")
        gallery.append(f"<div class=\"row\"><h3><a href=\"{esc(rel(links[r['name']], out_dir))}\">{esc(r['name'])}</a>"
                       f"</h3>{figure(media.get('input_thumb'), 'input', out_dir)}"
                       f"{figure(media.get('render'), 'reference-view render', out_dir)}"
                       f"{video(media.get('video'), out_dir)}</div>")
    body = (f"<p>files: <a href=\"results.csv\">results.csv</a> <a href=\"results.md\">results.md</a></p>\n"
            f"{html_table(rows, out_dir, links)}\n<h2>Runs</h2>\n" + "\n".join(gallery))
    return io.write_text(os.path.join(out_dir, "report.html"), page(title, body))


def load_media(run_dir: str) -> Dict:
    p = os.path.join(run_dir, "media.json")
    if not os.path.isfile(p):
        return {}
    with open(p) as f:
        m = json.load(f)
    # stored relative to the run dir, so the output folder can move
    fix = lambda v: os.path.join(run_dir, v) if isinstance(v, str) else v  # noqa: E731
    return {k: ([fix(x) for x in v] if isinstance(v, list) else
                {s: [fix(x) for x in fs] for s, fs in v.items()} if isinstance(v, dict) else fix(v))
            for k, v in m.items()}


def collect_rows(out_dir: str) -> List[Dict]:
    rows = []
    for p in sorted(glob.glob(os.path.join(out_dir, "runs", "*", "result.json"))):
        with open(p) as f:
            rows.append(json.load(f))
    return rows


def rebuild(out_dir: str) -> Dict[str, str]:
    rows = collect_rows(out_dir)
    meta_p = os.path.join(out_dir, "benchmark.json")
    title = "it3d benchmark"
    if os.path.isfile(meta_p):
        with open(meta_p) as f:
            meta = json.load(f)
        title += ": " + " + ".join(os.path.relpath(c) if c.startswith(os.getcwd()) else c for c in meta.get("config", []))
        title += "".join(f" {o}" for o in meta.get("overrides", []))
    paths = write_tables(out_dir, rows, title)
    paths["html"] = write_benchmark_report(out_dir, rows, title)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m it3d.eval.report", description="rebuild tables + report of a benchmark")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    for k, v in rebuild(args.out).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
