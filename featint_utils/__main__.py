"""Command line (installed, ``featint`` is the same command):

* ``python -m featint_utils run --profile NAME [--name RUN | --run-dir DIR] [--only 00,01] [--set key=value ...]
  [--nproc N]``
* ``python -m featint_utils sweep --profile NAME --grid key=v1,v2 [--grid ...] [--zip] [--only 00,01]
  [--set key=value ...] [--name SWEEP | --sweep-dir DIR] [--jobs N] [--nproc M]``
* ``python -m featint_utils report [--profile NAME] [--name RUN | --run-dir DIR]``
* ``python -m featint_utils profiles``; ``python -m featint_utils params [--profile NAME]``
* under ``torchrun``, on every rank: ``python -m featint_utils stage {00,01,02} --profile NAME [--name RUN |
  --run-dir DIR] [--set key=value ...]``
"""

from __future__ import annotations

import argparse
import sys

from .data.distributed import RankLostError
from .workbench import runner, sweeps


def _where(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="embedded", help="profiles/<NAME>.toml (default: embedded)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--name", help="the run's name: runs/<NAME>/ (default: the profile's name)")
    where.add_argument("--run-dir", help="the run's directory, anywhere")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featint_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="execute the notebooks of a profile into runs/<name>/",
        epilog=f"profiles: {', '.join(runner.available_profiles())}; parameters: `params [--profile NAME]`",
    )
    _where(run)
    run.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )
    run.add_argument("--no-reports", action="store_true", help="skip the HTML reports")
    run.add_argument(
        "--nproc", type=int, default=1, help="ranks (GPUs) on this node for stages 00 to 02, under torchrun"
    )
    stage = commands.add_parser("stage", help="under torchrun: this rank's part of stage 00, 01 or 02")
    stage.add_argument("number", help="00 (extraction), 01 (primary SAE training) or 02 (NFM ladder)")
    _where(stage)
    stage.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="override a parameter"
    )
    sweep = commands.add_parser("sweep", help="one run per point of a parameter grid, and a comparison report")
    sweep.add_argument("--profile", default="embedded", help="profiles/<NAME>.toml (default: embedded)")
    sweep.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a swept parameter and its values"
    )
    sweep.add_argument("--zip", action="store_true", help="pair the grids' i-th values instead of every combination")
    sweep.add_argument("--only", default="", help="comma-separated notebook numbers each point runs, e.g. 00,01,02,03")
    sweep.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="a parameter fixed for every point"
    )
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--name", help="the sweep's name: runs/sweeps/<NAME>/ (default: the profile's name)")
    where.add_argument("--sweep-dir", help="the sweep's directory, anywhere")
    sweep.add_argument("--jobs", type=int, default=1, help="points run at once (default 1)")
    sweep.add_argument("--nproc", type=int, default=1, help="torchrun ranks (GPUs) of each point's stages 00 to 02")
    sweep.add_argument("--no-reports", action="store_true", help="skip the points' HTML reports")
    rep = commands.add_parser("report", help="render a run's executed notebooks to HTML, inputs hidden")
    _where(rep)
    commands.add_parser("profiles", help="list the available profiles")
    described = commands.add_parser("params", help="every parameter: stage, type, default and meaning")
    described.add_argument("--profile", help="show this profile's values in place of the defaults")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            only = [n.strip() for n in args.only.split(",") if n.strip()] or None
            run_dir = runner.run(
                args.profile,
                only,
                runner.parse_sets(args.sets),
                reports=not args.no_reports,
                name=args.name,
                run_dir=args.run_dir,
                nproc=args.nproc,
            )
            print(f"[featint] run complete: {run_dir}")
        elif args.command == "sweep":
            root = sweeps.run_sweep(
                args.profile,
                args.grid,
                zipped=args.zip,
                overrides=runner.parse_sets(args.sets),
                only=[n.strip() for n in args.only.split(",") if n.strip()] or None,
                name=args.name,
                sweep_dir=args.sweep_dir,
                jobs=args.jobs,
                nproc=args.nproc,
                reports=not args.no_reports,
            )
            print(f"[sweep] complete: {root / 'comparison.html'}")
        elif args.command == "stage":
            runner.run_scaled_stage(args.number, args.profile, runner.parse_sets(args.sets), args.name, args.run_dir)
        elif args.command == "report":
            for html in runner.report(args.profile, name=args.name, run_dir=args.run_dir):
                print(html)
        elif args.command == "params":
            print(runner.describe_parameters(args.profile))
        else:
            print("\n".join(runner.available_profiles()))
    except (runner.RunError, sweeps.SweepError, RankLostError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
