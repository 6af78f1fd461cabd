"""`python -m proxy` is the `payswitch` command."""

from proxy.cli import main

raise SystemExit(main())
