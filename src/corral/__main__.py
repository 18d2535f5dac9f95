"""``python -m corral``: the ``corral`` command, for when the script is not on PATH."""

from corral.cli import main

# Guarded so that a start method that imports the main module into a worker (spawn, or a
# forkserver preloading ``__main__``) does not run the command again there.
if __name__ == "__main__":
    raise SystemExit(main())
