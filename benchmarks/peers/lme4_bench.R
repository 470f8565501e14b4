# lme4 peer for the reml_fn benchmarks.
#
# Usage:
#   Rscript lme4_bench.R CASE CSV REPEATS [--slope=COL] [--responses=FILE --logliks-out=FILE] [--budget=SECONDS]
#
# CSV has the columns y, x1 ... xk, g (written by benchmarks/data.py); the model is
#   y ~ x1 + ... + xk + (1 | g)          or, with --slope=x1,   y ~ x1 + ... + (x1 | g)
# fitted by lmer(..., REML = TRUE) with lme4's default control (nloptwrap/BOBYQA, calc.derivs = TRUE).
#
# Single-response cases: one untimed warm-up fit, then REPEATS timed fits (fewer when the warm-up
# shows they would exceed --budget seconds, default 300); time_s is their median wall time and cpu_s
# the median CPU time of the R process (proc.time() user + system).
# Batch case (--responses, one response per row, no header): an untimed warm-up fit, then the timed
# loop "fit once with lmer() on response 1, then refit(fit, y_b) for b = 1..B" (lme4's fastest loop);
# time_s is the whole loop, per_fit_s = time_s / B, and the B REML logLiks go to --logliks-out
# (fits with convergence messages or singular fits are listed, 0-based, in the JSON).
#
# Prints one JSON line on stdout. Memory:
#   peak_rss_mb   VmHWM of this R process from /proc/self/status, reset (clear_refs = 5) after the data
#                 are read, so it is the peak resident size during the fits (R + lme4 + data included);
#   rss_before_fit_mb  VmRSS just before the first fit (subtract it for the fit's own footprint);
#   r_heap_max_mb gc()'s "max used" (Ncells + Vcells) during the fits: R-heap objects only, not
#                 CHOLMOD's malloc'd factor.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
positional <- args[!startsWith(args, "--")]
options_raw <- args[startsWith(args, "--")]
if (length(positional) < 3) {
  stop("usage: Rscript lme4_bench.R CASE CSV REPEATS [--slope=COL] [--responses=FILE --logliks-out=FILE] [--budget=S]")
}
get_option <- function(key, default = NULL) {
  prefix <- paste0("--", key, "=")
  hit <- options_raw[startsWith(options_raw, prefix)]
  if (length(hit) == 0) default else substring(hit[1], nchar(prefix) + 1)
}
case_name <- positional[1]
csv_path <- positional[2]
repeats <- as.integer(positional[3])
slope <- get_option("slope")
responses_path <- get_option("responses")
logliks_out <- get_option("logliks-out")
budget_s <- as.numeric(get_option("budget", "300"))

proc_status_mb <- function(field) {
  lines <- tryCatch(readLines("/proc/self/status"), error = function(e) character(0))
  hit <- grep(paste0("^", field, ":"), lines, value = TRUE)
  if (length(hit) == 0) return(NA_real_)
  as.numeric(gsub("[^0-9]", "", hit[1])) / 1024
}
reset_peak_rss <- function() {
  invisible(tryCatch({ writeLines("5", "/proc/self/clear_refs"); TRUE }, error = function(e) FALSE))
}
now <- function() as.numeric(Sys.time())
cpu_now <- function() { pt <- proc.time(); pt[["user.self"]] + pt[["sys.self"]] }

data <- read.csv(csv_path, colClasses = c(g = "character"))
data$g <- factor(data$g)
covariates <- grep("^x[0-9]+$", names(data), value = TRUE)
fixed_part <- if (length(covariates) > 0) paste(covariates, collapse = " + ") else "1"
random_part <- if (is.null(slope)) "(1 | g)" else sprintf("(%s | g)", slope)
formula <- as.formula(sprintf("y ~ %s + %s", fixed_part, random_part))

fit_once <- function(frame) lmer(formula, data = frame, REML = TRUE)

variance_components <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  out <- list()
  for (i in seq_len(nrow(vc))) {
    key <- if (vc$grp[i] == "Residual") {
      "Residual"
    } else if (is.na(vc$var2[i])) {
      sprintf("%s:%s", vc$grp[i], vc$var1[i])
    } else {
      sprintf("%s:%s,%s", vc$grp[i], vc$var1[i], vc$var2[i])
    }
    out[[key]] <- vc$vcov[i]
  }
  out
}

