"""The run report: training curves, adapter update norms, config, diagnosis and before/after evaluation."""

from lorafit.report.build import write_report
from lorafit.report.norms import ModuleNorm, adapter_update_norms

__all__ = ["ModuleNorm", "adapter_update_norms", "write_report"]
