"""`python -m dalle` runs the command-line interface."""

from dalle.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
