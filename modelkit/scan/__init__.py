"""Static scanning of model files (imports ``modelkit.formats`` only, never torch)."""

from .engine import scan, scan_file
from .report import FileReport, Finding, ScanReport

__all__ = ["FileReport", "Finding", "ScanReport", "scan", "scan_file"]
