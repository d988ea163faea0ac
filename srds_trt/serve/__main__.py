"""`python -m srds_trt.serve`: the serve command (srds_trt.cli.serve)."""

import sys

from ..cli.serve import exit_on_signals

exit_on_signals()  # Ctrl-C / SIGTERM before serving is one line; uvicorn's drain takes the signals over later
from ..cli.serve import main  # noqa: E402

sys.exit(main())
