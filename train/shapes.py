"""`python -m train.shapes make …`, the earlier name of `python -m shapes make …` (the shapes world's commands)."""
import sys

from shapes.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
