"""``python -m it3d.batch``: run a method config on every input of a folder, one Ray task per input.

    PYTHONPATH=custom python -m it3d.batch --config configs/make-it-3d.yaml --inputs /data/realfusion15 \\
        --out outputs/bench [--address auto] [--names a,b] [--retry-failed] [key=value overrides ...]

Inputs: ``<inputs>/<name>/rgba.png`` (RealFusion15 layout; read only). Each input runs in
``<out>/runs/<name>/`` (see :mod:`it3d.eval.runner`); ``<out>/results.csv``, ``results.md`` and
``report.html`` cover every finished input. Scheduling, retries and the cluster: :mod:`it3d.batch.scheduler`.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from ..core.errors import It3dError
from ..eval import outputs, runner
from ..eval.lpips import DEFAULT_ID as DEFAULT_LPIPS
from ..eval.metrics import DEFAULT_CLIP
from .scheduler import RayOptions, run_batch

REMOVED = {"--shard": "Ray spreads the inputs over the cluster's machines (--address auto)",
           "--gpus": "Ray gives each task one GPU (num_gpus=1); start the cluster with the GPUs to use"}


def build_parser(prog: str = "python -m it3d.batch") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", required=True, nargs="+", help="method config(s), merged in order")
    p.add_argument("--inputs", required=True, help="folder of <name>/rgba.png inputs (read only)")
    p.add_argument("--out", required=True, help="batch output folder (resumable: finished inputs are skipped)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to join: auto (the cluster `ray start` made on this machine) or host:port; "
                        "default: start a local Ray on this machine")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs each input's task asks for (default: 1; with GPUs: CPUs / GPUs)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run the inputs that failed in an earlier invocation again (default: skip them)")
    p.add_argument("--names", default=None, help="comma-separated subset of input names")
    p.add_argument("--lpips", default=DEFAULT_LPIPS,
                   help="LPIPS weights dir, or an id under $IT3D_MODEL_ROOT (see it3d.eval.lpips)")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP hub id or local dir")
    p.add_argument("--max-views", type=int, default=24, help="novel views used by CLIP / contextual (0 = all)")
    p.add_argument("--input-maps", default="", help="comma-separated maps beside rgba.png to hand to the method "
                   "instead of its own estimates: depth (data.depth_path), normal (data.normal_path)")
    p.add_argument("--launch-cmd", default=None, help=argparse.SUPPRESS)  # tests: a fake, fast pipeline
    return p


def main(argv=None, prog: str = "python -m it3d.batch") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag, why in REMOVED.items():
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            print(f"error: {flag} was removed: {why} (see README, 'Batches on Ray')", file=sys.stderr)
            return 2
    args, extras = build_parser(prog).parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s", stream=sys.stderr)
    bad = [e for e in extras if e.startswith("-") or "=" not in e]
    if bad:
        print(f"error: unexpected argument {bad[0]} (method overrides are key=value)", file=sys.stderr)
        return 2
    try:
        bc = runner.BenchConfig(config=args.config, inputs=args.inputs, out=args.out, overrides=extras,
                                names=args.names.split(",") if args.names else None, lpips=args.lpips,
                                clip=args.clip, max_views=args.max_views,
                                input_maps=[m for m in args.input_maps.split(",") if m])
        bad_maps = sorted(set(bc.input_maps) - set(outputs.INPUT_MAP_KEYS))
        if bad_maps:
            raise It3dError(f"--input-maps: unknown map '{bad_maps[0]}' (known: {', '.join(outputs.INPUT_MAP_KEYS)})")
        if args.launch_cmd:
            bc.launch_cmd = shlex.split(args.launch_cmd)
        opts = RayOptions(address=args.address, num_cpus=args.num_cpus, cpus_per_task=args.cpus_per_task,
                          retry_failed=args.retry_failed)
        rows = run_batch(bc, opts)
    except It3dError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    return summary(bc, rows)


def summary(bc: runner.BenchConfig, rows) -> int:
    """Print what this invocation did; 1 when any input of the batch is failed (now or earlier)."""
    from ..eval.report import collect_rows

    failed_now = [r for r in rows if r["status"] != "ok"]
    names = set(runner.list_inputs(bc.inputs, bc.names))
    failed_all = [r for r in collect_rows(bc.out) if r["name"] in names and r["status"] != "ok"]
    print(f"{len(rows)} run(s) now, {len(failed_now)} failed; {len(failed_all)} of {len(names)} input(s) failed in all"
          + "".join(f"\n  {r['name']}: {r['status']}" for r in failed_all)
          + f"\ntable: {os.path.join(bc.out, 'results.md')}, report: {os.path.join(bc.out, 'report.html')}")
    return 1 if failed_all else 0

