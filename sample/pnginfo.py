"""`python -m sample.pnginfo IMAGE [--json]`: the generation parameters stored in an image (A1111's PNG Info).

Prints the infotext as stored, or with --json the parsed fields (A1111's keys, values as strings).
"""
import json
import sys

from .cli import USER_ERRORS, ArgumentParser, report_user_error
from .images import read_infotext
from .infotext import parse_infotext


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m sample.pnginfo", description=__doc__.split("\n")[0])
    parser.add_argument("image", help="PNG written by A1111 or by sample.txt2img / img2img")
    parser.add_argument("--json", action="store_true", help="Print the parsed fields as JSON")
    args = parser.parse_args(argv)
    try:
        infotext = read_infotext(args.image)
    except USER_ERRORS as error:
        return report_user_error(parser.prog, error)
    if infotext is None:
        print(f"{parser.prog}: error: {args.image} has no generation parameters (no 'parameters' text chunk)",
              file=sys.stderr)
        return 1
    print(json.dumps(parse_infotext(infotext), indent=2, ensure_ascii=False) if args.json else infotext)
    return 0


if __name__ == "__main__":
    sys.exit(main())
