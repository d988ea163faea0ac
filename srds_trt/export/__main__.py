"""`python -m srds_trt.export`: the export command (srds_trt.cli.export)."""

import sys

from ..cli.export import main

sys.exit(main())
