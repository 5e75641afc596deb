"""``python -m it3d.app.worker RUN_DIR``: run one app job -- what the app's scheduler spawns per job.

The job's photo goes through :func:`it3d.eval.runner.process_input` (``launch.py --train`` / ``--test`` /
``--export`` subprocesses, evaluation, the trial's report), exactly like one input of ``python -m it3d.batch``.
Exit status 0 when the job finished, 1 when a step failed (``result.json`` says which and why).
"""
from __future__ import annotations

import logging
import os
import sys

from ..eval import runner
from . import jobs


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m it3d.app.worker RUN_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    run_dir = os.path.abspath(argv[0])
    job = jobs.load_job(run_dir)
    out = os.path.dirname(os.path.dirname(run_dir))  # <out>/runs/<id>
    row = runner.process_input(jobs.bench_config(job, out), job["id"], job["image"])
    print(f"job {job['id']}: {row['status']}", file=sys.stderr)
    return 0 if row["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
