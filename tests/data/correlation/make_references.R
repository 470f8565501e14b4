# Reference fits from R nlme for correlation / variance-function structures.
#
# Usage (from anywhere):  Rscript tests/data/correlation/make_references.R [repo_root]
#
# 1. Writes nlme::BodyWeight and nlme::Ovary as plain CSVs into
#    reml_fn/datasets/data/ (Orthodont.csv already exists there and is only
#    checked against nlme::Orthodont).
# 2. Reads the three CSVs back (so R fits exactly the numbers Python reads) and
#    fits each model with method = "REML" and the default control.
# 3. Writes tests/data/correlation/nlme_references.json; every double is written
#    with sprintf("%.17g") so it round-trips exactly; NA / non-finite -> null.
#
# Data conventions used for the fits (read back from CSV):
#   * grouping factors (Subject, Mare, Rat) are plain (unordered) factors;
#     Subject levels are alphabetical (F01..F11, M01..M16), Mare / Rat levels
#     are numeric order (1, 2, ...).
#   * Sex levels alphabetical (Female, Male); Diet levels "1","2","3"
#     (treatment contrasts -> fixef names Diet2, Diet3, Time:Diet2, Time:Diet3).
#   * Each full-data model is also refitted on the original nlme groupedData
#     object and the logLik recorded as "logLik_on_nlme_groupedData" (a check:
#     it should agree up to optimiser noise).
#
# Subsets: for each dataset separately, set.seed(20261207) then
#   drop <- sample(n, round(0.15 * n)); keep <- setdiff(seq_len(n), drop)
# (keep is in original row order); "rows" holds the kept 1-based indices.

suppressPackageStartupMessages({
  library(nlme)
})

args <- commandArgs(trailingOnly = TRUE)
root <- if (length(args) >= 1) args[[1]] else {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f) == 1) normalizePath(file.path(dirname(f), "..", "..", "..")) else "."
}
data_dir <- file.path(root, "reml_fn", "datasets", "data")
out_dir <- file.path(root, "tests", "data", "correlation")
stopifnot(dir.exists(data_dir))
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

# ------------------------------------------------------------------ datasets
write.csv(as.data.frame(nlme::BodyWeight), file.path(data_dir, "BodyWeight.csv"),
          row.names = FALSE)
write.csv(as.data.frame(nlme::Ovary), file.path(data_dir, "Ovary.csv"),
          row.names = FALSE)

Orthodont_csv <- read.csv(file.path(data_dir, "Orthodont.csv"),
                          stringsAsFactors = FALSE)
BodyWeight_csv <- read.csv(file.path(data_dir, "BodyWeight.csv"),
                           stringsAsFactors = FALSE)
Ovary_csv <- read.csv(file.path(data_dir, "Ovary.csv"), stringsAsFactors = FALSE)

# ----- checks against nlme's own data
O0 <- as.data.frame(nlme::Orthodont)
ortho_check <- list(
  distance_identical = identical(as.numeric(Orthodont_csv$distance), O0$distance),
  age_identical = identical(as.numeric(Orthodont_csv$age), O0$age),
  Subject_identical = identical(Orthodont_csv$Subject, as.character(O0$Subject)),
  Sex_identical = identical(Orthodont_csv$Sex, as.character(O0$Sex)),
  rownames_identical = identical(as.character(Orthodont_csv$rownames), rownames(O0))
)
B0 <- as.data.frame(nlme::BodyWeight)
V0 <- as.data.frame(nlme::Ovary)
bw_check <- list(
  weight_identical = identical(as.numeric(BodyWeight_csv$weight), B0$weight),
  Time_identical = identical(as.numeric(BodyWeight_csv$Time), B0$Time),
  Rat_identical = identical(as.character(BodyWeight_csv$Rat), as.character(B0$Rat)),
  Diet_identical = identical(as.character(BodyWeight_csv$Diet), as.character(B0$Diet))
)
ov_check <- list(
  follicles_identical = identical(as.numeric(Ovary_csv$follicles), V0$follicles),
  Time_identical = identical(as.numeric(Ovary_csv$Time), V0$Time),
  Mare_identical = identical(as.character(Ovary_csv$Mare), as.character(V0$Mare))
)
stopifnot(all(unlist(ortho_check)), all(unlist(bw_check)), all(unlist(ov_check)))