# lme4 1.1-31's refit.merMod() builds the new response module with mkRespMod(..., REML = isREML(object)),
# i.e. REML = TRUE = 1 instead of p (the number of fixed effects), so for p > 1 it optimises and reports
# a wrong REML criterion (sleepstudy: logLik -875.97 after refit(fm1, Reaction) against -871.81). When a
# refit of the original response does not keep devcomp$dims["REML"], use a copy of refit.merMod in
# which that one call passes p instead; it then reproduces lmer() exactly and keeps refit()'s speed.
choose_refit <- function(fit, y) {
  reml_dim <- function(object) getME(object, "devcomp")$dims[["REML"]]
  stock <- suppressMessages(suppressWarnings(refit(fit, y)))
  if (reml_dim(stock) == reml_dim(fit)) return(list(refit = refit, patched = FALSE))
  patched <- lme4:::refit.merMod
  reml_p <- quote(function(object) if (lme4::isREML(object)) ncol(lme4::getME(object, "X")) else 0L)
  body(patched) <- do.call(substitute, list(body(patched), list(isREML = reml_p)))
  check <- suppressMessages(suppressWarnings(patched(fit, y)))
  if (reml_dim(check) != reml_dim(fit) || abs(logLik(check) - logLik(fit)) > 1e-6 * abs(logLik(fit))) {
    stop("patched refit() does not reproduce lmer(); cannot run the batch loop")
  }
  list(refit = patched, patched = TRUE)
}

summarise_fit <- function(fit) {
  list(
    loglik = as.numeric(logLik(fit)),
    reml_criterion = REMLcrit(fit),
    singular = isSingular(fit),
    beta = as.list(fixef(fit)),
    varcomp = variance_components(fit),
    theta = as.numeric(getME(fit, "theta")),
    sigma = sigma(fit),
    n_evals = fit@optinfo$feval,
    optimizer = fit@optinfo$optimizer,
    messages = as.list(c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings))
  )
}

result <- list(
  peer = "lme4",
  case = case_name,
  n = nrow(data),
  q = nlevels(data$g),
  formula = paste(deparse(formula), collapse = ""),
  versions = list(R = R.version$version.string, lme4 = as.character(packageVersion("lme4")),
                  Matrix = as.character(packageVersion("Matrix")))
)

invisible(gc(reset = TRUE))
result$rss_before_fit_mb <- proc_status_mb("VmRSS")
reset_peak_rss()

if (is.null(responses_path)) {
  warmup_start <- now()
  fit <- fit_once(data)
  warmup_s <- now() - warmup_start
  n_timed <- if (warmup_s * repeats > budget_s) max(1L, as.integer(floor(budget_s / warmup_s))) else repeats
  times <- numeric(n_timed)
  cpu_times <- numeric(n_timed)
  for (i in seq_len(n_timed)) {
    start <- now()
    start_cpu <- cpu_now()
    fit <- fit_once(data)
    times[i] <- now() - start
    cpu_times[i] <- cpu_now() - start_cpu
  }
  result$time_s <- median(times)
  result$cpu_s <- median(cpu_times)
  result$times_s <- times
  result$cpu_times_s <- cpu_times
  result$warmup_s <- warmup_s
  result$repeats_requested <- repeats
  result$repeats_timed <- n_timed
  result <- c(result, summarise_fit(fit))
} else {
  responses <- unname(as.matrix(read.csv(responses_path, header = FALSE)))
  n_responses <- nrow(responses)
  frame <- data
  frame$y <- responses[1, ]
  warmup <- fit_once(frame)
  refit_loop <- choose_refit(warmup, responses[1, ])
  result$refit_patched <- refit_loop$patched
  start <- now()
  start_cpu <- cpu_now()
  fit <- fit_once(frame)
  logliks <- numeric(n_responses)
  has_messages <- logical(n_responses)
  singular <- logical(n_responses)
  for (b in seq_len(n_responses)) {
    refitted <- suppressMessages(suppressWarnings(refit_loop$refit(fit, responses[b, ])))
    logliks[b] <- as.numeric(logLik(refitted))
    has_messages[b] <- length(refitted@optinfo$conv$lme4$messages) > 0
    singular[b] <- isSingular(refitted)
  }
  total_s <- now() - start
  total_cpu_s <- cpu_now() - start_cpu
  result$time_s <- total_s
  result$cpu_s <- total_cpu_s
  result$per_fit_s <- total_s / n_responses
  result$per_fit_cpu_s <- total_cpu_s / n_responses
  result$n_fits <- n_responses
  result$loop <- if (refit_loop$patched) {
    "lmer() once, then refit(fit, y_b) for every response (refit patched to keep REML = p, see lme4_bench.R)"
  } else {
    "lmer() once, then refit(fit, y_b) for every response"
  }
  result$logliks_summary <- list(first = logliks[1], mean = mean(logliks), min = min(logliks), max = max(logliks))
  # 0-based indices, to match the rows of the responses array in Python
  result$convergence_message_fits <- I(which(has_messages) - 1L)
  result$singular_fits <- I(which(singular) - 1L)
  result <- c(result, summarise_fit(refitted))
  if (!is.null(logliks_out)) {
    writeLines(sprintf("%.17g", logliks), logliks_out)
    result$logliks_file <- logliks_out
  }
}

gc_table <- gc()
result$r_heap_max_mb <- sum(gc_table[, which(colnames(gc_table) == "max used") + 1])
result$peak_rss_mb <- proc_status_mb("VmHWM")
cat(toJSON(result, auto_unbox = TRUE, digits = NA, null = "null"), "\n", sep = "")
