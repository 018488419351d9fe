"""``python -m mmsched``: the command-line interface (see [`mmsched.cli`][])."""

from mmsched.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
