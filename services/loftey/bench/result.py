"""The result of one benchmark run (a server's or the transformers baseline's), and its JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loftey.bench.metrics import BenchSummary, RequestRecord
from loftey.bench.server_stats import ServerLoad

# Label of the transformers generate() baseline's runs.
BASELINE_LABEL = "transformers generate()"


@dataclass
class RunResult:
    """Everything one run measured, as written to its JSON file."""

    label: str
    workload: str
    load: str
    # GetModelInfo of the server: model_id, dtype, executor, expert_groups, ...
    model_info: dict
    summary: BenchSummary
    server: ServerLoad | None
    records: list[RequestRecord] = field(default_factory=list)
    # Free-form facts of the point (sweep coordinates, stack start-up seconds, ...).
    extra: dict = field(default_factory=dict)

    def to_dict(self, with_records: bool = True) -> dict:
        return {
            "label": self.label,
            "workload": self.workload,
            "load": self.load,
            "model_info": self.model_info,
            "summary": self.summary.to_dict(),
            "server": self.server.to_dict() if self.server else None,
            "extra": self.extra,
            "records": [asdict(record) for record in self.records] if with_records else [],
        }

    @classmethod
    def from_dict(cls, values: dict) -> RunResult:
        return cls(
            label=values["label"],
            workload=values["workload"],
            load=values["load"],
            model_info=values["model_info"],
            summary=BenchSummary.from_dict(values["summary"]),
            server=ServerLoad.from_dict(values["server"]) if values.get("server") else None,
            records=[RequestRecord(**record) for record in values.get("records", [])],
            extra=values.get("extra", {}),
        )


def write_results(path: Path, results: list[RunResult], with_records: bool = True) -> None:
    """Write runs to a JSON file as {"runs": [...]}, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = [result.to_dict(with_records) for result in results]
    path.write_text(json.dumps({"runs": runs}, indent=1) + "\n", encoding="utf-8")


def read_results(path: Path) -> list[RunResult]:
    return [RunResult.from_dict(run) for run in json.loads(path.read_text(encoding="utf-8"))["runs"]]
