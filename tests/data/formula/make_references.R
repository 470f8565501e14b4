# Note: cake.csv, Machines.csv, ergoStool.csv and Penicillin.csv written by this script were moved to
# reml_fn/datasets/data/ (shipped datasets); sleepstudy_na.csv and the JSON stay in tests/data/formula/.
# Reference numbers from lme4 for the formula-interface tests of reml_fn.
# Run from anywhere:  Rscript tests/data/formula/make_references.R
# Writes the CSV data sets and lme4_formula_references.json next to this script.
#
# Doubles are written with sprintf("%.17g") (inserted verbatim through
# jsonlite's json_verbatim) so that they round-trip exactly; jsonlite's own
# digits = NA stops at 15 significant digits.

suppressPackageStartupMessages({
  library(lme4)
  library(nlme)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = FALSE)
script_path <- sub("^--file=", "", args[grep("^--file=", args)])
out_dir <- if (length(script_path)) dirname(normalizePath(script_path)) else getwd()
script_text <- if (length(script_path)) paste(readLines(script_path), collapse = "\n") else NA

warnings_seen <- list()

# ---------------------------------------------------------------- helpers ---
# a double vector as verbatim JSON: scalar (unless as_array) or array, NA -> null
num <- function(x, as_array = FALSE) {
  x <- as.numeric(x)
  s <- ifelse(is.na(x), "null", sprintf("%.17g", x))
  txt <- if (length(x) == 1 && !as_array) s else paste0("[", paste(s, collapse = ","), "]")
  structure(txt, class = "json")
}
named_num <- function(x) {
  out <- lapply(seq_along(x), function(i) num(x[[i]]))
  names(out) <- names(x)
  out
}
mat_rows <- function(m) lapply(seq_len(nrow(m)), function(i) num(m[i, ], as_array = TRUE))

# NA (written as null) marks an absent var1/var2
varcorr_rows <- function(m) {
  vc <- as.data.frame(VarCorr(m))
  lapply(seq_len(nrow(vc)), function(i) list(
    grp = vc$grp[i],
    var1 = vc$var1[i],
    var2 = vc$var2[i],
    vcov = num(vc$vcov[i]),
    sdcor = num(vc$sdcor[i])
  ))
}

ranef_info <- function(m) {
  re <- ranef(m, condVar = FALSE)
  vals <- lapply(names(re), function(g) {
    d <- re[[g]]
    k <- min(5, nrow(d))
    list(levels = I(rownames(d)[seq_len(k)]),
         columns = I(colnames(d)),
         values = mat_rows(as.matrix(d[seq_len(k), , drop = FALSE])))
  })
  names(vals) <- names(re)
  ord <- lapply(names(re), function(g) I(rownames(re[[g]])))
  names(ord) <- names(re)
  list(ranef = vals, ranef_level_order = ord)
}

fit <- function(expr) {
  w <- character(0)
  m <- withCallingHandlers(eval.parent(substitute(expr)),
                           warning = function(cond) {
                             w <<- c(w, conditionMessage(cond))
                             invokeRestart("muffleWarning")
                           })
  attr(m, "warn") <- w
  m
}

record <- function(m, formula, data_name, prep = NA_character_, extra = list()) {
  r <- ranef_info(m)
  msgs <- m@optinfo$conv$lme4$messages
  out <- list(
    formula = formula,
    data = data_name,
    data_preparation = prep,
    REML = isREML(m),
    reml_criterion = num(REMLcrit(m)),
    loglik = num(as.numeric(logLik(m))),
    aic = num(AIC(m)),
    bic = num(BIC(m)),
    nobs = nobs(m),
    ngroups = as.list(ngrps(m)),
    fixef = named_num(fixef(m)),
    vcov_beta = mat_rows(as.matrix(vcov(m))),
    vcov_names = I(colnames(vcov(m))),
    varcorr = varcorr_rows(m),
    ranef = r$ranef,
    ranef_level_order = r$ranef_level_order,
    model_matrix_colnames = I(colnames(model.matrix(m))),
    fitted_head = num(head(unname(fitted(m)), 6), as_array = TRUE),
    residuals_head = num(head(unname(residuals(m)), 6), as_array = TRUE),
    theta = named_num(getME(m, "theta")),
    is_singular = isSingular(m),
    warnings = I(c(attr(m, "warn"), if (is.null(msgs)) character(0) else msgs))
  )
  c(out, extra, list(reml_criterion_value = REMLcrit(m), fixef_value = fixef(m)))
}

# ------------------------------------------------------------------ data ---
sleepstudy <- lme4::sleepstudy
cake <- lme4::cake
cake$temperature <- factor(cake$temperature, ordered = FALSE)
Machines <- as.data.frame(nlme::Machines)
ergoStool <- as.data.frame(nlme::ergoStool)
Penicillin <- lme4::Penicillin
sleepstudy_na <- lme4::sleepstudy
sleepstudy_na$Reaction[c(1, 5)] <- NA
sleepstudy_na$Days[10] <- NA

csv <- function(df, name) {
  write.csv(df, file.path(out_dir, name), row.names = FALSE)
}
csv(cake[, c("replicate", "recipe", "temperature", "angle", "temp")], "cake.csv")
csv(Machines[, c("Worker", "Machine", "score")], "Machines.csv")
csv(ergoStool[, c("effort", "Type", "Subject")], "ergoStool.csv")
csv(Penicillin[, c("diameter", "plate", "sample")], "Penicillin.csv")
csv(sleepstudy_na[, c("Reaction", "Days", "Subject")], "sleepstudy_na.csv")

# check the CSVs read back to the same values (labels compared as text)
same_as_csv <- function(df, name) {
  back <- read.csv(file.path(out_dir, name), stringsAsFactors = FALSE)
  stopifnot(identical(names(back), names(df)), nrow(back) == nrow(df))
  for (v in names(df)) {
    a <- df[[v]]; b <- back[[v]]
    if (is.factor(a)) stopifnot(identical(as.character(a), as.character(b)))
    else stopifnot(isTRUE(all.equal(as.numeric(a), as.numeric(b), tolerance = 0)))
  }
  invisible(TRUE)
}
same_as_csv(cake[, c("replicate", "recipe", "temperature", "angle", "temp")], "cake.csv")
same_as_csv(Machines[, c("Worker", "Machine", "score")], "Machines.csv")
same_as_csv(ergoStool[, c("effort", "Type", "Subject")], "ergoStool.csv")
same_as_csv(Penicillin[, c("diameter", "plate", "sample")], "Penicillin.csv")
same_as_csv(sleepstudy_na[, c("Reaction", "Days", "Subject")], "sleepstudy_na.csv")

refs <- list()

# ------------------------------------------------------------ sleepstudy ---
m_slope <- fit(lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy))
refs$sleepstudy_slope <- record(m_slope, "Reaction ~ Days + (Days | Subject)", "lme4::sleepstudy")

