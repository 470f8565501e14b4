# Reference fits from R nlme for the varPower variance function.
#
# Usage (from anywhere):  Rscript tests/data/correlation/make_varpower.R [repo_root]
#
# Reads reml_fn/datasets/data/{Orthodont,BodyWeight}.csv (plain factors, as
# read.csv gives; Rat / Diet made factors, Diet levels "1","2","3"), fits each
# model with method = "REML" and the default control, and writes
# tests/data/correlation/nlme_varpower.json.  Every double is written with
# sprintf("%.17g") (jsonlite json_verbatim) so it round-trips exactly;
# NA / non-finite -> null.
#
# varPower(form = ~ v): Var(e_i) = sigma^2 * |v_i|^(2*power), i.e.
#   sd_i = sigma * |v_i|^power; natural coef "power" = delta.

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
stopifnot(dir.exists(data_dir), dir.exists(out_dir))

# ------------------------------------------------------------------ data
Orthodont <- read.csv(file.path(data_dir, "Orthodont.csv"), stringsAsFactors = TRUE)
Orthodont$rownames <- NULL
BodyWeight <- read.csv(file.path(data_dir, "BodyWeight.csv"))
BodyWeight$Rat <- factor(BodyWeight$Rat, levels = sort(unique(BodyWeight$Rat)))
BodyWeight$Diet <- factor(BodyWeight$Diet, levels = c(1, 2, 3))
stopifnot(nrow(Orthodont) == 108, nrow(BodyWeight) == 176)

# ------------------------------------------------------------------ JSON helpers
num <- function(x) {
  x <- as.numeric(x)
  structure(if (length(x) != 1 || is.na(x) || !is.finite(x)) "null" else sprintf("%.17g", x),
            class = "json")
}
named_nums <- function(v) setNames(lapply(seq_along(v), function(i) num(v[[i]])), names(v))
num_array <- function(v) structure(paste0("[", paste(vapply(v, function(x) unclass(num(x)), ""),
                                                     collapse = ", "), "]"), class = "json")
num_matrix <- function(M) lapply(seq_len(nrow(M)), function(i) num_array(M[i, ]))

struct_info <- function(s) {
  if (is.null(s)) return(NULL)
  cf <- coef(s, unconstrained = FALSE)
  cu <- coef(s, unconstrained = TRUE)
  list(class = class(s)[1],
       formula = paste(deparse(formula(s)), collapse = ""),
       natural = named_nums(setNames(as.numeric(cf), names(cf))),
       unconstrained = named_nums(setNames(as.numeric(cu),
                                           if (is.null(names(cu))) names(cf) else names(cu))))
}

extract <- function(m, call_str, data_name, warns) {
  is_lme <- inherits(m, "lme")
  fe <- if (is_lme) fixef(m) else coef(m)
  ll <- logLik(m)
  res <- list(
    call = call_str,
    data = data_name,
    nobs = as.integer(m$dims$N),
    method = m$method,
    logLik = num(ll),
    df = as.integer(attr(ll, "df")),
    fixef = named_nums(fe),
    fixef_se = named_nums(setNames(sqrt(diag(vcov(m))), names(fe))),
    sigma = num(m$sigma)
  )
  if (is_lme) {
    vc <- getVarCov(m)
    cm <- matrix(as.numeric(vc), nrow(vc), dimnames = dimnames(vc))
    res$random <- list(
      group = names(m$dims$ngrps)[1],
      ngroups = as.integer(m$dims$ngrps[1]),
      sd = named_nums(setNames(sqrt(diag(cm)), rownames(cm))),
      corr = if (nrow(cm) > 1) named_nums(setNames(cov2cor(cm)[lower.tri(cm)],
               apply(which(lower.tri(cm), arr.ind = TRUE), 1,
                     function(ij) paste(rownames(cm)[ij[2]], rownames(cm)[ij[1]], sep = ":"))))
             else NULL,
      cov = num_matrix(cm)
    )
  }
  res$varStruct <- struct_info(m$modelStruct$varStruct)
  res$corStruct <- struct_info(m$modelStruct$corStruct)
  av <- m$apVar
  res$convergence <- list(
    warnings = I(warns),
    apVar_ok = !is.character(av),
    apVar_message = if (is.character(av)) av else NULL
  )
  res
}

fits <- list()
run <- function(key, call_str, data_name, dat) {
  env <- list2env(list(d = dat), parent = globalenv())
  w <- character(0)
  m <- withCallingHandlers(eval(parse(text = call_str), envir = env),
                           warning = function(cw) {
                             w <<- c(w, conditionMessage(cw)); invokeRestart("muffleWarning")
                           })
  shown <- sub("\\bd\\b", sub("\\.csv$", "", data_name), call_str, perl = TRUE)
  fits[[key]] <<- extract(m, shown, data_name, w)
  message(sprintf("%-26s logLik = %.10f  power = %.8f  apVar: %s  warnings: %d", key,
                  as.numeric(logLik(m)), coef(m$modelStruct$varStruct, unconstrained = FALSE),
                  if (is.character(m$apVar)) m$apVar else "ok", length(w)))
  invisible(m)
}

# a
run("orthodont_varpower",
    "lme(distance ~ age, d, random = ~ 1 | Subject, weights = varPower(form = ~ age), method = \"REML\")",
    "Orthodont.csv", Orthodont)
# b
run("bodyweight_varpower",
    "lme(weight ~ Time * Diet, d, random = ~ Time | Rat, weights = varPower(form = ~ Time), method = \"REML\")",
    "BodyWeight.csv", BodyWeight)
# c
run("orthodont_varpower_gls",
    "gls(distance ~ age, d, weights = varPower(form = ~ age), method = \"REML\")",
    "Orthodont.csv", Orthodont)
# d
run("bodyweight_car1_varpower",
    "lme(weight ~ Time * Diet, d, random = ~ Time | Rat, correlation = corCAR1(form = ~ Time | Rat), weights = varPower(form = ~ Time), method = \"REML\")",
    "BodyWeight.csv", BodyWeight)

meta <- list(
  R_version = R.version.string,
  nlme_version = as.character(packageVersion("nlme")),
  notes = c(
    "Data: CSVs in reml_fn/datasets/data read with read.csv (rownames column dropped; Subject/Sex plain factors, alphabetical levels; Rat factor in numeric order; Diet factor levels 1<2<3, treatment contrasts).",
    "All fits method = \"REML\", default control; logLik is the REML log-likelihood from logLik().",
    "varPower(form = ~ v): sd_i = sigma * |v_i|^power (Var = sigma^2 |v_i|^(2 power)); varStruct.natural.power is delta, unconstrained equals natural (unbounded).",
    "corCAR1 Phi: cor = Phi^|t_i - t_j| within Rat (t in days).",
    "random.corr holds the random-effects correlations keyed 'termA:termB' (termA before termB in random.sd order); random.cov is the full covariance matrix (rows in random.sd order).",
    "convergence.apVar_ok = FALSE means nlme could not form the approximate variance-covariance of the variance parameters (message in apVar_message)."
  )
)

out <- list(meta = meta, models = fits)
writeLines(toJSON(out, json_verbatim = TRUE, auto_unbox = TRUE, pretty = TRUE, null = "null", na = "null"),
           file.path(out_dir, "nlme_varpower.json"))
message("wrote ", file.path(out_dir, "nlme_varpower.json"))
