"""The other processes of a ``torch.distributed`` run: one that fails stops the others.

Processes that share out a slide wait for each other at barriers. Left to themselves, the others
would notice a dead process only at their next collective operation (after their whole share of
the slide), or never (NCCL waits until the process group's timeout). ``PeerWatch`` keeps them
informed through the run's key-value store (the one ``torch.distributed`` set up): every process
beats a counter from a thread; a process that fails posts its error (``fail``); the others look
between tiles and while they wait (``check``, ``barrier``) and stop with that error, or with a
"stopped answering" one when a counter stood still for ``SILENT_SECONDS`` (a killed process),
as a ``RunFailedError`` (exit status 1). What was finished stays for the resume.
"""

import itertools
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

from ..errors import RunFailedError

SILENT_SECONDS = 30.0  # a counter that stood still this long: its process is gone
STARTUP_SECONDS = 600.0  # a process that never beat yet (still loading its model)
BEAT_SECONDS = 2.0
POLL_SECONDS = 0.5
FAILED_KEY = "dessam/peers/failed"
RESUME = "the finished tiles are kept: run the same command again to go on"
_watches = itertools.count(1)  # the same in every process: each creates the same watches


@contextmanager
def watching(rank: int, world_size: int) -> Iterator[Optional["PeerWatch"]]:
    """A ``PeerWatch`` for the block when it runs in ``world_size`` > 1 processes under
    ``torch.distributed`` (else None): an error in the block is posted to the others, and the
    block ends at a barrier (after it, every process is alive and done: a gathering cannot
    hang)."""
    import torch.distributed as dist

    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        yield None
        return
    watch = PeerWatch(rank, world_size)
    try:
        yield watch
        watch.barrier()
    except RunFailedError:  # another process's failure: it posted its error
        raise
    except BaseException as e:
        watch.fail(e)
        raise
    finally:
        watch.close()


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


class PeerWatch:
    """Liveness and errors of the ``world_size`` processes of a run, seen from process ``rank``
    (``store``: a ``torch.distributed`` store; default: the default process group's)."""

    def __init__(self, rank: int, world_size: int, store=None):
        self.rank, self.world_size = rank, world_size
        self.store = store if store is not None else _default_store()
        self._prefix = f"dessam/peers/barrier/{next(_watches)}/"
        self._barriers = 0
        start = time.monotonic()
        self._seen: Dict[int, Tuple[Optional[int], float]] = {
            r: (None, start) for r in range(world_size) if r != rank
        }
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._beating, daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.store.add(f"dessam/peers/alive/{self.rank}", 1)

    def _beating(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            try:
                self._beat()
            except Exception:  # the store went with process 0: the others' check says so
                return

    def close(self) -> None:
        self._stop.set()

    def fail(self, error: BaseException) -> None:
        """Tell the others that this process stops with ``error`` (the first error posted is the
        one they report)."""
        message = f"process {self.rank} of {self.world_size} failed: {type(error).__name__}"
        if str(error):
            message += f": {str(error).splitlines()[0]}"
        try:
            self.store.compare_set(FAILED_KEY, "", message)
        except Exception:
            pass

    def check(self) -> None:
        """Raise ``RunFailedError`` if another process failed or stopped answering."""
        try:
            if self.store.check([FAILED_KEY]):
                message = self.store.get(FAILED_KEY).decode()
                raise RunFailedError(f"{message}; {RESUME}", 1)
            now = time.monotonic()
            for r, (count, since) in self._seen.items():
                value = self._count(f"dessam/peers/alive/{r}", 0)
                if value != count:
                    self._seen[r] = (value, now)
                elif now - since > (SILENT_SECONDS if value else STARTUP_SECONDS):
                    raise RunFailedError(
                        f"process {r} of {self.world_size} stopped answering "
                        f"{now - since:.0f} s ago (killed, out of memory, or its machine "
                        f"lost?); {RESUME}",
                        1,
                    )
        except RunFailedError:
            raise
        except Exception as e:  # the store lives in process 0
            raise RunFailedError(
                f"process 0 of {self.world_size} cannot be reached ({e}); {RESUME}", 1
            ) from None

    def barrier(self) -> None:
        """Wait until every process got here, checking the others while waiting."""
        self._barriers += 1
        key = f"{self._prefix}{self._barriers}"
        self._count(key, 1)
        while self._count(key, 0) < self.world_size:
            self.check()
            time.sleep(POLL_SECONDS)

    def _count(self, key: str, add: int) -> int:
        try:
            return self.store.add(key, add)
        except Exception as e:  # the store lives in process 0
            raise RunFailedError(
                f"process 0 of {self.world_size} cannot be reached ({e}); {RESUME}", 1
            ) from None
