"""``python -m cxr`` (what torchrun launches) is the ``cxr`` command."""

from cxr.cli import app

if __name__ == "__main__":
    app()
