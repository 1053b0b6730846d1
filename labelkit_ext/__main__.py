"""``python -m labelkit_ext ...`` is the ``labelkit`` command."""

from labelkit_ext.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
