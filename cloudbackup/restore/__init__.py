"""Restore: which backup (select), where it goes (targets), and the pipeline that verifies,
extracts and installs it (apply)."""
