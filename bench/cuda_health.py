"""Whether this process's CUDA context still works: after a kernel faults (an illegal
or misaligned address, a trap) every later CUDA call fails with the same error, so the
test and benchmark drivers (run_tests.py, suite.py) name the fault once and go on in a
fresh process instead of blaming everything after it."""
import sys

# The exit status of a test round or benchmark round that lost its context (pytest's
# own codes are 0-5).
LOST_CONTEXT_RC = 17

_simulated_loss = None


def simulate_lost_context(why: str = "simulated loss of the CUDA context") -> None:
    """For the drivers' own tests on the CPU: every later check reports a loss."""
    global _simulated_loss
    _simulated_loss = why


def cuda_context_lost(limit: int = 4000):
    """None while CUDA works (or was never used in this process), else the error."""
    if _simulated_loss:
        return _simulated_loss
    torch = sys.modules.get("torch")  # never import torch just for the check
    if torch is None or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
        torch.ones(1, device="cuda").add_(1).item()
    except Exception as e:  # noqa: BLE001  any error here means the context is gone
        return f"{type(e).__name__}: {e}"[:limit]
    return None
