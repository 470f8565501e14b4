#!/usr/bin/env Rscript
## Reference values for inference tests of reml_fn (ML fits, LRT anova,
## lmerTest Satterthwaite / Kenward-Roger, confint, pbkrtest::vcovAdj).
##
## Run from anywhere:
##   Rscript tests/data/inference/make_references.R
## Writes inference_references.json next to this script.
##
## Every double is written with sprintf("%.17g") (verbatim JSON), so the value
## parsed by Python's json module is bit-identical to R's double.  NA -> null.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)   # masks lme4::lmer; lme4 fits below use lme4::lmer explicitly
  library(pbkrtest)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = FALSE)
script <- sub("^--file=", "", args[grep("^--file=", args)])
out_dir <- if (length(script)) dirname(normalizePath(script)) else getwd()
data_dir <- normalizePath(file.path(out_dir, "..", "..", "..", "reml_fn", "datasets", "data"))
out_path <- file.path(out_dir, "inference_references.json")

## ---------------------------------------------------------------- helpers ---
num1 <- function(v) {
  if (is.na(v)) return("null")
  if (is.infinite(v)) stop("Inf cannot be written to JSON")
  sprintf("%.17g", v)
}
JNULL <- structure("null", class = "json")
## numeric -> verbatim JSON number (scalar) or array
jnum <- function(x, array = FALSE) {
  s <- vapply(as.double(x), num1, "")
  if (length(s) == 1L && !array) structure(s, class = "json")
  else structure(paste0("[", paste(s, collapse = ", "), "]"), class = "json")
}
## named numeric vector -> JSON object {name: value}
jnamed <- function(x) {
  x <- unclass(x)
  setNames(lapply(seq_along(x), function(i) jnum(x[[i]])), names(x))
}
## matrix -> {rownames, colnames, rows: [[...], ...]}
jmat <- function(m) {
  m <- as.matrix(m)
  list(rownames = I(as.character(rownames(m))),
       colnames = I(as.character(colnames(m))),
       rows = lapply(seq_len(nrow(m)), function(i) jnum(unname(m[i, ]), array = TRUE)))
}
## data.frame / table -> {rownames, columns: [...], <col>: [...] } (column-major)
jtab <- function(d) {
  d <- as.data.frame(d, check.names = FALSE)
  res <- list(rownames = I(as.character(rownames(d))), columns = I(names(d)))
  for (nm in names(d)) {
    col <- d[[nm]]
    res[[nm]] <- if (is.numeric(col) || is.logical(col)) jnum(as.double(col), array = TRUE)
                 else I(as.character(col))
  }
  res
}
## evaluate expr, collecting warnings and messages
cond <- new.env()
capture <- function(expr, key) {
  w <- character(); msg <- character()
  val <- withCallingHandlers(expr,
    warning = function(c) { w <<- c(w, conditionMessage(c)); invokeRestart("muffleWarning") },
    message = function(c) { msg <<- c(msg, trimws(conditionMessage(c))); invokeRestart("muffleMessage") })
  if (length(w) || length(msg))
    assign(key, list(warnings = I(unique(w)), messages = I(unique(msg))), envir = cond)
  val
}
singular <- function(m) isSingular(m)

## ------------------------------------------------------------------- data ---
same_df <- function(a, b, cols) {
  for (cc in cols) {
    x <- a[[cc]]; y <- b[[cc]]
    ok <- if (is.numeric(x)) isTRUE(all(x == y)) else identical(as.character(x), as.character(y))
    if (!ok) stop("data mismatch in column ", cc)
  }
  if (nrow(a) != nrow(b)) stop("row count mismatch")
  TRUE
}
rd <- function(f) read.csv(file.path(data_dir, f), stringsAsFactors = FALSE)

sleep <- lme4::sleepstudy
invisible(same_df(sleep, rd("sleepstudy.csv"), c("Reaction", "Days", "Subject")))
dye <- lme4::Dyestuff
invisible(same_df(dye, rd("Dyestuff.csv"), c("Batch", "Yield")))
mach <- as.data.frame(nlme::Machines)
invisible(same_df(mach, rd("Machines.csv"), c("Worker", "Machine", "score")))
## nlme stores Worker as an ordered factor (levels 6<2<4<1<3<5); it is only a
## grouping factor here, so make it a plain factor with sorted levels (as read
## from the CSV).  Results are invariant to grouping-level order.
mach$Worker <- factor(as.character(mach$Worker), levels = as.character(1:6))
pen <- lme4::Penicillin
invisible(same_df(pen, rd("Penicillin.csv"), c("diameter", "plate", "sample")))
cake <- lme4::cake
invisible(same_df(cake, rd("cake.csv"), c("replicate", "recipe", "temperature", "angle", "temp")))
cake$temperature <- factor(cake$temperature, ordered = FALSE)

