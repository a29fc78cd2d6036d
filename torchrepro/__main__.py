"""``python -m torchrepro``: the same as the ``torchrepro`` command."""

from ._cli import main

raise SystemExit(main())
