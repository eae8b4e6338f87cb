"""``python -m btlm.cli …`` runs the ``btlm`` command line."""

import sys

from btlm.cli import main

sys.exit(main())
