"""CheckpointManager's preemption handling, apart so the manager module stays short.

The signal handler only records the signal (``_preempt.PreemptionFlag``); the
decision to save and exit is reduced over ranks at the next step boundary.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..collectives import Group
from ..errors import ShardckptError
from .preemption import PreemptionFlag, exit_code_for

__all__ = ["PreemptionMixin"]


class PreemptionMixin:
    """``install_signal_handlers`` and the agreement behind it, for ``CheckpointManager``."""

    _preempt: PreemptionFlag | None
    _exit_code: int | None
    _ctl: Group

    if TYPE_CHECKING:  # provided by CheckpointManager
        def _check_open(self) -> None: ...
        def close(self) -> None: ...
        def _info(self, msg: str, *args: Any) -> None: ...

    def install_signal_handlers(
        self,
        signals: Sequence[int] = (signal.SIGTERM,),
        exit_code: int | None = None,
    ) -> None:
        """On ``signals``, save at the next ``should_save``/``save`` boundary and exit.

        The handler only records the signal. At the next ``should_save`` (reduced
        over ranks: one rank getting the signal is enough) it returns True, and
        ``save`` then saves synchronously on every rank (after finishing an
        in-flight async save), closes the manager and calls ``sys.exit`` with
        ``exit_code``: by default 128 + the signal number (143 for SIGTERM), what
        a shell reports for a process the signal killed. Call it on every rank
        (it makes ``should_save`` a collective), from the main thread.

        torchrun's elastic agent marks a worker whose exit code is not 0 as FAILED
        (``torch/distributed/elastic/multiprocessing/api.py``) and, while
        ``--max-restarts`` allows, restarts the whole worker group
        (``agent/server/api.py``), which resumes with ``restore``. Exit code 0
        would read as success and end the job, so it is refused::

            torchrun --nproc-per-node=8 --max-restarts=3 train.py

        If the agent itself gets SIGTERM (the node is preempted) it forwards it to
        the workers, waits ``--shutdown-timeout`` (30 s) before SIGKILL and does not
        restart: the save must fit in that grace period, and the scheduler's
        requeue resumes from the checkpoint.
        """
        self._check_open()
        if exit_code is not None and (not isinstance(exit_code, int) or not 1 <= exit_code <= 255):
            raise ValueError(f"exit_code must be in 1..255 (0 means success to torchrun: no restart), got {exit_code!r}")
        if self._preempt is not None:
            self._preempt.uninstall()
        self._preempt = PreemptionFlag(signals)
        self._exit_code = exit_code

    @property
    def preemption_pending(self) -> bool:
        """Whether this rank received one of the installed signals (not reduced over ranks)."""
        return self._preempt is not None and self._preempt.pending

    def _agree_preemption(self) -> int:
        """The signal any rank received (0 if none), the same value on every rank."""
        if self._preempt is None:
            return 0
        mine = self._preempt.received or 0
        return self._ctl.max_over_ranks("agreeing on a preemption", mine, ShardckptError)

    def _exit_preempted(self, signum: int, step: int) -> None:
        code = self._exit_code if self._exit_code is not None else exit_code_for(signum)
        self.close()
        # Nobody exits before rank 0 finished retention and released the marker:
        # the first exit makes the launcher SIGTERM (then SIGKILL) the others.
        self._ctl.barrier("waiting for every rank before the preemption exit")
        self._info("preemption (%s): saved step %d, exiting with code %d for a restart",
                   signal.Signals(signum).name, step, code)
        sys.exit(code)

