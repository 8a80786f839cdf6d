"""``python -m arbiter``: the ``arbiter`` command."""

from arbiter.worker.cli import main

raise SystemExit(main())
