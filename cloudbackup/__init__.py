"""cloudbackup: compressed, checksummed archives pushed to S3 and pruned by one planner."""

__version__ = "0.1.0"
