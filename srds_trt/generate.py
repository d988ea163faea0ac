"""`python -m srds_trt.generate`: the generate command (srds_trt.cli.generate)."""

if __name__ == "__main__":
    from .cli.common import exit_on_signals  # light: the command imports torch inside main()

    exit_on_signals("srds_trt.generate", "nothing was written")  # one line and exit 130, also while torch imports
    from .cli.generate import _exit, main

    _exit(main())
else:
    from .cli.generate import main  # noqa: F401
