"""`python -m srds_trt.serve`: the serve command (srds_trt.cli.serve)."""

import sys

from ..cli.common import exit_on_signals

exit_on_signals("srds_trt.serve", "stopped before serving")  # uvicorn's drain takes the signals over later
from ..cli.serve import main  # noqa: E402

sys.exit(main())
