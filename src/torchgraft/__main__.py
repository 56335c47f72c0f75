"""``python -m torchgraft``: the command line (see :mod:`torchgraft.cli`)."""

from torchgraft.cli import main

raise SystemExit(main())
