"""Test-session setup shared by every test file."""
import os

import torch

# Without a GPU the Triton kernels run in Triton's CPU interpreter. It must be chosen before any
# kernel module is imported, hence here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_unconfigure(config):
    """A watchdog for the interpreter's exit. Once a CI run printed its summary (every test passed)
    and then never exited: a library thread held the exit until CI's 90-minute limit killed the job.
    If the process is still alive this long after the session, faulthandler (its own C thread, no
    GIL needed) prints every thread's stack and exits with status 1, so a hang at exit is a visible
    failure with its cause on stderr instead of a silent timeout."""
    import faulthandler
    import sys

    grace = float(os.environ.get("CLINVLA_TEST_EXIT_GRACE_S", "180"))
    if grace > 0:
        sys.__stderr__.write(f"\n(conftest: exit watchdog armed; if this process is still alive {grace:.0f} s "
                             "from now, every thread's stack follows and it exits with status 1)\n")
        sys.__stderr__.flush()
        faulthandler.dump_traceback_later(grace, exit=True, file=sys.__stderr__)
