"""Entry point of `python -m bench.session`; see bench/session/__init__.py and bench/README.md."""
import sys

from bench.session import main

sys.exit(main())
