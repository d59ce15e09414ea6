"""Load generation with wrk, a separate process, driven by `requests.lua`; and the statistics of several runs."""

from __future__ import annotations

import json
import statistics
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "requests.lua"


@dataclass(frozen=True)
class Line:
    """One request wrk may send; `{n}` in the body is replaced by a value unique to the request."""

    method: str
    path: str
    token: str
    body: str = ""

    def render(self) -> str:
        return "\t".join((self.method, self.path, self.token, self.body))


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    socket_errors: int
    statuses: dict[int, int]
    codes: dict[str, int] = field(default_factory=dict)  # "503 busy": count, for answers >= 400

    @property
    def rate(self) -> float:
        return self.requests / self.seconds

    @property
    def unexpected(self) -> int:
        """Answers that were not 2xx, plus socket errors: a run with any is not a clean measurement."""
        return self.socket_errors + sum(count for status, count in self.statuses.items() if not 200 <= status < 300)


def write_lines(path: Path, lines: Sequence[Line]) -> Path:
    path.write_text("".join(line.render() + "\n" for line in lines))
    return path


def wrk(
    url: str, lines_file: Path, *, connections: int, seconds: float, threads: int = 1, timeout: float = 30.0
) -> WrkResult:
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s",
        "-s", str(SCRIPT), url, "--", str(lines_file), uuid.uuid4().hex[:8], str(threads),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + timeout + 30, check=False)
    for out_line in done.stdout.splitlines():
        if out_line.startswith("WRK-RESULT "):
            raw = json.loads(out_line.removeprefix("WRK-RESULT "))
            return WrkResult(
                requests=raw["requests"],
                seconds=raw["duration_us"] / 1e6,
                p50_ms=raw["p50_us"] / 1000,
                p90_ms=raw["p90_us"] / 1000,
                p95_ms=raw["p95_us"] / 1000,
                p99_ms=raw["p99_us"] / 1000,
                socket_errors=raw["socket_errors"],
                statuses={int(status): count for status, count in raw["statuses"].items()},
                codes=raw.get("codes", {}),
            )
    raise RuntimeError(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """min-max of the runs, for the reader to judge the noise."""
    return f"{min(values):.1f}-{max(values):.1f}"
