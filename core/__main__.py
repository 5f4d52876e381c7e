"""``python -m core <command>``: the command-line interface (commands in ``core/cli/``)."""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the chosen command, turn expected failures into one-line errors."""
    from core.cli import build_parser
    from core.progress import Cancelled

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        # Bad input, missing files, unusable model files, unavailable weights: say what, not where.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
