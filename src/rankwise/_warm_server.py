"""Imported only by the warm fork server (rankwise.warm preloads it last): the server dies with the sweep.

multiprocessing's fork server is meant to exit when its parent closes a pipe, but a server holding torch's
threads was seen to outlive a SIGKILLed sweep, and its runs with it. The kernel's parent-death signal does not
depend on the server noticing anything; its runs ask for the same signal when the server dies.
"""

import signal
import sys

if sys.platform.startswith("linux"):
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
