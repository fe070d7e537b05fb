"""One inbox file on its way through the daemon, and the states it passes through.

    QUEUED ─claim─▶ CLAIMED ─decode─▶ DECODED ─upscale─▶ UPSCALED ─encode+write─▶ WRITTEN ─original─▶ DONE
       any stage, the image is at fault ──▶ REJECTED ─move to failed/─▶ FAILED
       any stage, the environment is at fault (disk full, ...) ──▶ RETRY ─back-off─▶ (resumes)
       shutdown before the output is durable ──▶ RELEASED (renamed back into the inbox)

Only `worker.Worker.advance` changes `Job.state`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class JobState(str, Enum):
    QUEUED = "queued"  # seen in the inbox and ready, not yet claimed
    CLAIMED = "claimed"  # renamed into our owner folder: no other daemon can take it
    DECODED = "decoded"  # pixels in memory, waiting for the inference thread
    UPSCALED = "upscaled"  # output pixels in memory, waiting to be encoded
    WRITTEN = "written"  # output durable in the outbox; the original still claimed
    DONE = "done"  # original moved to done/ (or deleted, or kept)
    REJECTED = "rejected"  # cannot be processed; on its way to failed/
    FAILED = "failed"  # original in failed/ beside NAME.error.json
    RETRY = "retry"  # a transient problem; resumes at `Job.resume` after a back-off
    RELEASED = "released"  # given back to the inbox unfinished (shutdown)


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.RETRY, JobState.RELEASED})


class Stage(str, Enum):
    """What the daemon was doing when something went wrong (written to NAME.error.json)."""

    CLAIM = "claim"
    DECODE = "decode"
    UPSCALE = "upscale"
    WRITE = "write"
    ORIGINAL = "original"  # moving the original to done/ or failed/


STAGE_OF = {
    JobState.CLAIMED: Stage.DECODE,
    JobState.DECODED: Stage.UPSCALE,
    JobState.UPSCALED: Stage.WRITE,
    JobState.WRITTEN: Stage.ORIGINAL,
    JobState.REJECTED: Stage.ORIGINAL,
}


@dataclass
class Failure:
    stage: Stage
    reason: str  # plain words, for people
    exception: str  # "Type: message"


@dataclass(eq=False)
class Job:
    rel: str  # path relative to the inbox, with forward slashes
    claimed: Path  # where the original lies while we own it
    state: JobState = JobState.CLAIMED
    resume: JobState = JobState.CLAIMED  # where a RETRY starts again
    attempts: int = 0  # transient failures so far
    retry_at: float = 0.0  # time.monotonic() of the next attempt
    problem: str = ""  # the transient problem, for the status
    failure: Failure | None = None
    released: bool = False
    # Data between stages (dropped as soon as the next stage has it).
    decoded: Any = None
    encoded: Any = None
    # What the log line and the status report.
    input_bytes: int = 0
    size: tuple[int, int] = (0, 0)
    output: Path | None = None
    original: Path | None = None  # where the original went once DONE (done/NAME-1.ext after a clash); None: deleted
    model_version: str = ""  # the model that upscaled it (set by the inference thread)
    model_scale: int = 0  # that model's native scale
    scale: float = 0.0  # the output's scale relative to the input (output.scale, long_side, or the model's)
    out_size: tuple[int, int] = (0, 0)  # the output's (W, H)
    timings: dict[str, float] = field(default_factory=dict)
    # An upload's own output.scale/long_side/format (daemon/requests.py); None: the configured output.
    request: dict[str, Any] | None = None
    request_file: Path | None = None  # where it was recorded; removed once the job is DONE or FAILED
    request_checked: bool = False
    claimed_at: float = field(default_factory=time.monotonic)
    # Held while the job touches the file system, so a shutdown release never races a write.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
