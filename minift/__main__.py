"""`python -m minift ...` is the `minift` command (torchrun starts programs this way: `torchrun -m minift`)."""

from minift.cli import main

raise SystemExit(main())