m <- fit(lmer(Reaction ~ Days + (Days || Subject), data = sleepstudy))
refs$sleepstudy_uncorrelated <- record(m, "Reaction ~ Days + (Days || Subject)", "lme4::sleepstudy")

m <- fit(lmer(Reaction ~ Days + (1 | Subject), data = sleepstudy))
refs$sleepstudy_intercept <- record(m, "Reaction ~ Days + (1 | Subject)", "lme4::sleepstudy")

m <- fit(lmer(Reaction ~ 0 + Days + (1 | Subject), data = sleepstudy))
refs$sleepstudy_no_intercept <- record(m, "Reaction ~ 0 + Days + (1 | Subject)", "lme4::sleepstudy")

m <- fit(lmer(log(Reaction) ~ Days + I(Days^2) + (1 | Subject), data = sleepstudy))
refs$sleepstudy_log_quadratic <- record(m, "log(Reaction) ~ Days + I(Days^2) + (1 | Subject)", "lme4::sleepstudy")

# ------------------------------------------------------------------ cake ---
cake_prep <- "cake <- lme4::cake; cake$temperature <- factor(cake$temperature, ordered = FALSE)"
m <- fit(lmer(angle ~ recipe * temperature + (1 | recipe:replicate), data = cake))
refs$cake_interaction <- record(m, "angle ~ recipe * temperature + (1 | recipe:replicate)", "cake.csv", cake_prep)

m <- fit(lmer(angle ~ recipe + temp + (1 | replicate), data = cake, contrasts = list(recipe = "contr.sum")))
refs$cake_sum <- record(m, "angle ~ recipe + temp + (1 | replicate)", "cake.csv", cake_prep,
                        list(contrasts = list(recipe = "contr.sum")))

m <- fit(lmer(angle ~ recipe + temp + (1 | replicate), data = cake, contrasts = list(recipe = "contr.helmert")))
refs$cake_helmert <- record(m, "angle ~ recipe + temp + (1 | replicate)", "cake.csv", cake_prep,
                            list(contrasts = list(recipe = "contr.helmert")))

