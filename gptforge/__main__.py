"""`python -m gptforge ...` (what `torchrun -m gptforge train ...` runs) is the `gptforge` command."""

import sys

from gptforge.cli import main

sys.exit(main())
