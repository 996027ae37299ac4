"""Command line: ``python -m featint_utils run --profile NAME [--only 00,01] [--set key=value ...]``
and ``python -m featint_utils report --profile NAME``."""

from __future__ import annotations

import argparse
import sys

from . import runner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m featint_utils", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a profile into runs/<profile>/")
    run.add_argument("--profile", default="embedded", help="profiles/<NAME>.toml (default: embedded)")
    run.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a parameter (repeatable)")  # fmt: skip
    run.add_argument("--no-reports", action="store_true", help="skip the HTML reports")
    rep = commands.add_parser("report", help="render a run's executed notebooks to HTML, inputs hidden")
    rep.add_argument("--profile", default="embedded")
    commands.add_parser("profiles", help="list the available profiles")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            only = [n.strip() for n in args.only.split(",") if n.strip()] or None
            run_dir = runner.run(args.profile, only, runner.parse_sets(args.sets), reports=not args.no_reports)
            print(f"[featint] run complete: {run_dir}")
        elif args.command == "report":
            for html in runner.report(args.profile):
                print(html)
        else:
            print("\n".join(runner.available_profiles()))
    except runner.RunError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
