"""fmristore HDF5 layouts: writers and lazy readers. Nothing here knows about BIDS."""
