#!/usr/bin/env Rscript
# Open bids_fmristore's --dense and --latent files with the real fmristore and print what it
# reads; tests/r/check_dense_latent.py prints the same figures from Python for comparison.
# Not run by pytest.  Usage: Rscript tests/r/check_dense_latent.R DENSE.h5 LATENT.lv.h5
suppressPackageStartupMessages({library(fmristore); library(neuroim2)})
args <- commandArgs(TRUE)
f6 <- function(x) paste(trimws(formatC(x, digits = 10, format = "g")), collapse = " ")

vec <- H5NeuroVec(args[1])                      # default dataset_name = "data"
sp <- space(vec)
cat("dense class:", class(vec)[1], "\n")
cat("dense dim:", dim(vec), "\n")
cat("dense spacing:", f6(spacing(sp)), "\n")
cat("dense origin:", f6(origin(sp)), "\n")
cat("dense trans:", f6(as.vector(trans(sp))), "\n")
arr <- as.array(vec[, , , ])
cat("dense sum:", f6(sum(as.numeric(arr))), "\n")
cat("dense vol1 sum:", f6(sum(as.numeric(arr[, , , 1]))), "\n")
cat("dense series[3,4,2]:", f6(head(series(vec, matrix(c(3L, 4L, 2L), 1)), 5)), "\n")
close(vec)

lv <- suppressMessages(load_data(fmristore:::LatentNeuroVecSource(args[2])))
lsp <- space(lv)
cat("latent class:", class(lv)[1], "\n")
cat("latent dim:", dim(lv), "\n")
cat("latent k:", ncol(as.matrix(lv@basis)), "n_mask:", sum(lv@mask), "\n")
cat("latent spacing:", f6(spacing(lsp)), "\n")
cat("latent origin:", f6(origin(lsp)), "\n")
cat("latent trans:", f6(as.vector(trans(lsp))), "\n")
la <- as.array(lv)
cat("latent sum:", f6(sum(la)), "\n")
cat("latent vol1 sum:", f6(sum(la[, , , 1])), "\n")
cat("latent series[3,4,2]:", f6(head(la[3, 4, 2, ], 5)), "\n")
cat("latent basis head:", f6(head(as.vector(as.matrix(lv@basis)), 3)), "\n")
cat("latent offset head:", f6(head(lv@offset, 3)), "\n")
