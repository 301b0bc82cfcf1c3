"""Computation on signals: parcel means, voxel blocks and voxel moments of a run, in one
streaming pass. Nothing here knows BIDS or HDF5."""