# -------------------------------------------------------------- Machines ---
mach_prep <- "Machines <- as.data.frame(nlme::Machines)  # Worker is an ordered factor with levels 6,2,4,1,3,5"
m_nested <- fit(lmer(score ~ Machine + (1 | Worker/Machine), data = Machines))
refs$machines_nested <- record(m_nested, "score ~ Machine + (1 | Worker/Machine)", "Machines.csv", mach_prep)

m_expl <- fit(lmer(score ~ Machine + (1 | Worker) + (1 | Worker:Machine), data = Machines))
refs$machines_explicit <- record(m_expl, "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", "Machines.csv", mach_prep)
stopifnot(all.equal(REMLcrit(m_nested), REMLcrit(m_expl), tolerance = 1e-10))

m <- fit(lmer(score ~ Machine + (0 + Machine | Worker), data = Machines))
refs$machines_slope <- record(m, "score ~ Machine + (0 + Machine | Worker)", "Machines.csv", mach_prep)

# ------------------------------------------------------------- ergoStool ---
m <- fit(lmer(effort ~ Type + (1 | Subject), data = ergoStool))
refs$ergostool <- record(m, "effort ~ Type + (1 | Subject)", "ergoStool.csv",
                         "ergoStool <- as.data.frame(nlme::ergoStool)  # Subject is an ordered factor with levels 8,5,4,9,6,3,7,2,1")

# ------------------------------------------------------------ Penicillin ---
m <- fit(lmer(diameter ~ 1 + (1 | plate) + (1 | sample), data = Penicillin))
refs$penicillin <- record(m, "diameter ~ 1 + (1 | plate) + (1 | sample)", "Penicillin.csv", "Penicillin <- lme4::Penicillin")

# --------------------------------------------------------- sleepstudy_na ---
m <- fit(lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy_na, na.action = na.omit))
stopifnot(nobs(m) == 177)
refs$sleepstudy_na <- record(m, "Reaction ~ Days + (Days | Subject)", "sleepstudy_na.csv",
                             "sleepstudy_na <- lme4::sleepstudy; sleepstudy_na$Reaction[c(1, 5)] <- NA; sleepstudy_na$Days[10] <- NA; lmer(..., na.action = na.omit)",
                             list(na_action = "na.omit"))

# -------------------------------------------------------------------- ML ---
m_ml <- fit(lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = FALSE))
refs$sleepstudy_slope_ML <- list(
  formula = "Reaction ~ Days + (Days | Subject)",
  data = "lme4::sleepstudy",
  REML = FALSE,
  deviance = num(deviance(m_ml)),
  loglik = num(as.numeric(logLik(m_ml))),
  aic = num(AIC(m_ml)),
  bic = num(BIC(m_ml)),
  nobs = nobs(m_ml),
  fixef = named_num(fixef(m_ml)),
  vcov_beta = mat_rows(as.matrix(vcov(m_ml))),
  vcov_names = I(colnames(vcov(m_ml))),
  varcorr = varcorr_rows(m_ml),
  theta = named_num(getME(m_ml, "theta")),
  warnings = I(attr(m_ml, "warn"))
)

# ----------------------------------------------------------- predictions ---
newdata <- data.frame(Subject = c("308", "309", "999", "308"), Days = c(0, 5, 2, 9.5))
p_new <- predict(m_slope, newdata, allow.new.levels = TRUE)
p_pop <- predict(m_slope, newdata, re.form = NA)
p_known <- predict(m_slope, newdata[c(1, 2, 4), ])
err <- tryCatch({ predict(m_slope, newdata); NA_character_ },
                error = function(e) conditionMessage(e))
p_re0 <- tryCatch(predict(m_slope, newdata = data.frame(Subject = "308", Days = 3), re.form = ~0),
                  error = function(e) NULL)
refs$sleepstudy_predict <- list(
  model = "sleepstudy_slope",
  formula = "Reaction ~ Days + (Days | Subject)",
  newdata = list(Subject = I(newdata$Subject), Days = num(newdata$Days, as_array = TRUE)),
  allow_new_levels = list(call = "predict(m, newdata, allow.new.levels = TRUE)",
                          values = num(unname(p_new), as_array = TRUE)),
  re_form_NA = list(call = "predict(m, newdata, re.form = NA)",
                    values = num(unname(p_pop), as_array = TRUE)),
  known_levels = list(call = "predict(m, newdata[c(1, 2, 4), ])", rows = I(c(1L, 2L, 4L)),
                      values = num(unname(p_known), as_array = TRUE)),
  new_level_error = list(call = "predict(m, newdata)", message = err)
)
if (!is.null(p_re0)) {
  refs$sleepstudy_predict$re_form_zero <- list(
    call = "predict(m, newdata = data.frame(Subject = \"308\", Days = 3), re.form = ~0)",
    newdata = list(Subject = I("308"), Days = num(3, as_array = TRUE)),
    values = num(unname(p_re0), as_array = TRUE))
}

