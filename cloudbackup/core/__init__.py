"""The bottom layer, pure: errors, names and manifests (the one parser), the retention
planner, outcomes and exit codes, the glob dialect, the scrubbed child environment."""
