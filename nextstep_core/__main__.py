import sys

try:
    from .frontend.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command line's own handler is in place
    print("\ninterrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