Orthodont <- data.frame(
  distance = as.numeric(Orthodont_csv$distance),
  age = as.numeric(Orthodont_csv$age),
  Subject = factor(Orthodont_csv$Subject),
  Sex = factor(Orthodont_csv$Sex)
)
BodyWeight <- data.frame(
  weight = as.numeric(BodyWeight_csv$weight),
  Time = as.numeric(BodyWeight_csv$Time),
  Rat = factor(BodyWeight_csv$Rat, levels = sort(unique(BodyWeight_csv$Rat))),
  Diet = factor(BodyWeight_csv$Diet, levels = sort(unique(BodyWeight_csv$Diet)))
)
Ovary <- data.frame(
  Mare = factor(Ovary_csv$Mare, levels = sort(unique(Ovary_csv$Mare))),
  Time = as.numeric(Ovary_csv$Time),
  follicles = as.numeric(Ovary_csv$follicles)
)

within_sorted <- function(t, g) all(tapply(t, g, function(x) !is.unsorted(x)))
within_strict <- function(t, g) all(tapply(t, g, function(x) !is.unsorted(x, strictly = TRUE)))
rows_contiguous <- function(g) {
  r <- rle(as.character(g))$values
  !any(duplicated(r))
}

# ------------------------------------------------------------------ subsets
subset_rows <- function(n) {
  set.seed(20261207)
  drop <- sample(n, round(0.15 * n))
  setdiff(seq_len(n), drop)
}
rows_O <- subset_rows(nrow(Orthodont))
rows_V <- subset_rows(nrow(Ovary))
rows_B <- subset_rows(nrow(BodyWeight))

# ------------------------------------------------------------------ JSON writer
num_json <- function(x) {
  if (is.na(x) || !is.finite(x)) "null" else sprintf("%.17g", x)
}
str_json <- function(s) if (is.na(s)) "null" else jsonlite::toJSON(s, auto_unbox = TRUE)
arr <- function(x) if (is.null(x)) NULL else structure(x, json_array = TRUE)  # force array even if length 1
to_json <- function(x, indent = 0) {
  pad <- strrep("  ", indent + 1)
  pad0 <- strrep("  ", indent)
  if (is.null(x)) return("null")
  if (is.list(x)) {
    if (length(x) == 0) return(if (is.null(names(x))) "[]" else "{}")
    items <- vapply(x, to_json, "", indent = indent + 1)
    if (!is.null(names(x))) {
      items <- paste0(vapply(names(x), str_json, ""), ": ", items)
      return(paste0("{\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", pad0, "}"))
    }
    return(paste0("[\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", pad0, "]"))
  }
  if (is.matrix(x)) {
    rows <- lapply(seq_len(nrow(x)), function(i) arr(unname(x[i, ])))
    return(to_json(rows, indent))
  }
  force_arr <- isTRUE(attr(x, "json_array"))
  if (is.factor(x)) x <- as.character(x)
  el <- if (is.logical(x)) ifelse(is.na(x), "null", ifelse(x, "true", "false"))
        else if (is.integer(x)) ifelse(is.na(x), "null", sprintf("%d", x))
        else if (is.numeric(x)) vapply(x, num_json, "")
        else vapply(as.character(x), str_json, "")
  if (!is.null(names(x))) {
    return(paste0("{", paste0(vapply(names(x), str_json, ""), ": ", el, collapse = ", "), "}"))
  }
  if (length(x) == 1 && !force_arr) return(el)
  paste0("[", paste(el, collapse = ", "), "]")
}

# ------------------------------------------------------------------ extraction
struct_coef <- function(s) {
  if (is.null(s)) return(NULL)
  cf <- coef(s, unconstrained = FALSE)
  cu <- coef(s, unconstrained = TRUE)
  list(class = class(s)[1],
       formula = paste(deparse(formula(s)), collapse = ""),
       natural = if (length(cf)) setNames(as.numeric(cf), names(cf)) else NULL,
       natural_names = arr(names(cf)),
       unconstrained = if (length(cu)) setNames(as.numeric(cu), names(cu)) else NULL,
       fixed = if (!is.null(attr(s, "fixed"))) attr(s, "fixed") else NULL)
}

