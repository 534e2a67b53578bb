"""``python -m zflora_compile.export ...``: the ``zcompile export`` subcommands."""

import sys

from zflora_compile.export.cli import main

sys.exit(main())