datasets <- list(sleepstudy = sleep, Dyestuff = dye, Machines = mach,
                 Penicillin = pen, cake = cake)

## -------------------------------------------------------------- 1. ML fits ---
fit_summary <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  list(
    REML = isREML(m),
    logLik = jnum(as.numeric(logLik(m))),
    df = jnum(attr(logLik(m), "df")),
    deviance = jnum(deviance(m)),
    AIC = jnum(AIC(m)),
    BIC = jnum(BIC(m)),
    REMLcrit = if (isREML(m)) jnum(REMLcrit(m)) else JNULL,
    fixef = jnamed(fixef(m)),
    theta = jnamed(getME(m, "theta")),
    varcorr = lapply(seq_len(nrow(vc)), function(i) list(
      grp = vc$grp[i],
      var1 = if (is.na(vc$var1[i])) JNULL else vc$var1[i],
      var2 = if (is.na(vc$var2[i])) JNULL else vc$var2[i],
      vcov = jnum(vc$vcov[i]), sdcor = jnum(vc$sdcor[i]))),
    sigma = jnum(sigma(m)),
    vcov = jmat(as.matrix(vcov(m))),
    nobs = nobs(m),
    singular = singular(m)
  )
}

ml_specs <- list(
  sleepstudy_slopes   = list(data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)"),
  sleepstudy_intercept = list(data = "sleepstudy", formula = "Reaction ~ Days + (1 | Subject)"),
  sleepstudy_nofixed_days = list(data = "sleepstudy", formula = "Reaction ~ 1 + (Days | Subject)"),
  dyestuff            = list(data = "Dyestuff", formula = "Yield ~ 1 + (1 | Batch)"),
  machines_nested     = list(data = "Machines", formula = "score ~ Machine + (1 | Worker/Machine)"),
  penicillin_crossed  = list(data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)")
)
ml_fits <- list()
for (nm in names(ml_specs)) {
  s <- ml_specs[[nm]]
  m <- capture(lme4::lmer(as.formula(s$formula), data = datasets[[s$data]], REML = FALSE),
               paste0("ml_fits/", nm))
  ml_fits[[nm]] <- c(list(dataset = s$data, formula = s$formula), fit_summary(m))
}

## ------------------------------------------------------------- 2. anova ---
lrt <- list()
f_int  <- Reaction ~ Days + (1 | Subject)
f_full <- Reaction ~ Days + (Days | Subject)
f_nod  <- Reaction ~ 1 + (Days | Subject)
s_m0 <- lme4::lmer(f_int, sleep); s_m1 <- lme4::lmer(f_full, sleep); s_m0b <- lme4::lmer(f_nod, sleep)
a <- capture(local({m0 <- s_m0; m1 <- s_m1; anova(m0, m1)}), "anova/sleepstudy_random_slope")
lrt$sleepstudy_random_slope <- list(
  m0 = "Reaction ~ Days + (1 | Subject)", m1 = "Reaction ~ Days + (Days | Subject)",
  data = "sleepstudy", fitted_with = "REML (lme4 default); anova(m0, m1) refit = TRUE",
  table = jtab(a))
a <- capture(local({m0 <- s_m0b; m1 <- s_m1; anova(m0, m1)}), "anova/sleepstudy_fixed_days")
lrt$sleepstudy_fixed_days <- list(
  m0 = "Reaction ~ 1 + (Days | Subject)", m1 = "Reaction ~ Days + (Days | Subject)",
  data = "sleepstudy", fitted_with = "REML (lme4 default); anova(m0, m1) refit = TRUE",
  table = jtab(a))
a <- capture(local({m0 <- s_m0; m1 <- s_m1; anova(m0, m1, refit = FALSE)}), "anova/sleepstudy_random_slope_norefit")
lrt$sleepstudy_random_slope_norefit <- list(
  m0 = "Reaction ~ Days + (1 | Subject)", m1 = "Reaction ~ Days + (Days | Subject)",
  data = "sleepstudy",
  fitted_with = "REML; anova(m0, m1, refit = FALSE): logLik/deviance columns are REML log-lik / REML criterion",
  table = jtab(a))
mm0 <- lme4::lmer(score ~ 1 + (1 | Worker/Machine), mach)
mm1 <- lme4::lmer(score ~ Machine + (1 | Worker/Machine), mach)
a <- capture(local({m0 <- mm0; m1 <- mm1; anova(m0, m1)}), "anova/machines_fixed")
lrt$machines_fixed <- list(
  m0 = "score ~ 1 + (1 | Worker/Machine)", m1 = "score ~ Machine + (1 | Worker/Machine)",
  data = "Machines", fitted_with = "REML (lme4 default); anova(m0, m1) refit = TRUE",
  table = jtab(a))

