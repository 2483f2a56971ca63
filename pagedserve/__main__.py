"""``python -m pagedserve`` is the ``pagedserve`` command."""

from pagedserve.entrypoints.cli import main

raise SystemExit(main())
