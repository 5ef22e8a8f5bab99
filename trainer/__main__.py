"""`python -m trainer ...`: the headless command line."""

from .cli import main

raise SystemExit(main())
