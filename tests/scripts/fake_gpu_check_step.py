"""A stand-in for one bench.gpu_check step, for tests/test_gpu_check.py (which patches
``gpu_check.step_command`` to run it): the orchestrator's time-out and stop paths are tested with a
step that cannot finish, never with a real step under a limit it may or may not meet.

    python tests/scripts/fake_gpu_check_step.py hang|finish NAME OUT DEVICE LIMIT_S

``hang`` saves partial results the way a real step does (``StepRecord``), starts a helper
process in its own process group (as a real step starts torchrun ranks), records the helper's
pid, then sleeps far past any limit. ``finish`` saves one check and finishes at once.
"""
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.gpu_check import StepRecord  # noqa: E402

mode, name, out, device, limit_s = sys.argv[1:6]
rec = StepRecord(Path(out), name, device, True, float(limit_s))
if mode == "finish":
    rec["checks"] = {"measured": True}
    rec.finish()
    sys.exit(0)
helper = subprocess.Popen(["sleep", "3600"])  # same process group as this step
rec["checks"] = {"partial": True}
rec["helper_pid"] = helper.pid
rec.save()
print("partial results saved; sleeping past the limit", flush=True)
time.sleep(3600)
