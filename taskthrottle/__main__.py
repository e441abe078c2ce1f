"""``python -m taskthrottle``: the same as the ``taskthrottle`` command."""

from taskthrottle.cli import main

raise SystemExit(main())
