"""``python -m clip_decoder`` runs the command line."""

import sys

from .cli import main

if __name__ == "__main__":  # not when a worker process (bench --jobs) imports this module
    sys.exit(main())
