"""One Ray task per input: resumable, a failed input retried once, never stopping the others.

:func:`run_batch` lists the inputs (``<inputs>/<name>/rgba.png``), skips the finished ones (``done.json``)
and the ones that failed twice on the same image (``failed.json`` holds the error and the image's hash;
``retry_failed`` runs them again, and a changed image runs again by itself), and submits one task per
remaining input: :func:`it3d.eval.runner.process_input`, which launches the method, evaluates it and
writes the run's report. A task asks Ray for ``num_gpus=1`` when the cluster has GPUs (Ray sets the
task's ``CUDA_VISIBLE_DEVICES``) and ``num_cpus=1`` otherwise. A failed input (a launch that exited
non-zero, a failed evaluation, a task that raised or whose worker died) is submitted once more; the
second failure is final and reported with its error. When every task is back, ``results.csv``,
``results.md`` and ``report.html`` are rebuilt from every finished run in ``<out>``.

Ray: without an address a local Ray is started on this machine (and stopped at the end); ``auto`` or
``host:port`` joins a running cluster (``ray start --head`` / ``ray start --address ...``). Workers import
it3d from this checkout's ``custom/`` (``PYTHONPATH`` in the task's runtime env) and read and write the same
paths, so on a cluster the checkout, the inputs and ``--out`` must be at the same path on every node
(a shared filesystem). The driver's ``IT3D_*``, ``HF_*`` and ``TRANSFORMERS_*`` variables travel with
the tasks (model roots, offline flags).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..core import io, progress
from ..core.errors import It3dError
from ..eval import runner

log = logging.getLogger("it3d.batch")
FAILED = "failed.json"
FORWARD_ENV = ("IT3D_", "HF_", "TRANSFORMERS_", "HUGGINGFACE_")


@dataclass
class RayOptions:
    address: Optional[str] = None  # None: start a local Ray; "auto" or "host:port": join that cluster
    num_cpus: Optional[int] = None  # CPUs of the local Ray (None: all of this machine's)
    cpus_per_task: Optional[int] = None  # None: 1 on CPU clusters; CPUs / GPUs (at least 1) when there are GPUs
    retries: int = 1
    retry_failed: bool = False


def image_key(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def failed_record(run_dir: str) -> Optional[Dict]:
    p = os.path.join(run_dir, FAILED)
    if not os.path.isfile(p):
        return None
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def plan(bc: runner.BenchConfig, images: Dict[str, str], retry_failed: bool) -> Tuple[List[str], List[str], Dict]:
    """(to run, finished earlier, {name: error} of inputs that failed earlier on the same image)."""
    todo, done, failed = [], [], {}
    for name, image in images.items():
        run_dir = runner.run_dir_of(bc.out, name)
        if runner.is_done(run_dir):
            done.append(name)
            continue
        rec = failed_record(run_dir)
        if rec and not retry_failed and rec.get("image_sha1") == image_key(image):
            failed[name] = rec.get("error", "?")
            continue
        todo.append(name)
    return todo, done, failed


def task_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARD_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([runner.CUSTOM_DIR] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def run_input(bc_fields: Dict, name: str, image: str) -> Dict:
    """The body of one Ray task (runs in a Ray worker)."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", force=True)
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        log.info(f"[{name}] on GPU {os.environ['CUDA_VISIBLE_DEVICES']} (CUDA_VISIBLE_DEVICES)")
    return runner.process_input(runner.BenchConfig(**bc_fields), name, image)


