"""What the participant level reads: BOLD runs found with pybids (discovery, their sidecars and
filters) and NIfTI data streamed from disk. Nothing here knows HDF5."""