# ------------------------------------------- refit from the CSV files ---
# The same models fitted on the CSVs as read.csv reads them (sorted factor
# levels; cake replicate an integer, temperature made an unordered factor).
rd <- function(name) read.csv(file.path(out_dir, name), stringsAsFactors = TRUE)
cake_csv <- rd("cake.csv")
cake_csv$replicate <- factor(cake_csv$replicate)
cake_csv$temperature <- factor(cake_csv$temperature)
mach_csv <- rd("Machines.csv"); ergo_csv <- rd("ergoStool.csv"); pen_csv <- rd("Penicillin.csv")
sna_csv <- rd("sleepstudy_na.csv"); sna_csv$Subject <- factor(sna_csv$Subject)
csv_fits <- list(
  cake_interaction = lmer(angle ~ recipe * temperature + (1 | recipe:replicate), data = cake_csv),
  cake_sum = lmer(angle ~ recipe + temp + (1 | replicate), data = cake_csv, contrasts = list(recipe = "contr.sum")),
  cake_helmert = lmer(angle ~ recipe + temp + (1 | replicate), data = cake_csv, contrasts = list(recipe = "contr.helmert")),
  machines_nested = lmer(score ~ Machine + (1 | Worker/Machine), data = mach_csv),
  machines_explicit = lmer(score ~ Machine + (1 | Worker) + (1 | Worker:Machine), data = mach_csv),
  machines_slope = lmer(score ~ Machine + (0 + Machine | Worker), data = mach_csv),
  ergostool = lmer(effort ~ Type + (1 | Subject), data = ergo_csv),
  penicillin = lmer(diameter ~ 1 + (1 | plate) + (1 | sample), data = pen_csv),
  sleepstudy_na = lmer(Reaction ~ Days + (Days | Subject), data = sna_csv, na.action = na.omit)
)
csv_check <- lapply(names(csv_fits), function(k) {
  mc <- csv_fits[[k]]
  d_crit <- abs(REMLcrit(mc) - refs[[k]]$reml_criterion_value)
  d_fix <- max(abs(fixef(mc) - refs[[k]]$fixef_value))
  stopifnot(d_crit < 1e-6, d_fix < 1e-5 * max(1, abs(fixef(mc))))
  list(max_abs_diff_reml_criterion = num(d_crit), max_abs_diff_fixef = num(d_fix))
})
names(csv_check) <- names(csv_fits)
for (k in names(refs)) { refs[[k]]$reml_criterion_value <- NULL; refs[[k]]$fixef_value <- NULL }

# ----------------------------------------------------------------- about ---
about <- list(
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  nlme_version = as.character(packageVersion("nlme")),
  Matrix_version = as.character(packageVersion("Matrix")),
  jsonlite_version = as.character(packageVersion("jsonlite")),
  date = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
  notes = paste(
    "REML fits (lmer defaults, optimizer nloptwrap) unless REML = FALSE.",
    "Fits use the package data frames; CSVs were checked to hold the same values.",
    "Level orders in ranef/ranef_level_order are lme4's for the package data:",
    "nlme::Machines$Worker and nlme::ergoStool$Subject are ORDERED factors whose",
    sprintf("level order is not sorted (Worker: %s; Subject: %s);",
            paste(levels(Machines$Worker), collapse = ","),
            paste(levels(ergoStool$Subject), collapse = ",")),
    "a data frame read from the CSV has sorted levels instead (same fit, other ranef row order).",
    "lme4 puts random-effect terms in decreasing order of their number of levels.",
    "Doubles are written with %.17g (verbatim JSON) for exact round-trip."),
  csv_refit_check = csv_check,
  r_code = script_text
)

all_refs <- c(list("_about" = about), refs)
write_json(all_refs, file.path(out_dir, "lme4_formula_references.json"),
           digits = NA, auto_unbox = TRUE, pretty = TRUE, na = "null", json_verbatim = TRUE)
cat("wrote", file.path(out_dir, "lme4_formula_references.json"), "\n")
