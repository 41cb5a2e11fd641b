"""python -m metrics.human serve|report|export: run a pairwise human preference study and read its results.

    serve   --db votes.sqlite --model NAME=DIR --model NAME=DIR [--host 127.0.0.1] [--port 8765]
            Images with the same file name in two model folders are one comparison (metrics.compare writes them so);
            the prompt comes from each image's PNG infotext or .txt caption. Restarting on the same database keeps
            every vote and the comparisons already handed out.
    report  --db votes.sqlite [--html PATH]   JSON on stdout: per-model win rate, 95 % Wilson interval, Bradley–Terry
    export  --db votes.sqlite --csv PATH      all votes as CSV ('-' for stdout)

Exit status: 0 done, 2 usage error, 1 unreadable input.
"""
import argparse
import json
import signal
import sys
from pathlib import Path

from sample.cli import ArgumentParser
from sample.imagefiles import list_images, read_prompt

from ..report import table, write_page
from .server import make_app_server, results
from .store import Store

PROG = "python -m metrics.human"


def _model_folders(specs: list[str]) -> dict[str, Path]:
    folders = {}
    for spec in specs:
        name, separator, folder = spec.partition("=")
        if not separator or not name or not folder:
            raise ValueError(f"--model takes NAME=DIR; got {spec!r}")
        if name in folders:
            raise ValueError(f"model name {name!r} is given twice")
        if not Path(folder).is_dir():
            raise ValueError(f"--model {spec}: {folder} is not a folder")
        folders[name] = Path(folder)
    if len(folders) < 2:
        raise ValueError("a comparison needs at least two --model NAME=DIR")
    return folders


def serve(args: argparse.Namespace) -> None:
    folders = _model_folders(args.model)
    store = Store(args.db)
    items_by_model = {}
    for name, folder in folders.items():
        paths = list_images(folder)
        store.add_images(name, [(p.name, str(p.resolve()), read_prompt(p) or "") for p in paths])
        items_by_model[name] = {p.name for p in paths}
    shared = {item for a in items_by_model for b in items_by_model if a < b
              for item in items_by_model[a] & items_by_model[b]}
    if not shared:
        raise ValueError("no image file name appears in two of the model folders, so there is nothing to compare")
    server = make_app_server(store, args.host, args.port, args.seed)
    host, port = server.server_address[:2]

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"serving {len(shared)} prompt(s) of models {', '.join(folders)} on http://{host}:{port}/ "
          f"(votes in {args.db}; Ctrl+C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def report(args: argparse.Namespace) -> None:
    summary = results(Store(args.db))
    if args.html:
        rows = [[model, m["comparisons"], m.get("wins", 0), m.get("ties", 0), m.get("losses", 0),
                 m.get("win_rate", float("nan")), f"{m['ci95'][0]:.3f} – {m['ci95'][1]:.3f}" if "ci95" in m else "",
                 m["bradley_terry"]] for model, m in summary["models"].items()]
        write_page(args.html, "Human preference study", [
            f"<p>{summary['votes']} vote(s) from {summary['raters']} rater(s). Win rate counts a tie as half a win; "
            "the interval is Wilson's 95 % score interval; Bradley–Terry gives log-strengths θ (mean 0), with "
            "P(A preferred to B) = 1 / (1 + exp(θB − θA)).</p>",
            table(["model", "comparisons", "wins", "ties", "losses", "win rate", "95 % interval", "Bradley–Terry θ"],
                  rows)])
    print(json.dumps(summary, indent=2))


def export(args: argparse.Namespace) -> None:
    store = Store(args.db)
    if args.csv == "-":
        count = store.export_csv(sys.stdout)
    else:
        with open(args.csv, "w", newline="", encoding="utf-8") as file:
            count = store.export_csv(file)
    print(f"exported {count} vote(s)", file=sys.stderr)


def main(argv=None) -> int:
    parser = ArgumentParser(prog=PROG, description="Pairwise human preference study of image generators.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve the rating page")
    serve_parser.add_argument("--db", required=True, help="SQLite file of the study (created if missing)")
    serve_parser.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                              help="a model's image folder (give two or more)")
    serve_parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve_parser.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    serve_parser.add_argument("--seed", type=int, default=None, help="seed of the pair and side choices")
    report_parser = commands.add_parser("report", help="print the results as JSON")
    report_parser.add_argument("--db", required=True)
    report_parser.add_argument("--html", help="also write an HTML table")
    export_parser = commands.add_parser("export", help="write the votes as CSV")
    export_parser.add_argument("--db", required=True)
    export_parser.add_argument("--csv", required=True, help="output file, '-' for stdout")
    args = parser.parse_args(argv)
    if args.command != "serve" and not Path(args.db).is_file():
        parser.exit(2, f"{PROG}: error: {args.db} does not exist (start a study with serve)\n")
    try:
        {"serve": serve, "report": report, "export": export}[args.command](args)
    except ValueError as error:
        parser.exit(2, f"{PROG}: error: {error}\n")
    except OSError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
