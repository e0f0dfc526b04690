"""Optional experiment trackers (``training.report_to``): every logged step also goes to MLflow
or TensorBoard. Both are optional packages; ``methods.check_runs_here`` says so before a run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _MlflowTracker:
    def __init__(self, name: str, params: dict[str, Any]):
        # MLflow 3 reports usage to its makers unless told not to; a run contacts only what it was
        # pointed at (the tracking store). MLFLOW_DISABLE_TELEMETRY=false in the environment opts in.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self._mlflow = mlflow
        self._run = mlflow.start_run(run_name=name)
        mlflow.log_params(params)

    def log(self, record: dict[str, Any]) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self._mlflow.log_metrics(metrics, step=int(record["step"]))

    def close(self) -> None:
        self._mlflow.end_run()


class _TensorboardTracker:
    def __init__(self, log_dir: Path, params: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(log_dir))
        self._writer.add_text("config", "\n".join(f"{k}: {v}" for k, v in params.items()))

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(f"train/{key}", value, int(record["step"]))

    def close(self) -> None:
        self._writer.close()


def open_tracker(kind: str | None, run_dir: Path, run_name: str, params: dict[str, Any]) -> Tracker | None:
    """The tracker named by ``training.report_to`` (None for none). TensorBoard writes into
    ``run_dir/tensorboard``; MLflow into its configured tracking store (MLFLOW_TRACKING_URI), with
    its usage telemetry off unless the environment turns it on."""
    if kind == "mlflow":
        return _MlflowTracker(run_name, params)
    if kind == "tensorboard":
        return _TensorboardTracker(run_dir / "tensorboard", params)
    return None
