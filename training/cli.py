"""`osteo-train COMMAND ...`: each command lives in its own module, which exposes `main(argv)`."""

from __future__ import annotations

import importlib
import sys

#: command name -> module implementing `main(argv: list[str]) -> int`.
COMMANDS: dict[str, str] = {
    "phantoms": "training.phantoms",
    "site-phantoms": "training.site_phantoms",
    "contact-sheet": "training.contact_sheet",
    "train": "training.train",
    "evaluate": "training.evaluate",
    "export": "training.export",
    "sweep": "training.sweep",
    "explain": "training.explain",
    "cam-select": "training.cam_select",
    "sizing-bundle": "training.sizing",
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: osteo-train {" + ",".join(COMMANDS) + "} ...", file=sys.stderr)
        if args and args[0] not in ("-h", "--help"):
            print(f"osteo-train: unknown command {args[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[args[0]])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