extract <- function(m, call_str, data_name, rows, extra = list()) {
  is_lme <- inherits(m, "lme")
  fe <- if (is_lme) fixef(m) else coef(m)
  se <- sqrt(diag(vcov(m)))
  ll <- logLik(m)
  res <- list(
    call = call_str,
    data = data_name,
    rows = if (is.null(rows)) NULL else arr(as.integer(rows)),
    nobs = as.integer(m$dims$N),
    method = m$method,
    logLik = as.numeric(ll),
    df = as.integer(attr(ll, "df")),
    AIC = AIC(m),
    BIC = BIC(m),
    fixef = setNames(as.numeric(fe), names(fe)),
    fixef_names = arr(names(fe)),
    fixef_se = setNames(as.numeric(se), names(fe)),
    sigma = as.numeric(m$sigma)
  )
  if (is_lme) {
    vc <- getVarCov(m)                       # random-effects covariance (numeric)
    cm <- matrix(as.numeric(vc), nrow(vc), dimnames = dimnames(vc))
    sds <- sqrt(diag(cm))
    vcp <- VarCorr(m)                        # character matrix as printed
    res$ngroups <- setNames(as.integer(m$dims$ngrps[seq_len(m$dims$Q)]),
                            names(m$dims$ngrps)[seq_len(m$dims$Q)])
    res$random <- list(
      group = names(m$dims$ngrps)[1],
      terms = arr(rownames(cm)),
      sd = setNames(as.numeric(sds), rownames(cm)),
      cov = cm,
      corr = if (nrow(cm) > 1) cov2cor(cm) else NULL,
      residual_sd = as.numeric(m$sigma),
      VarCorr_printed = list(rownames = arr(rownames(vcp)),
                             colnames = arr(colnames(vcp)),
                             values = matrix(as.character(vcp), nrow(vcp)))
    )
  }
  res$corStruct <- struct_coef(m$modelStruct$corStruct)
  res$varStruct <- struct_coef(m$modelStruct$varStruct)
  if (!is.null(m$modelStruct$varStruct)) {
    vs <- m$modelStruct$varStruct
    gn <- attr(vs, "groupNames")
    if (!is.null(gn)) {
      res$varStruct$groupNames_order <- arr(gn)
      res$varStruct$reference_level <- gn[1]
    }
  }
  c(res, extra)
}

fits <- list()
errors <- list()
warns <- list()

run <- function(key, call_str, data_name, dat, rows = NULL, check = NULL, extra_fn = NULL) {
  d <- if (is.null(rows)) dat else dat[rows, , drop = FALSE]
  env <- list2env(list(d = d), parent = globalenv())
  w <- character(0)
  m <- tryCatch(
    withCallingHandlers(eval(parse(text = call_str), envir = env),
                        warning = function(cw) {
                          w <<- c(w, conditionMessage(cw)); invokeRestart("muffleWarning")
                        }),
    error = function(e) e)
  if (inherits(m, "error")) {
    message(key, ": ERROR ", conditionMessage(m))
    fits[[key]] <<- list(call = call_str, data = data_name,
                         rows = if (is.null(rows)) NULL else arr(as.integer(rows)),
                         error = conditionMessage(m))
    return(invisible(NULL))
  }
  extra <- list(warnings = if (length(w)) arr(w) else NULL)
  if (!is.null(extra_fn)) extra <- c(extra, extra_fn(m))
  if (!is.null(check)) {
    m0 <- tryCatch(eval(parse(text = sub("\\bd\\b", check, call_str, perl = TRUE))),
                   error = function(e) e)
    extra$logLik_on_nlme_groupedData <- if (inherits(m0, "error")) NULL else as.numeric(logLik(m0))
  }
  fits[[key]] <<- extract(m, sub("\\bd\\b", data_name_r(data_name, rows), call_str, perl = TRUE),
                          data_name, rows, extra)
  message(sprintf("%-28s logLik = %.10f", key, as.numeric(logLik(m))))
  invisible(m)
}
data_name_r <- function(data_name, rows) {
  nm <- sub("\\.csv$", "", data_name)
  if (is.null(rows)) nm else paste0(nm, "[rows, ]")
}

