"""Finding model files: the embedded default, paths, and (later) the download cache."""
