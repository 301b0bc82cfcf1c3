#!/usr/bin/env Rscript
# Voxel series that the real fmristore reads from a bids_fmristore H5ParcellatedMultiScan;
# tests/r/check_multiscan.py prints the same figures from the file through HDF5's own filters
# (h5py) and from the source BOLD (nibabel). Not run by pytest.
# Usage: Rscript tests/r/check_multiscan.R FILE.h5 MASK_INDICES.txt  (1-based, mask order)
suppressPackageStartupMessages({library(fmristore); library(neuroim2)})
args <- commandArgs(TRUE)
f6 <- function(x) paste(trimws(formatC(x, digits = 10, format = "g")), collapse = " ")
x <- suppressMessages(H5ParcellatedMultiScan(args[1]))
idx <- scan(args[2], quiet = TRUE)
cat("class:", class(x)[1], "runs:", names(x@runs), "\n")
for (name in names(x@runs)) {
  s <- series(x@runs[[name]], idx)
  cat(name, class(x@runs[[name]])[1], "dim", dim(s), "sum", f6(sum(as.numeric(s))),
      "first", f6(head(as.vector(s), 4)), "\n")
}