## ----------------------------------------------------------- 3. lmerTest ---
lt_specs <- list(
  sleepstudy_slopes  = list(data = "sleepstudy", formula = "Reaction ~ Days + (Days | Subject)"),
  machines_nested    = list(data = "Machines", formula = "score ~ Machine + (1 | Worker/Machine)"),
  penicillin_crossed = list(data = "Penicillin", formula = "diameter ~ 1 + (1 | plate) + (1 | sample)"),
  cake               = list(data = "cake", formula = "angle ~ recipe + temperature + (1 | recipe:replicate)")
)
lt_models <- list(); lmertest <- list()
for (nm in names(lt_specs)) {
  s <- lt_specs[[nm]]
  m <- capture(lmerTest::lmer(as.formula(s$formula), data = datasets[[s$data]]),
               paste0("lmerTest/", nm, "/fit"))
  lt_models[[nm]] <- m
  sat <- capture(summary(m)$coefficients, paste0("lmerTest/", nm, "/satterthwaite"))
  kr  <- capture(summary(m, ddf = "Kenward-Roger")$coefficients, paste0("lmerTest/", nm, "/kenward_roger"))
  lmertest[[nm]] <- list(dataset = s$data, formula = s$formula, REML = TRUE,
                         REMLcrit = jnum(REMLcrit(m)),
                         sigma = jnum(sigma(m)), theta = jnamed(getME(m, "theta")),
                         singular = singular(m),
                         coefficients_satterthwaite = jtab(sat),
                         coefficients_kenward_roger = jtab(kr))
}
mm <- lt_models$machines_nested
L2 <- rbind(c(0, 1, 0), c(0, 0, 1)); L1 <- c(0, 1, -1)
contest_res <- list(
  model = "machines_nested",
  L_joint = lapply(seq_len(nrow(L2)), function(i) jnum(L2[i, ], array = TRUE)),
  joint_satterthwaite = jtab(capture(contest(mm, L2, ddf = "Satterthwaite"), "contest/joint_sat")),
  joint_kenward_roger = jtab(capture(contest(mm, L2, ddf = "Kenward-Roger"), "contest/joint_kr")),
  L_single = jnum(L1, array = TRUE),
  single_1d_satterthwaite = jtab(capture(contest(mm, L1, joint = FALSE, ddf = "Satterthwaite"), "contest/1d_sat")),
  single_1d_kenward_roger = jtab(capture(contest(mm, L1, joint = FALSE, ddf = "Kenward-Roger"), "contest/1d_kr")),
  single_F_satterthwaite = jtab(capture(contest(mm, L1, joint = TRUE, ddf = "Satterthwaite"), "contest/1F_sat")),
  single_F_kenward_roger = jtab(capture(contest(mm, L1, joint = TRUE, ddf = "Kenward-Roger"), "contest/1F_kr")),
  notes = "contest(m, L) default joint = TRUE gives the F test; joint = FALSE gives the 1-df t-test (contest1D) with 95% CI lower/upper."
)
anova3 <- list()
for (nm in c("machines_nested", "cake")) {
  m <- lt_models[[nm]]
  anova3[[nm]] <- list(
    type = "III",
    satterthwaite = jtab(capture(anova(m), paste0("anova_typeIII/", nm, "/sat"))),
    kenward_roger = jtab(capture(anova(m, ddf = "Kenward-Roger"), paste0("anova_typeIII/", nm, "/kr"))))
}

## ------------------------------------------------------------ 4. confint ---
sm_reml <- lme4::lmer(f_full, sleep)
sm_ml <- lme4::lmer(f_full, sleep, REML = FALSE)
ci <- list()
ci$sleepstudy_reml_wald <- jtab(capture(confint(sm_reml, method = "Wald"), "confint/sleepstudy_reml_wald"))
prof_times <- numeric(3)
for (i in 1:3) {
  prof_times[i] <- system.time(
    pci <- capture(confint(sm_reml, method = "profile"), "confint/sleepstudy_reml_profile"))[["elapsed"]]
}
ci$sleepstudy_reml_profile <- jtab(pci)
ci$sleepstudy_ml_profile <- jtab(capture(confint(sm_ml, method = "profile"), "confint/sleepstudy_ml_profile"))
ci$dyestuff_reml_profile <- jtab(capture(
  confint(lme4::lmer(Yield ~ 1 + (1 | Batch), dye), method = "profile"), "confint/dyestuff_reml_profile"))
ci$machines_nested_reml_profile <- jtab(capture(
  confint(mm1, method = "profile"), "confint/machines_nested_reml_profile"))