def start_ray(opts: RayOptions):
    """(ray module, whether this call started it)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # every input's log lines, not "[repeated 3x across cluster]"
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a requirement
        raise It3dError("python -m it3d.batch needs Ray: pip install -r requirements.txt") from None
    if ray.is_initialized():
        return ray, False
    kw = dict(include_dashboard=False, log_to_driver=True, configure_logging=False)
    if opts.address is None:
        ray.init(address="local", num_cpus=opts.num_cpus, **kw)
    else:
        try:
            ray.init(address=opts.address, **kw)
        except (ConnectionError, RuntimeError) as e:
            raise It3dError(f"--address {opts.address}: cannot join a Ray cluster ({str(e).splitlines()[0]}); "
                            f"start one with `ray start --head`") from None
    return ray, True


def task_resources(ray, opts: RayOptions) -> Dict[str, float]:
    res = ray.cluster_resources()
    gpus, cpus = res.get("GPU", 0.0), res.get("CPU", 1.0)
    if gpus >= 1:
        per = opts.cpus_per_task or max(1, int(cpus // gpus))
        return {"num_gpus": 1, "num_cpus": per}
    return {"num_cpus": opts.cpus_per_task or 1}


def crash_row(name: str, err: BaseException) -> Dict:
    msg = (str(err).strip().splitlines() or [type(err).__name__])[-1][:300]
    return {"name": name, "status": f"failed: task crashed ({type(err).__name__}): {msg}", "notes": ""}


def run_batch(bc: runner.BenchConfig, opts: Optional[RayOptions] = None) -> List[Dict]:
    """Run the unfinished inputs on Ray; returns the rows of the inputs run now (the tables cover every run)."""
    opts = opts or RayOptions()
    bc.out = os.path.abspath(bc.out)
    inputs_abs = os.path.abspath(bc.inputs)
    if bc.out == inputs_abs or bc.out.startswith(inputs_abs + os.sep):
        raise It3dError(f"--out {bc.out} is inside --inputs: inputs are read-only, choose another --out")
    runner.check_out_dir(bc)
    images = runner.list_inputs(bc.inputs, bc.names)
    todo, done, failed_before = plan(bc, images, opts.retry_failed)
    for n in done:
        log.info(f"[{n}] already done: skipped")
    for n, err in failed_before.items():
        log.info(f"[{n}] failed earlier ({err}): skipped (--retry-failed runs it again)")
    log.info(f"[batch] {len(todo)} to run, {len(done)} done earlier, {len(failed_before)} failed earlier")
    rows: List[Dict] = []
    if todo:
        rows = _schedule(bc, opts, images, todo)
    from ..eval.report import rebuild

    rebuild(bc.out)
    return rows


def _schedule(bc: runner.BenchConfig, opts: RayOptions, images: Dict[str, str], todo: List[str]) -> List[Dict]:
    ray, started = start_ray(opts)
    try:
        res = task_resources(ray, opts)
        task = ray.remote(max_retries=0)(run_input).options(runtime_env={"env_vars": task_env()}, **res)
        log.info(f"[batch] one task per input with {res}")
        fields = dataclasses.asdict(bc)
        pending = {task.remote(fields, n, images[n]): (n, 1) for n in todo}
        rows: List[Dict] = []
        t0, n_failed = time.time(), 0
        with progress.bar(total=len(todo), desc="batch", unit="input") as pbar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                name, attempt = pending.pop(ready[0])
                try:
                    row = ray.get(ready[0])
                except Exception as e:  # the task raised, or its worker died: the same as a failed run
                    row = crash_row(name, e)
                if row.get("status") != "ok" and attempt <= opts.retries:
                    log.warning(f"[{name}] {row['status']}: retrying ({attempt}/{opts.retries})")
                    pending[task.remote(fields, name, images[name])] = (name, attempt + 1)
                    continue
                record(bc, name, images[name], row, attempt)
                rows.append(row)
                n_failed += row.get("status") != "ok"
                pbar.update(what=name)
                elapsed = time.time() - t0
                eta = progress.eta(len(rows), len(todo), 0, elapsed)
                log.info(f"[batch] {len(rows)}/{len(todo)} inputs finished ({n_failed} failed), "
                         f"elapsed {progress.fmt_s(elapsed)}, ETA {progress.fmt_s(eta)}")
        return rows
    finally:
        if started:
            ray.shutdown()


def record(bc: runner.BenchConfig, name: str, image: str, row: Dict, attempts: int) -> None:
    """Final outcome of an input: ``failed.json`` for a failure (and its ``result.json`` when the task died first)."""
    run_dir = runner.run_dir_of(bc.out, name)
    if row.get("status") == "ok":
        if os.path.isfile(os.path.join(run_dir, FAILED)):
            os.remove(os.path.join(run_dir, FAILED))
        return
    if not os.path.isfile(os.path.join(run_dir, "result.json")) or row["status"].startswith("failed: task crashed"):
        io.write_text(os.path.join(run_dir, "result.json"), json.dumps(row, indent=1))
    io.write_text(os.path.join(run_dir, FAILED), json.dumps(
        {"error": row["status"], "attempts": attempts, "image_sha1": image_key(image), "time": time.time()}, indent=1))
    log.error(f"[{name}] {row['status']} (after {attempts} attempts)")
