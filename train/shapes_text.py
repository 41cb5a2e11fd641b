"""`python -m train.shapes_text …`, the earlier name of `python -m shapes text …` (stage 2 of the shapes recipe)."""
import sys

from shapes.__main__ import main as shapes_main


def main(argv=None) -> int:
    return shapes_main(["text", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
