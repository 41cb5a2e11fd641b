"""`python -m metrics.shapes …`, the earlier name of `python -m shapes judge …` (the shapes world's adherence score)."""
import sys

from shapes.__main__ import main as shapes_main


def main(argv=None) -> int:
    return shapes_main(["judge", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
