"""Running a config: pre-flight of the models it needs and the dry-run plan."""
