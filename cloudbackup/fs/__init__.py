"""Files and trees by directory descriptor: the iterative walker, atomic writes, tree
removal and counts. Knows nothing of tar or S3."""
