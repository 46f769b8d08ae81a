"""``python -m automodel_plugins.cli``: the same as the ``automodel-plugins`` script."""

from automodel_plugins.cli import main

raise SystemExit(main())
