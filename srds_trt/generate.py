"""`python -m srds_trt.generate`: the generate command (srds_trt.cli.generate)."""

from .cli.generate import main

if __name__ == "__main__":
    from .cli.generate import _exit

    _exit(main())
