"""`python -m sae ...`: the `sae` command, as torchrun's `-m sae` entry needs it."""

from sae.cli import main

raise SystemExit(main())
