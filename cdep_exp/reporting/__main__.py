"""Reports from run records.

    python -m cdep_exp.reporting --glob 'outputs/**/metrics.json'    # mean ± std per setting
    python -m cdep_exp.reporting --table table2 --scale quick        # one paper table → results/quick/
    python -m cdep_exp.reporting --table all --scale paper           # every paper table
    python -m cdep_exp.reporting --table rrr_paper --scale full      # the RRR paper's tables (make rrr-paper)
    python -m cdep_exp.reporting --table shortcut --scale full       # the shortcut benchmark (make benchmark)
    python -m cdep_exp.reporting --table shortcut --score val_accuracy   # λ chosen on another validation score
    python -m cdep_exp.reporting --table shortcut --scale full --next-runs  # the sweeps still to train, a line each
    python -m cdep_exp.reporting --figures --scale quick             # accuracy against λ → results/figures/
    python -m cdep_exp.reporting --shortcut --glob 'outputs/demo/**/metrics.json'  # accuracy next to shortcut reliance
"""
import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cdep_exp.errors import StorageError
from cdep_exp.reporting.archive import archive_dir, sync
from cdep_exp.reporting.records import collect, glob_records, summarise
from cdep_exp.reporting.selection import VALIDATION_SCORES


# The make target that trains a table and builds it with its companions, where its name differs
# from the table's (`make benchmark` also writes shortcut_val_accuracy and the trade-off figure).
MAKE_TARGETS = {"shortcut": "benchmark"}


T = TypeVar("T")


def writing(write: Callable[[], T], where: Path) -> T:
    """Run `write`; a folder that cannot be written ends the command with one line."""
    try:
        return write()
    except (OSError, StorageError) as err:
        cause = err if isinstance(err, OSError) else err.__cause__
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(err)
        raise SystemExit(f"Error: cannot write into {where} ({reason}); choose a writable --results folder.") from None


def main(argv: list[str] | None = None) -> None:
    lines = __doc__.splitlines()
    parser = argparse.ArgumentParser(prog="python -m cdep_exp.reporting", description=lines[0],
                                     epilog="\n".join(lines[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glob", default="outputs/**/metrics.json", help="run records to summarise")
    parser.add_argument("--metric", default="test/accuracy", help="column(s) to summarise, comma-separated")
    parser.add_argument("--table", action="append",
                        help="table(s) to build: table1 … tableS1, all (every CDEP paper table), shortcut (the "
                             "benchmark), rrr_iris, rrr_toy_colors, rrr_decoy or rrr_paper (those three)")
    parser.add_argument("--score", choices=sorted(VALIDATION_SCORES),
                        help="with --table shortcut: the validation score λ is chosen on (default "
                             "val_counterfactual); the table is written as shortcut_<score>")
    parser.add_argument("--next-runs", action="store_true",
                        help="with --table: print the sweeps that train what the table still needs and can start "
                             "now, one line of Hydra overrides each (where λ is tuned on some seeds, the repeats "
                             "at the chosen λ once those have finished, chosen on the table's own score whatever --score "
                             "says); nothing when no run is missing")
    parser.add_argument("--figures", action="store_true", help="plot accuracy against λ per method (Fig. S2)")
    parser.add_argument("--shortcut", action="store_true",
                        help="accuracy next to the shortcut metric (counterfactual Δp and flips) per method and form")
    parser.add_argument("--select", help="with --shortcut: pick λ per method on this column, e.g. val/accuracy")
    parser.add_argument("--all-counterfactuals", action="store_true", help="with --shortcut: every counterfactual")
    parser.add_argument("--scale", default="quick", choices=["quick", "full", "paper"])
    parser.add_argument("--outputs", type=Path, default=Path("outputs/tables"), help="root of the table runs")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where tables and figures are written")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --table: an override the table's sweeps were run with (make passes Table 1's "
                             "dataset=isic_synthetic at the quick scale)")
    args = parser.parse_args(argv)
    # Warnings about the records read (unreadable, failed runs) as plain lines in a terminal.
    warnings.formatwarning = lambda message, *args, **kwargs: f"Warning: {message}\n"
    if args.table:
        from cdep_exp.reporting.tables import PAPER_TABLES, RRR_PAPER_TABLES, build, load, plan  # Hydra: import on use

        groups = {"all": PAPER_TABLES, "rrr_paper": RRR_PAPER_TABLES}
        for name in [n for requested in args.table for n in groups.get(requested, (requested,))]:
            if args.next_runs:
                try:
                    lines, progress = plan(name, load(name, args.scale, args.outputs, overrides=tuple(args.set),
                                                      results=args.results / args.scale))
                except (KeyError, ValueError) as err:
                    raise SystemExit(f"Error: {err.args[0]}") from None
                print(progress, file=sys.stderr)  # stdout stays one sweep a line, for make to read
                for line in lines:
                    print(" ".join(line))
                continue
            try:
                table = build(name, args.scale, args.outputs, overrides=tuple(args.set), score=args.score,
                              results=args.results / args.scale)
            except (KeyError, ValueError) as err:
                raise SystemExit(f"Error: {err.args[0]}") from None
            if len(table.missing) >= table.expected:
                raise SystemExit(f"{name}: no finished run under {args.outputs / args.scale / name}; the "
                                 f"tables in {args.results / args.scale} are left as they are. Train first "
                                 f"(make {MAKE_TARGETS.get(name, name)} SCALE={args.scale}).")
            # The archive first: a table is never written without the records it counts beside it.
            archive = archive_dir(args.results / args.scale, name)
            copied, removed = writing(lambda: sync(table.run_dirs, args.outputs / args.scale / name, archive), archive)
            written = writing(lambda: table.write(args.results / args.scale), args.results)
            print(table.markdown(), f"\nWritten: {', '.join(map(str, written))}\n"
                                    f"Run archive {archive}: {len(table.run_dirs)} record(s), {copied} copied, "
                                    f"{removed} superseded one(s) removed.\n")
        return
    if args.figures:
        from cdep_exp.reporting.figures import write_figures

        out = args.results / "figures" / args.scale
        written = writing(lambda: write_figures(args.scale, args.outputs, out, args.results / args.scale), out)
        print("\n".join(map(str, written)) or "No finished runs to plot yet (run `make tables` first).")
        return
    paths = glob_records(args.glob)
    if not paths:
        raise SystemExit(f"No run records match {args.glob!r}; train something first (README, 'Running and sweeping').")
    runs = collect(paths)
    if runs.empty:
        raise SystemExit(f"None of the {len(paths)} run record(s) matching {args.glob!r} is of a finished run.")
    if args.shortcut:
        from cdep_exp.reporting.shortcut import print_shortcut_tables

        print_shortcut_tables(runs, args.select, args.all_counterfactuals)
        return
    columns = [c for c in args.metric.split(",") if c in runs.columns]
    print(summarise(runs, columns).to_markdown(index=False))


if __name__ == "__main__":
    main()
