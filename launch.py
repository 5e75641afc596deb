#!/usr/bin/env python
"""it3d command line: python launch.py --config CONFIG.yaml (--train|--validate|--test|--export|--preprocess) [key=value ...]"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class Parser(argparse.ArgumentParser):
    """argparse, ending a usage error like every other it3d error: one ``error:`` line."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description="it3d: one image to a 3D asset", allow_abbrev=False)
    p.add_argument("--config", required=True, nargs="+", help="one or more YAML files, merged in order")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--train", action="store_true", help="train (every stage of a staged config)")
    mode.add_argument("--validate", action="store_true", help="run validation on a checkpoint (resume=...)")
    mode.add_argument("--test", action="store_true", help="render the test orbit to save/ (turntable mp4)")
    mode.add_argument("--export", action="store_true", help="write meshes / point clouds to save/")
    mode.add_argument("--preprocess", action="store_true", help="only run the preprocessing estimators")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config and every model it needs, print the stage plan, write the resolved "
                        "configs to <trial>/dry-run/, and exit without training (implies --train)")
    p.add_argument("--gpu", default="0", help="GPU indices, e.g. 0 or 0,1 (CPU is used when CUDA is absent)")
    p.add_argument("--stage", default=None, help="for --test/--export/--validate on a staged run: which stage")
    p.add_argument("--typecheck", action="store_true", help="runtime shape/type checks (jaxtyping + beartype)")
    p.add_argument("--verbose", action="store_true",
                   help="debug logging, library warnings, and the traceback of an error")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if not any((args.train, args.validate, args.test, args.export, args.preprocess)):
        if not args.dry_run:
            parser.error("one of the arguments --train --validate --test --export --preprocess is required")
        args.train = True
    bad = [e for e in extras if e.startswith("-")]
    if bad:
        print(f"error: unknown flag {bad[0]} (overrides are key=value without dashes; see launch.py --help)",
              file=sys.stderr)
        return 2
    if args.typecheck:
        from jaxtyping import install_import_hook

        install_import_hook("it3d", "beartype.beartype")
    sys.path.insert(0, os.path.join(HERE, "custom"))
    from it3d.runner.cli import run_cli  # noqa: E402  (after the typecheck hook)

    return run_cli(args, extras)


if __name__ == "__main__":
    sys.exit(main())