symm_extra <- function(m) {
  cs <- m$modelStruct$corStruct
  M <- corMatrix(cs)[[1]]
  idx <- which(upper.tri(M), arr.ind = TRUE)
  idx <- idx[order(idx[, "row"], idx[, "col"]), , drop = FALSE]
  stopifnot(isTRUE(all.equal(unname(M[idx]), as.numeric(coef(cs, unconstrained = FALSE)))))
  list(corSymm_pairs = arr(paste0("(", idx[, "row"], ",", idx[, "col"], ")")),
       corMatrix_first_group = M,
       corMatrix_first_group_name = names(corMatrix(cs))[1])
}

# a
run("orthodont_cs", "gls(distance ~ age, d, correlation = corCompSymm(form = ~ 1 | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
# b
run("orthodont_symm", "gls(distance ~ age, d, correlation = corSymm(form = ~ 1 | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont", extra_fn = symm_extra)
# c
run("orthodont_ar1_lme", "lme(distance ~ age, d, random = ~ 1 | Subject, correlation = corAR1(form = ~ 1 | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
# d
run("ovary_ar1", "lme(follicles ~ sin(2*pi*Time) + cos(2*pi*Time), d, random = ~ 1 | Mare, correlation = corAR1(form = ~ 1 | Mare), method = \"REML\")",
    "Ovary.csv", Ovary, check = "nlme::Ovary")
# e
run("bodyweight_car1", "lme(weight ~ Time * Diet, d, random = ~ Time | Rat, correlation = corCAR1(form = ~ Time | Rat), method = \"REML\")",
    "BodyWeight.csv", BodyWeight, check = "nlme::BodyWeight")
# f
run("orthodont_varident", "lme(distance ~ age, d, random = ~ 1 | Subject, weights = varIdent(form = ~ 1 | Sex), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
# g
run("orthodont_exp_gls", "gls(distance ~ age, d, correlation = corExp(form = ~ age | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
run("orthodont_exp_nugget_gls", "gls(distance ~ age, d, correlation = corExp(form = ~ age | Subject, nugget = TRUE), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
run("orthodont_gaus_gls", "gls(distance ~ age, d, correlation = corGaus(form = ~ age | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, check = "nlme::Orthodont")
# h: unbalanced subsets
run("orthodont_ar1_lme_subset", "lme(distance ~ age, d, random = ~ 1 | Subject, correlation = corAR1(form = ~ 1 | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, rows = rows_O)
run("ovary_ar1_subset", "lme(follicles ~ sin(2*pi*Time) + cos(2*pi*Time), d, random = ~ 1 | Mare, correlation = corAR1(form = ~ 1 | Mare), method = \"REML\")",
    "Ovary.csv", Ovary, rows = rows_V)
run("bodyweight_car1_subset", "lme(weight ~ Time * Diet, d, random = ~ Time | Rat, correlation = corCAR1(form = ~ Time | Rat), method = \"REML\")",
    "BodyWeight.csv", BodyWeight, rows = rows_B)
run("orthodont_cs_subset", "gls(distance ~ age, d, correlation = corCompSymm(form = ~ 1 | Subject), method = \"REML\")",
    "Orthodont.csv", Orthodont, rows = rows_O)
run("orthodont_varident_subset", "lme(distance ~ age, d, random = ~ 1 | Subject, weights = varIdent(form = ~ 1 | Sex), method = \"REML\")",
    "Orthodont.csv", Orthodont, rows = rows_O)

# ------------------------------------------------------------------ REML constant
# nlme's REML logLik for gls(distance ~ age) with no structure equals
#   -0.5*(N-p)*(log(2*pi*s2) + 1) - 0.5*log|X'X|,  s2 = RSS/(N-p)
m_ols <- gls(distance ~ age, Orthodont, method = "REML")
X_ols <- model.matrix(~ age, Orthodont)
s2_ols <- sum(resid(lm(distance ~ age, Orthodont))^2) / (nrow(X_ols) - ncol(X_ols))
reml_constant_check <- list(
  model = "gls(distance ~ age, Orthodont, method = \"REML\")",
  formula = "-0.5*(N-p)*(log(2*pi*s2)+1) - 0.5*log(det(crossprod(X))), s2 = RSS/(N-p)",
  logLik_nlme = as.numeric(logLik(m_ols)),
  logLik_formula = -0.5 * (nrow(X_ols) - ncol(X_ols)) * (log(2 * pi * s2_ols) + 1) -
    0.5 * as.numeric(determinant(crossprod(X_ols))$modulus)
)

# ------------------------------------------------------------------ metadata
meta <- list(
  R_version = R.version.string,
  nlme_version = as.character(packageVersion("nlme")),
  notes = arr(c(
    "Fits use the CSVs read back from reml_fn/datasets/data (plain factors; Subject levels alphabetical, Mare/Rat numeric order, Sex levels Female<Male, Diet 1<2<3).",
    "logLik is the REML log-likelihood as reported by logLik() in nlme (see reml_constant_check).",
    "corAR1(form = ~ 1 | g) uses the position of a row within its group in the (subsetted) data order, not the time value; corCAR1/corExp/corGaus use the covariate value.",
    "varIdent: natural coef is sd(level)/sd(reference); reference = first level of the stratifying variable in the data order nlme sees (lme sorts rows by group factor levels first).",
    "corSymm natural coefs are the correlations in lower-triangle column order (1,2),(1,3),(1,4),(2,3),(2,4),(3,4); corMatrix_first_group is the full matrix.",
    "Natural-scale meanings: corCompSymm Rho = common within-group correlation; corAR1 Phi: cor = Phi^|i-j| (row positions); corCAR1 Phi: cor = Phi^|t_i-t_j| (t in Time units, days for BodyWeight); corExp range: cor = exp(-d/range); corExp nugget: cor = (1-nugget)*exp(-d/range) for d>0; corGaus range: cor = exp(-(d/range)^2).",
    "A key absent from a model (corStruct / varStruct / random) means that structure is not in the model.",
    "Subsets: set.seed(20261207) separately before each dataset; drop <- sample(n, round(0.15*n)); rows = setdiff(1:n, drop) (1-based, original order)."
  )),
  reml_constant_check = reml_constant_check,
  subset_seed = 20261207L,
  subset_fraction_removed = 0.15,
  datasets = list(
    Orthodont = list(
      csv = "Orthodont.csv", n = nrow(Orthodont),
      columns = arr(names(Orthodont_csv)),
      matches_nlme = ortho_check,
      nlme_Sex_levels = arr(levels(nlme::Orthodont$Sex)),
      Subject_levels_used = arr(levels(Orthodont$Subject)),
      age_sorted_within_Subject = within_sorted(Orthodont$age, Orthodont$Subject),
      rows_contiguous_by_Subject = rows_contiguous(Orthodont$Subject),
      subset_rows = arr(rows_O)
    ),
    Ovary = list(
      csv = "Ovary.csv", n = nrow(Ovary),
      columns = arr(names(Ovary_csv)),
      matches_nlme = ov_check,
      Time_sorted_within_Mare = within_sorted(Ovary$Time, Ovary$Mare),
      Time_strictly_increasing_within_Mare = within_strict(Ovary$Time, Ovary$Mare),
      rows_contiguous_by_Mare = rows_contiguous(Ovary$Mare),
      obs_per_Mare = setNames(as.integer(table(Ovary$Mare)), levels(Ovary$Mare)),
      subset_rows = arr(rows_V),
      subset_obs_per_Mare = setNames(as.integer(table(Ovary$Mare[rows_V])), levels(Ovary$Mare))
    ),
    BodyWeight = list(
      csv = "BodyWeight.csv", n = nrow(BodyWeight),
      columns = arr(names(BodyWeight_csv)),
      matches_nlme = bw_check,
      Diet_levels = arr(levels(BodyWeight$Diet)),
      nlme_Diet_levels = arr(levels(nlme::BodyWeight$Diet)),
      nlme_Diet_is_ordered = is.ordered(nlme::BodyWeight$Diet),
      Time_values = arr(sort(unique(BodyWeight$Time))),
      Time_sorted_within_Rat = within_sorted(BodyWeight$Time, BodyWeight$Rat),
      rows_contiguous_by_Rat = rows_contiguous(BodyWeight$Rat),
      subset_rows = arr(rows_B)
    )
  )
)

out <- list(meta = meta, models = fits)
writeLines(to_json(out), file.path(out_dir, "nlme_references.json"))
message("wrote ", file.path(out_dir, "nlme_references.json"))