boot_time <- system.time(
  bci <- capture(confint(sm_reml, method = "boot", nsim = 1000, seed = 1), "confint/sleepstudy_reml_boot")
)[["elapsed"]]
ci$sleepstudy_reml_boot <- jtab(bci)
ci$boot_settings <- "confint(m, method = 'boot', nsim = 1000, seed = 1): parametric bootMer, boot.type = 'perc', use.u = FALSE"
ci$sig_mapping <- list(
  sleepstudy = list(.sig01 = "sd of (Intercept) | Subject", .sig02 = "correlation (Intercept),Days | Subject",
                    .sig03 = "sd of Days | Subject", .sigma = "residual sd"),
  dyestuff = list(.sig01 = "sd of (Intercept) | Batch", .sigma = "residual sd"),
  machines_nested = list(.sig01 = "sd of (Intercept) | Machine:Worker", .sig02 = "sd of (Intercept) | Worker",
                         .sigma = "residual sd"))
ci$notes <- paste("Row names are lme4's oldNames = TRUE labels. .sigNN follow the order of",
                  "as.data.frame(VarCorr(m)) rows (sd/cor scale). Wald rows for .sig*/.sigma are NA (null).",
                  "Profile level 0.95, default zeta/settings.",
                  "NB: lme4's profile() always refits the model by ML (devfun2 calls refitML), so profile CIs of",
                  "the REML fit and of the ML fit agree to ~1e-5 (differences = optimizer tolerance only).",
                  "Bootstrap: some of the 1000 refits were singular / gave convergence warnings (see conditions).")
timings <- list(
  confint_profile_sleepstudy_reml_s = jnum(prof_times, array = TRUE),
  confint_profile_sleepstudy_reml_median_s = jnum(median(prof_times)),
  confint_boot_nsim1000_sleepstudy_reml_s = jnum(boot_time),
  machine = paste(Sys.info()[["sysname"]], Sys.info()[["machine"]], R.version$platform))

## ------------------------------------------------------------- 5. vcovAdj ---
va <- capture(pbkrtest::vcovAdj(sm_reml), "vcovAdj/sleepstudy")
va_m <- matrix(as.numeric(va), nrow(va), dimnames = dimnames(va))
if (is.null(rownames(va_m))) dimnames(va_m) <- list(names(fixef(sm_reml)), names(fixef(sm_reml)))
vcov_adj <- list(sleepstudy_slopes = list(
  formula = "Reaction ~ Days + (Days | Subject)", REML = TRUE,
  vcov_unadjusted = jmat(as.matrix(vcov(sm_reml))),
  vcovAdj = jmat(va_m)))

## ---------------------------------------------------------------- output ---
conds <- mget(sort(ls(cond)), envir = cond)
about <- list(
  R = R.version.string,
  lme4 = as.character(packageVersion("lme4")),
  lmerTest = as.character(packageVersion("lmerTest")),
  pbkrtest = as.character(packageVersion("pbkrtest")),
  Matrix = as.character(packageVersion("Matrix")),
  nlme = as.character(packageVersion("nlme")),
  jsonlite = as.character(packageVersion("jsonlite")),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
  script = "tests/data/inference/make_references.R",
  notes = I(c(
    "Numbers written with sprintf('%.17g'): exact round-trip of R doubles. NA -> null.",
    "Data: lme4::sleepstudy, lme4::Dyestuff, as.data.frame(nlme::Machines), lme4::Penicillin, lme4::cake; each checked equal (rows/values) to the CSVs in reml_fn/datasets/data/.",
    "Machines$Worker converted from nlme's ordered factor to a plain factor with levels 1..6 (grouping only).",
    "cake$temperature <- factor(cake$temperature, ordered = FALSE) (treatment contrasts, baseline 175).",
    "Default lmer control (optimizer nloptwrap/bobyqa for lme4 >= 1.1-20). Fits for anova/confint use lme4::lmer (REML default unless stated).",
    "Tables are column-major: {rownames, columns, <column>: [...]}. Matrices: {rownames, colnames, rows}.",
    "anova(refit = TRUE) refits by ML starting from the REML theta, so its logLik differs from the direct ML fits in ml_fits by ~1e-8 (optimizer tolerance); compare with a tolerance.",
    "Balanced sleepstudy: pbkrtest::vcovAdj equals vcov(m) to ~1e-14 and KR df = 17 exactly; Satterthwaite df ~16.9997 (numerical Hessian).",
    "'conditions' lists warnings/messages emitted while computing each entry (e.g. 'refitting model(s) with ML (instead of REML)')."
  )))
out <- list(
  `_about` = about,
  ml_fits = ml_fits,
  anova_lrt = lrt,
  lmertest_coefficients = lmertest,
  lmertest_contest = contest_res,
  lmertest_anova_typeIII = anova3,
  confint = ci,
  timings = timings,
  vcovAdj = vcov_adj,
  conditions = conds
)
write_json(out, out_path, digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null",
           json_verbatim = TRUE)
cat("wrote", out_path, "\n")
cat("profile times:", prof_times, " boot time:", boot_time, "\n")
