# Reference gls fits with a general (unstructured) corSymm correlation on the
# Orthodont subset used for "orthodont_cs_subset" in nlme_references.json.
#
# Usage:  Rscript tests/data/correlation/make_symm_subset.R [repo_root]
#
# Writes tests/data/correlation/nlme_symm_subset.json with two models:
#   orthodont_symm_subset      corSymm(form = ~ 1 | Subject)
#       (position = order of the row within its Subject in the subset data,
#        i.e. 1..n_i -- NOT the age occasion when a subject has dropped rows)
#   orthodont_symm_age_subset  corSymm(form = ~ I(age/2 - 3) | Subject)
#       (position = occasion index from age: 8,10,12,14 -> 1,2,3,4)
# Every double is written with sprintf("%.17g") (jsonlite json_verbatim), so
# it round-trips exactly.

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
root <- if (length(args) >= 1) args[[1]] else {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f) == 1) normalizePath(file.path(dirname(f), "..", "..", "..")) else "."
}
data_dir <- file.path(root, "reml_fn", "datasets", "data")
out_dir <- file.path(root, "tests", "data", "correlation")

refs <- fromJSON(file.path(out_dir, "nlme_references.json"), simplifyVector = TRUE)
rows <- as.integer(refs$models$orthodont_cs_subset$rows)

O <- read.csv(file.path(data_dir, "Orthodont.csv"))
O$rownames <- NULL
O$Subject <- factor(O$Subject)          # plain factor, alphabetical levels
sub <- O[rows, ]
stopifnot(all(sub$age %in% c(8, 10, 12, 14)))

m1 <- gls(distance ~ age, data = sub,
          correlation = corSymm(form = ~ 1 | Subject), method = "REML")
m2 <- gls(distance ~ age, data = sub,
          correlation = corSymm(form = ~ I(age/2 - 3) | Subject), method = "REML")

num <- function(x) structure(sprintf("%.17g", x), class = "json")
pairs <- c("(1,2)", "(1,3)", "(1,4)", "(2,3)", "(2,4)", "(3,4)")

extract <- function(m, call_str) {
  cs <- m$modelStruct$corStruct
  rho <- as.numeric(coef(cs, unconstrained = FALSE))
  stopifnot(length(rho) == 6)
  R <- diag(4)
  R[lower.tri(R)] <- rho                 # nlme order: (1,2),(1,3),(1,4),(2,3),...
  R <- R + t(R) - diag(4)
  # cross-check against nlme's own matrix for a complete subject
  full <- names(which(table(getGroups(m)) == 4))[1]
  Rn <- corMatrix(cs)[[full]]
  if (call_str != "" && !is.null(Rn)) stopifnot(max(abs(unname(Rn) - R)) < 1e-12)
  fe <- coef(m)
  list(
    call = call_str,
    rows = rows,
    nobs = as.integer(m$dims$N),
    logLik = num(as.numeric(logLik(m))),
    fixef = setNames(lapply(as.numeric(fe), num), names(fe)),
    sigma = num(as.numeric(m$sigma)),
    correlations = setNames(lapply(rho, num), pairs),
    correlation_pairs = pairs,
    correlation_matrix = lapply(seq_len(4), function(i) lapply(R[i, ], num))
  )
}

out <- list(
  orthodont_symm_subset = extract(m1,
    'gls(distance ~ age, data = Orthodont[rows, ], correlation = corSymm(form = ~ 1 | Subject), method = "REML")'),
  orthodont_symm_age_subset = extract(m2,
    'gls(distance ~ age, data = Orthodont[rows, ], correlation = corSymm(form = ~ I(age/2 - 3) | Subject), method = "REML")')
)
txt <- toJSON(out, auto_unbox = TRUE, pretty = TRUE, json_verbatim = TRUE, digits = NA)
writeLines(txt, file.path(out_dir, "nlme_symm_subset.json"))
cat("wrote", file.path(out_dir, "nlme_symm_subset.json"), "\n")
