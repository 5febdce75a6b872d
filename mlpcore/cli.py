"""The command line: parse, run, and turn every failure into one message and an exit status.

Under MPI, an error that every rank knows about (bad options, a bad data
file: see :meth:`Launcher.raise_if_any`) ends each rank cleanly with status 2
and is printed once, by rank 0. Any other exception on any rank is printed by
that rank, with its rank and phase, and ends the whole job with
``MPI_Abort``: the other ranks may be blocked in a collective and would
otherwise wait forever.
"""

from __future__ import annotations

import os
import sys
import traceback

from .comm import env_rank
from .errors import MlpcoreError, UsageError

EXIT_USAGE = 2
EXIT_FAILURE = 1


def main(argv=None):
    from . import experiment
    from .config import parse_args

    state = experiment.STATE
    try:
        args = parse_args(argv)
        experiment.run(args)
        return 0
    except MlpcoreError as exc:
        code = EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FAILURE
        if getattr(exc, "collective", False) or not _multi_rank(state):
            # Every rank raised the same error (or there is only one): say it once.
            if (state.launcher.rank if state.launcher is not None else env_rank()) == 0:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return code
        _fail_job(state, str(exc), code, exc=exc)
        return code
    except KeyboardInterrupt:
        _fail_job(state, "interrupted", 130)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence against a hang
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        _fail_job(state, detail, EXIT_FAILURE, tb=traceback.format_exc(), exc=exc)
        return EXIT_FAILURE


def _multi_rank(state):
    return state.launcher is not None and state.launcher.comm is not None and state.launcher.size > 1


def _fail_job(state, message, code, tb=None, exc=None):
    """Print which rank failed where, then end every rank of the job."""
    # The phase the exception left (timing.PhaseTimer marks it), else the one now running.
    worker, phase = getattr(exc, "mlpcore_where", None) or (None, state.phase)
    if _multi_rank(state):
        where = f"rank {state.launcher.rank}, phase {phase}"
    elif worker is not None and phase != state.phase and state.launcher is not None and state.launcher.size > 1:
        where = f"worker {worker}, phase {phase}"  # in a joblib or serial worker, not the main process
    else:
        where = f"phase {phase}"
    if tb and os.environ.get("MLPCORE_DEBUG"):
        print(tb, file=sys.stderr)
    print(f"error ({where}): {message}", file=sys.stderr, flush=True)
    if _multi_rank(state):
        state.launcher.abort(code)
