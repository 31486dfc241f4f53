"""The experiment pipeline built on the core: config, stages, checkpoints, report, command line.

Imported on first use (``bn.pipeline``), so importing the core loads neither pyyaml nor
matplotlib. ``bn.pipeline.run(cfg, out)`` runs every stage of a config and writes its report.
"""

from bayesnoise.pipeline import config as config
from bayesnoise.pipeline.stages import STAGES as STAGES
from bayesnoise.pipeline.stages import run as run

__all__ = ["STAGES", "config", "run"]
