"""A keyed Prefect progress artifact that advances through the stages and the QAT epochs."""

from __future__ import annotations

from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact

# (stage, share of the run in percent): QAT dominates a real run.
STAGES = [("validate", 2), ("stage", 8), ("float", 5), ("ptq", 10), ("fallback", 10),
          ("qat", 45), ("qat-export", 5), ("benchmark", 8), ("gate", 2), ("report", 5)]


class Progress:
    """Progress of one flow run, shown on the run's page and on the Artifacts page."""

    def __init__(self, key: str = "quantlab-progress", run_label: str = ""):
        self.key = key
        self.artifact_id: UUID = create_progress_artifact(
            progress=0.0, key=key, description=f"quantize {run_label}".strip())
        self.percent = 0.0

    def _set(self, percent: float, description: str) -> None:
        self.percent = max(self.percent, min(100.0, percent))
        update_progress_artifact(self.artifact_id, progress=self.percent, description=description)

    def done(self, stage: str) -> None:
        """Mark a stage (and all before it) complete."""
        names = [s for s, _ in STAGES]
        total = sum(share for _, share in STAGES[:names.index(stage) + 1])
        self._set(total, f"{stage} done")

    def qat_epoch(self, epoch: int, epochs: int, variant: str = "QAT", part: int = 0,
                  parts: int = 1) -> None:
        """Epoch `epoch` of `epochs` of QAT variant number `part` (0-based) of `parts` is done."""
        before = sum(share for s, share in STAGES[:[s for s, _ in STAGES].index("qat")])
        share = dict(STAGES)["qat"]
        self._set(before + share * (part * epochs + epoch) / (parts * epochs),
                  f"{variant} epoch {epoch}/{epochs} done")
