"""Entry point for launchers: ``torchrun --nproc_per_node N -m cllama_deploy.training pt|sft [flags]``.

The same flags as ``cllama-deploy train pt|sft``; user errors print one line and exit 2. Under torchrun
that line is followed by torchrun's own report of the failed worker (a ``ChildFailedError`` traceback):
with ``CLLAMA_ERROR_FILE`` set, the line is also appended to that file, so the launch recipes
(training/run_*.sh) can print it again after torchrun's report, last and alone.
"""

from __future__ import annotations

import os
import sys

ERROR_FILE_ENV = "CLLAMA_ERROR_FILE"


def _record_error(line: str) -> None:
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:
        # one write of one line in append mode: the lines of several failing ranks do not interleave
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    except OSError:
        pass  # the error is on stderr already


def main(argv: list[str] | None = None) -> int:
    from cllama_deploy.errors import CllamaError
    from cllama_deploy.training.config import parse_args

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("CLLAMA_DEBUG"))
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in ("-h", "--help") or args[0] not in ("pt", "sft"):
        print("usage: python -m cllama_deploy.training {pt,sft} [options]  (see `... pt --help`)",
              file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        cfg = parse_args(args[0], args[1:])
        if cfg is None:
            return 0
        from cllama_deploy.training.run import train

        train(cfg)
    except CllamaError as exc:
        if debug:
            raise
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"error: {prefix}{exc}", file=sys.stderr)
        _record_error(f"error: {exc}")  # without the rank: every rank usually fails the same way
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
