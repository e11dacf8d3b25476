"""Entry point of every torchrun rank: read a job spec, join the group, run the job kind.

    python -m torch.distributed.run --standalone --nproc-per-node 3 -m launch.worker runs/<id>/spec.json

Rank 0 writes ``result.json`` next to the spec. Errors are recorded by torchrun's ``@record``
into the file named by TORCHELASTIC_ERROR_FILE so the launcher can show the failing rank's
traceback.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from lowbit.dist import init_from_env


def _tp_check(group, spec: dict) -> dict | None:
    from lowbit.tpcheck import DEFAULT_PROMPT, run_tp_check
    return run_tp_check(group, spec["model"], spec.get("prompt") or DEFAULT_PROMPT,
                        int(spec.get("max_new_tokens", 16)))


KINDS = {"tp-check": _tp_check}


@record
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path = Path(argv[0])
    spec = json.loads(spec_path.read_text())
    group = init_from_env(spec.get("backend", "auto"), timeout_s=float(spec.get("collective_timeout_s", 120)))
    result = KINDS[spec["kind"]](group, spec)
    if group.rank == 0 and result is not None:
        tmp = spec_path.parent / "result.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(spec_path.parent / "result.json")
    group.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
