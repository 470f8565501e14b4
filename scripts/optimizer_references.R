#!/usr/bin/env Rscript
## Reference numbers from R (lme4 / nlme / direct optim) for reml_fn optimizer regression tests.
## Run from the repository root:  Rscript scripts/optimizer_references.R
## Writes tests/data/optimizer_references.json, tests/data/extreme_ratio.csv, tests/data/ar1_noise.csv, tests/data/ar1_noise_interior.csv
options(digits = 15)
suppressPackageStartupMessages({ library(lme4); library(nlme); library(jsonlite) })

t_start <- proc.time()[["elapsed"]]
out_dir <- "tests/data"
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

ss <- read.csv("reml_fn/datasets/data/sleepstudy.csv")
ss$Subject <- factor(ss$Subject)

## Evaluate an expression (given as a string) capturing warnings and errors.
run_capture <- function(call_str, envir = parent.frame()) {
  warns <- character(0)
  err <- NULL
  val <- tryCatch(
    withCallingHandlers(eval(parse(text = call_str), envir = envir),
      warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") },
      message = function(m) { warns <<- c(warns, paste0("[message] ", trimws(conditionMessage(m)))); invokeRestart("muffleMessage") }),
    error = function(e) { err <<- conditionMessage(e); NULL })
  list(value = val, warnings = warns, error = err)
}

nm <- function(x) ifelse(x == "(Intercept)", "intercept", x)

## Variance components of a merMod as a flat named list (natural scale).
lmer_vc <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  res <- list()
  for (i in seq_len(nrow(vc))) {
    g <- vc$grp[i]; v1 <- vc$var1[i]; v2 <- vc$var2[i]
    if (g == "Residual") key <- "var_residual"
    else if (is.na(v2)) key <- sprintf("var_%s_%s", g, nm(v1))
    else key <- sprintf("cov_%s_%s_%s", g, nm(v1), nm(v2))
    res[[key]] <- vc$vcov[i]
  }
  res
}

lmer_entry <- function(call_str, envir = parent.frame()) {
  r <- run_capture(call_str, envir)
  e <- list(call = call_str)
  if (!is.null(r$error)) { e$error <- r$error; e$warnings <- I(r$warnings); return(e) }
  fit <- r$value
  ll <- logLik(fit)
  e$REML <- isREML(fit)
  e$logLik <- as.numeric(ll)
  e$logLik_df <- attr(ll, "df")
  e$deviance_criterion <- if (isREML(fit)) unname(fit@devcomp$cmp[["REML"]]) else unname(fit@devcomp$cmp[["dev"]])
  e$variances <- lmer_vc(fit)
  b <- fixef(fit)
  e$beta <- if (length(b)) as.list(setNames(unname(b), nm(names(b)))) else setNames(list(), character(0))
  e$theta <- I(unname(getME(fit, "theta")))
  e$optimizer <- fit@optinfo$optimizer
  e$optimizer_feval <- fit@optinfo$feval
  e$warnings <- I(r$warnings)
  e$lme4_conv_messages <- I(as.character(unlist(fit@optinfo$conv$lme4$messages)))
  e$optimizer_warnings <- I(as.character(unlist(fit@optinfo$warnings)))
  e
}

## Variance components of an nlme::lme fit with a single grouping level.
lme_vc <- function(fit) {
  res <- list()
  grp <- names(fit$groups)[1]
  S <- as.matrix(getVarCov(fit))
  cn <- nm(colnames(S))
  for (i in seq_along(cn)) {
    res[[sprintf("var_%s_%s", grp, cn[i])]] <- S[i, i]
    if (i < length(cn)) for (j in (i + 1):length(cn))
      res[[sprintf("cov_%s_%s_%s", grp, cn[i], cn[j])]] <- S[i, j]
  }
  res$var_residual <- fit$sigma^2
  res
}

lme_entry <- function(call_str, envir = parent.frame()) {
  r <- run_capture(call_str, envir)
  e <- list(call = call_str)
  if (!is.null(r$error)) { e$error <- r$error; e$warnings <- I(r$warnings); return(e) }
  fit <- r$value
  e$logLik <- as.numeric(logLik(fit))
  e$variances <- lme_vc(fit)
  b <- fixef(fit)
  e$beta <- if (length(b)) as.list(setNames(unname(b), nm(names(b)))) else setNames(list(), character(0))
  e$warnings <- I(r$warnings)
  e
}

res <- list()
timing <- list()
tick <- function() proc.time()[["elapsed"]]

## ---------------------------------------------------------------- 1 confounded
t0 <- tick()
conf <- list()
conf$lmer <- lmer_entry("lmer(Reaction ~ 0 + Subject + (1|Subject), data = ss, REML = TRUE)")
ols <- lm(Reaction ~ 0 + Subject, data = ss)
conf$ols_check <- list(call = "lm(Reaction ~ 0 + Subject, data = ss)",
                       var_residual = summary(ols)$sigma^2,
                       df_residual = ols$df.residual,
                       RSS = sum(residuals(ols)^2))
## REML criterion profile over theta = sigma_Subject/sigma: X spans Z, so REML is flat in theta
dfun <- lmer(Reaction ~ 0 + Subject + (1|Subject), data = ss, REML = TRUE, devFunOnly = TRUE)
th_grid <- c(0, 0.01, 0.1, 0.722054221699986, 2, 10, 100)
conf$reml_logLik_vs_theta <- list(theta = th_grid, logLik = sapply(th_grid, function(t) -0.5 * dfun(t)),
  note = "theta = sd_Subject/sd_residual; the REML likelihood is constant in theta (Z columns lie in col(X)), so var_Subject is not identified")
conf$nlme <- lme_entry("lme(Reaction ~ 0 + Subject, random = ~ 1 | Subject, data = ss, method = 'REML')")
res$confounded <- conf
timing$confounded <- tick() - t0

## ---------------------------------------------------------------- 2 no_intercept
t0 <- tick()
res$no_intercept <- lmer_entry("lmer(Reaction ~ 0 + Days + (Days|Subject), data = ss, REML = TRUE)")
res$no_intercept$nlme_check <- lme_entry("lme(Reaction ~ 0 + Days, random = ~ Days | Subject, data = ss, method = 'REML')")
timing$no_intercept <- tick() - t0

## ---------------------------------------------------------------- 3 no_fixed
t0 <- tick()
nf <- list()
nf$lmer_REML <- lmer_entry("lmer(Reaction ~ 0 + (Days|Subject), data = ss, REML = TRUE)")
nf$lmer_ML <- lmer_entry("lmer(Reaction ~ 0 + (Days|Subject), data = ss, REML = FALSE)")
nf$nlme_REML <- lme_entry("lme(Reaction ~ 0, random = ~ Days | Subject, data = ss, method = 'REML')")
nf$nlme_ML <- lme_entry("lme(Reaction ~ 0, random = ~ Days | Subject, data = ss, method = 'ML')")
res$no_fixed <- nf
timing$no_fixed <- tick() - t0

## ---------------------------------------------------------------- 4 uncentred
t0 <- tick()
ss$Days100 <- ss$Days + 100
unc <- list()
unc$lmer_Days100 <- lmer_entry("lmer(Reaction ~ Days + (Days100|Subject), data = ss, REML = TRUE)")
unc$lmer_default <- lmer_entry("lmer(Reaction ~ Days + (Days|Subject), data = ss, REML = TRUE)")
unc$nlme_Days100 <- lme_entry("lme(Reaction ~ Days, random = ~ Days100 | Subject, data = ss, method = 'REML')")
## natural-scale components of the Days100 parametrisation implied by the default (correct) fit:
## intercept_100 = intercept_0 - 100*slope
v <- unc$lmer_default$variances
unc$implied_Days100_components_from_default <- list(
  var_Subject_intercept = v$var_Subject_intercept - 200 * v$cov_Subject_intercept_Days + 1e4 * v$var_Subject_Days,
  cov_Subject_intercept_Days100 = v$cov_Subject_intercept_Days - 100 * v$var_Subject_Days,
  var_Subject_Days100 = v$var_Subject_Days,
  var_residual = v$var_residual,
  note = "the true REML optimum for (Days100|Subject) is the same model as (Days|Subject); logLik = lmer_default$logLik")
res$uncentred <- unc
timing$uncentred <- tick() - t0

## ---------------------------------------------------------------- 5 extreme_ratio
t0 <- tick()
set.seed(20261207)
g <- rep(1:20, each = 10)
b <- rnorm(20, sd = 1e6)
y <- 50 + b[g] + rnorm(200, sd = 1)
er_path <- file.path(out_dir, "extreme_ratio.csv")
writeLines(c("y,g", sprintf("%.17g,%d", y, g)), er_path)
## re-read so that the fits use exactly the stored numbers
er <- read.csv(er_path)
stopifnot(identical(er$y, y))
er$g <- factor(er$g)
ex <- list(data_csv = er_path,
           generation = "set.seed(20261207); g = rep(1:20, each=10); b = rnorm(20, sd=1e6); y = 50 + b[g] + rnorm(200, sd=1)")
ex$lmer <- lmer_entry("lmer(y ~ 1 + (1|g), data = er, REML = TRUE)")
ex$nlme <- lme_entry("lme(y ~ 1, random = ~ 1 | g, data = er, method = 'REML')")
## closed form (balanced one-way ANOVA)
a <- 20; nper <- 10; N <- a * nper
ybar_i <- tapply(er$y, er$g, mean); ybar <- mean(er$y)
SSB <- nper * sum((ybar_i - ybar)^2)
SSW <- sum((er$y - ybar_i[as.integer(er$g)])^2)
MSB <- SSB / (a - 1); MSW <- SSW / (N - a)
s2e <- MSW; s2g <- max((MSB - MSW) / nper, 0)
## exact REML log-likelihood of the balanced one-way model (lme4 convention)
reml_oneway <- function(s2e, s2g) {
  lam <- s2e + nper * s2g
  -0.5 * ((N - 1) * log(2 * pi) + a * (nper - 1) * log(s2e) + a * log(lam) + log(N / lam) + SSW / s2e + SSB / lam)
}
ex$closed_form <- list(MSW = MSW, MSB = MSB, SSW = SSW, SSB = SSB,
                       var_residual = s2e, var_g_intercept = s2g, beta_intercept = ybar,
                       logLik = reml_oneway(s2e, s2g),
                       note = "var_residual = MSW, var_g = (MSB-MSW)/10; logLik evaluated in closed form: -0.5*[(N-1)log2pi + a(n-1)log s2e + a log(lam) + log(N/lam) + SSW/s2e + SSB/lam], lam = s2e + n*s2g")
ex$closed_form_logLik_at_lmer_estimates <- if (is.null(ex$lmer$error))
  reml_oneway(ex$lmer$variances$var_residual, ex$lmer$variances$var_g_intercept) else NA
ex$closed_form_logLik_at_nlme_estimates <- if (is.null(ex$nlme$error))
  reml_oneway(ex$nlme$variances$var_residual, ex$nlme$variances$var_g_intercept) else NA
res$extreme_ratio <- ex
timing$extreme_ratio <- tick() - t0

## ---------------------------------------------------------------- helpers for 6 and 7
## REML logLik (lme4 convention) of y = mu + AR(1) + noise: V = var_ar * rho^|i-j| + var_noise * I,
## X = 1; returns function(var_ar, var_noise, rho) with the estimate of mu as attr(, "beta").
ar1_noise_reml_for <- function(y) {
  n <- length(y)
  X <- matrix(1, n, 1)
  D <- abs(outer(1:n, 1:n, "-"))
  function(s2ar, s2n, r) {
    V <- s2ar * r^D + diag(s2n, n)
    L <- chol(V)                              # V = t(L) %*% L
    Xs <- backsolve(L, X, transpose = TRUE)
    ys <- backsolve(L, y, transpose = TRUE)
    XtViX <- crossprod(Xs)
    beta <- solve(XtViX, crossprod(Xs, ys))
    rs <- ys - Xs %*% beta
    p <- ncol(X)
    ll <- -0.5 * ((n - p) * log(2 * pi) + 2 * sum(log(diag(L))) +
                  as.numeric(determinant(XtViX, logarithm = TRUE)$modulus) + sum(rs^2))
    attr(ll, "beta") <- as.numeric(beta)
    ll
  }
}

## Direct optimisation of an AR1 + noise REML logLik from each start on (log var_ar, log var_noise,
## atanh rho): Nelder-Mead then BFGS, both reltol 1e-14. Returns the runs and the best one.
ar1_noise_optim <- function(reml, starts) {
  negll <- function(th) {
    v <- tryCatch(-as.numeric(reml(exp(th[1]), exp(th[2]), tanh(th[3]))), error = function(e) Inf)
    if (!is.finite(v)) 1e10 else v
  }
  runs <- lapply(starts, function(s) {
    o1 <- optim(s, negll, method = "Nelder-Mead", control = list(reltol = 1e-14, maxit = 20000))
    o2 <- optim(o1$par, negll, method = "BFGS", control = list(reltol = 1e-14, maxit = 10000))
    list(start = s, nm_value = -o1$value, par = o2$par, logLik = -o2$value, conv = c(o1$convergence, o2$convergence))
  })
  list(runs = runs, best = runs[[which.max(sapply(runs, `[[`, "logLik"))]])
}

## Per-start results of ar1_noise_optim on the natural scale, for the JSON.
all_starts <- function(runs) list(
  all_starts_logLik = sapply(runs, `[[`, "logLik"),
  all_starts_var_ar = sapply(runs, function(r) exp(r$par[1])),
  all_starts_var_noise = sapply(runs, function(r) exp(r$par[2])),
  all_starts_rho = sapply(runs, function(r) tanh(r$par[3])),
  all_starts_convergence_codes = lapply(runs, `[[`, "conv"))

## An ARMA(1,1) gls fit read as AR1 + noise: acf(k) = c * phi^(k-1) for k >= 1, with lag-1
## autocorrelation (1+phi*theta)(phi+theta)/(1+2 phi theta + theta^2); implied var_noise < 0 when the
## ARMA optimum lies outside the AR1 + noise region. our_logLik is reml at the implied parameters.
arma11_as_ar1_noise <- function(gf, reml) {
  cf <- coef(gf$modelStruct$corStruct, unconstrained = FALSE)
  phi <- unname(cf[1]); theta <- unname(cf[2]); s2 <- gf$sigma^2
  r1 <- (1 + phi * theta) * (phi + theta) / (1 + 2 * phi * theta + theta^2)
  var_ar <- s2 * r1 / phi
  var_noise <- s2 - var_ar
  list(phi = phi, theta = theta, s2 = s2, var_ar = var_ar, var_noise = var_noise,
       logLik = as.numeric(logLik(gf)),
       our_logLik = if (var_noise > 0 && var_ar > 0) as.numeric(reml(var_ar, var_noise, phi)) else NA)
}

## ---------------------------------------------------------------- 6 ar1_noise
t0 <- tick()
set.seed(20261207)
n <- 100; rho <- 0.7
aa <- as.numeric(arima.sim(list(ar = rho), n = n, sd = sqrt(2 * (1 - rho^2))))
yy <- 10 + aa + rnorm(n, sd = 1)
ar_path <- file.path(out_dir, "ar1_noise.csv")
writeLines(c("y", sprintf("%.17g", yy)), ar_path)
ard <- read.csv(ar_path)
stopifnot(identical(ard$y, yy))
yv <- ard$y
reml_ar1 <- ar1_noise_reml_for(yv)
vy <- var(yv)
starts <- list(c(log(vy / 2), log(vy / 2), atanh(0.5)),
               c(log(vy * 0.9), log(vy * 0.1), atanh(0.9)),
               c(log(vy * 0.1), log(vy * 0.9), atanh(0.2)),
               c(log(2), log(1), atanh(0.7)),
               c(log(vy), log(vy / 10), atanh(-0.5)),
               c(log(vy / 10), log(vy), atanh(0.95)),
               c(0, 0, 0))
fitted <- ar1_noise_optim(reml_ar1, starts)
bp <- fitted$best$par
llb <- reml_ar1(exp(bp[1]), exp(bp[2]), tanh(bp[3]))
arn <- list(data_csv = ar_path,
            generation = "set.seed(20261207); n=100; rho=0.7; a = as.numeric(arima.sim(list(ar=rho), n=n, sd=sqrt(2*(1-rho^2)))); y = 10 + a + rnorm(n, sd=1)",
            model = "V = var_ar * rho^|i-j| + var_noise * I, X = 1; REML logLik lme4 convention -0.5*[(n-p)log2pi + log|V| + log|X'V^-1X| + r'V^-1r]",
            direct_optim = c(list(
              method = "optim Nelder-Mead (reltol 1e-14) then BFGS (reltol 1e-14) on (log var_ar, log var_noise, atanh rho), 7 starts",
              logLik = as.numeric(llb), var_ar = exp(bp[1]), var_noise = exp(bp[2]), rho = tanh(bp[3]),
              mu_hat = attr(llb, "beta")),
              all_starts(fitted$runs)))
## the optimum is on the boundary var_noise = 0 for this seed: fit the boundary model exactly
negll0 <- function(th) { v <- tryCatch(-as.numeric(reml_ar1(exp(th[1]), 0, tanh(th[2]))), error = function(e) Inf); if (!is.finite(v)) 1e10 else v }
o0 <- optim(c(bp[1], bp[3]), negll0, method = "Nelder-Mead", control = list(reltol = 1e-14, maxit = 20000))
o0 <- optim(o0$par, negll0, method = "BFGS", control = list(reltol = 1e-14, maxit = 10000))
ll0 <- reml_ar1(exp(o0$par[1]), 0, tanh(o0$par[2]))
h <- 1e-6
arn$boundary_fit_var_noise_0 <- list(logLik = as.numeric(ll0), var_ar = exp(o0$par[1]), var_noise = 0,
  rho = tanh(o0$par[2]), mu_hat = attr(ll0, "beta"),
  dlogLik_dvar_noise_at_0 = (as.numeric(reml_ar1(exp(o0$par[1]), h, tanh(o0$par[2]))) - as.numeric(ll0)) / h,
  note = "pure AR(1) REML optimum (var_noise fixed at 0); one-sided derivative wrt var_noise < 0 confirms a boundary optimum")
## nlme cross-check: ARMA(1,1) contains AR(1)+noise
gc <- run_capture("gls(y ~ 1, data = ard, correlation = corARMA(p = 1, q = 1), method = 'REML')")
if (is.null(gc$error)) {
  gf <- gc$value
  a <- arma11_as_ar1_noise(gf, reml_ar1)
  arn$nlme_gls_arma11 <- list(call = "gls(y ~ 1, data = ard, correlation = corARMA(p = 1, q = 1), method = 'REML')",
    logLik = a$logLik, sigma2 = a$s2, phi = a$phi, theta_ma = a$theta, mu_hat = unname(coef(gf)),
    implied_var_ar = a$var_ar, implied_var_noise = a$var_noise, implied_rho = a$phi,
    our_logLik_at_implied_params = a$our_logLik,
    note = "implied_var_noise < 0 means the ARMA(1,1) optimum lies outside the AR1+noise region (theta_ma has the same sign as phi); gls corAR1 logLik equals our boundary fit, so nlme's gls REML uses the same constant convention",
    warnings = I(gc$warnings))
  ## pure AR1 (no noise) for reference
  ga <- gls(y ~ 1, data = ard, correlation = corAR1(), method = "REML")
  arn$nlme_gls_ar1_only <- list(call = "gls(y ~ 1, data = ard, correlation = corAR1(), method = 'REML')",
    logLik = as.numeric(logLik(ga)), sigma2 = ga$sigma^2,
    phi = unname(coef(ga$modelStruct$corStruct, unconstrained = FALSE)))
} else arn$nlme_gls_arma11 <- list(error = gc$error, warnings = I(gc$warnings))
res$ar1_noise <- arn
timing$ar1_noise <- tick() - t0

## ---------------------------------------------------------------- 7 ar1_noise_interior
## Same model as ar1_noise, but a data-generating setup (and seed) whose REML optimum lies
## clearly inside the parameter region: var_noise >= 0.3 * its generating value and 0.2 < rho < 0.95.
## Seeds are tried from 20261208 upwards; the first one, 20261208, already met the criterion.
t0 <- tick()
ai_seed <- 20261208
ai_n <- 200; ai_rho <- 0.8; ai_var_ar <- 4; ai_var_noise <- 1
set.seed(ai_seed)
ai_a <- as.numeric(arima.sim(list(ar = ai_rho), n = ai_n, sd = sqrt(ai_var_ar * (1 - ai_rho^2))))
ai_y <- 10 + ai_a + rnorm(ai_n, sd = sqrt(ai_var_noise))
ai_path <- file.path(out_dir, "ar1_noise_interior.csv")
writeLines(c("y", sprintf("%.17g", ai_y)), ai_path)
aid <- read.csv(ai_path)
stopifnot(identical(aid$y, ai_y))
reml_ar1_i <- ar1_noise_reml_for(aid$y)
vyi <- var(aid$y)
starts_i <- list(c(log(vyi / 2), log(vyi / 2), atanh(0.5)),
                 c(log(vyi * 0.9), log(vyi * 0.1), atanh(0.9)),
                 c(log(vyi * 0.1), log(vyi * 0.9), atanh(0.2)),
                 c(log(ai_var_ar), log(ai_var_noise), atanh(ai_rho)),
                 c(log(vyi), log(vyi / 10), atanh(-0.5)),
                 c(log(vyi / 10), log(vyi), atanh(0.95)),
                 c(0, 0, 0))
fitted_i <- ar1_noise_optim(reml_ar1_i, starts_i)
bpi <- fitted_i$best$par
llbi <- reml_ar1_i(exp(bpi[1]), exp(bpi[2]), tanh(bpi[3]))
est_i <- c(var_ar = exp(bpi[1]), var_noise = exp(bpi[2]), rho = tanh(bpi[3]))
stopifnot(est_i[["var_noise"]] >= 0.3 * ai_var_noise, est_i[["rho"]] > 0.2, est_i[["rho"]] < 0.95)
## central-difference gradient and Hessian of the logLik on the natural scale (var_ar, var_noise, rho)
ll_nat <- function(p) as.numeric(reml_ar1_i(p[1], p[2], p[3]))
hh <- 1e-4 * pmax(abs(est_i), 1)
grad_i <- sapply(1:3, function(k) { e <- replace(numeric(3), k, hh[k])
  (ll_nat(est_i + e) - ll_nat(est_i - e)) / (2 * hh[k]) })
hess_i <- matrix(0, 3, 3)
for (k in 1:3) for (l in 1:3) {
  ek <- replace(numeric(3), k, hh[k]); el <- replace(numeric(3), l, hh[l])
  hess_i[k, l] <- (ll_nat(est_i + ek + el) - ll_nat(est_i + ek - el) - ll_nat(est_i - ek + el) + ll_nat(est_i - ek - el)) / (4 * hh[k] * hh[l])
}
ari <- list(data_csv = ai_path,
            seed = ai_seed,
            seed_search = "seeds tried from 20261208 upwards until the direct REML optimum had var_noise >= 0.3*1 and 0.2 < rho < 0.95; 20261208 (the first) qualified",
            generation = sprintf("set.seed(%d); n=200; rho=0.8; a = as.numeric(arima.sim(list(ar=rho), n=n, sd=sqrt(4*(1-rho^2)))); y = 10 + a + rnorm(n, sd=1)", ai_seed),
            generating_values = list(n = ai_n, mu = 10, var_ar = ai_var_ar, var_noise = ai_var_noise, rho = ai_rho),
            model = "V = var_ar * rho^|i-j| + var_noise * I, X = 1; REML logLik lme4 convention -0.5*[(n-p)log2pi + log|V| + log|X'V^-1X| + r'V^-1r]",
            direct_optim = c(list(
              method = "optim Nelder-Mead (reltol 1e-14) then BFGS (reltol 1e-14) on (log var_ar, log var_noise, atanh rho), 7 starts",
              logLik = as.numeric(llbi), var_ar = est_i[["var_ar"]], var_noise = est_i[["var_noise"]], rho = est_i[["rho"]],
              mu_hat = attr(llbi, "beta"),
              gradient_natural_scale = grad_i,
              hessian_natural_scale_eigenvalues = eigen(hess_i, symmetric = TRUE, only.values = TRUE)$values,
              natural_scale_order = I(c("var_ar", "var_noise", "rho"))),
              all_starts(fitted_i$runs),
              list(note = "interior optimum: gradient ~ 0 and all Hessian eigenvalues < 0")))
## nlme cross-check: ARMA(1,1) contains AR(1)+noise; at an interior optimum with -phi < theta_ma < 0
## the ARMA(1,1) REML optimum is the AR1+noise optimum, so the logLiks must agree
gci <- run_capture("gls(y ~ 1, data = aid, correlation = corARMA(p = 1, q = 1), method = 'REML')")
if (is.null(gci$error)) {
  gfi <- gci$value
  a <- arma11_as_ar1_noise(gfi, reml_ar1_i)
  ari$nlme_gls_arma11 <- list(call = "gls(y ~ 1, data = aid, correlation = corARMA(p = 1, q = 1), method = 'REML')",
    logLik = a$logLik, sigma2 = a$s2, phi = a$phi, theta_ma = a$theta, mu_hat = unname(coef(gfi)),
    theta_ma_sign_as_AR1_plus_noise_implies = (a$theta < 0 && a$theta > -a$phi),
    implied_var_ar = a$var_ar, implied_var_noise = a$var_noise, implied_rho = a$phi,
    our_logLik_at_implied_params = a$our_logLik,
    logLik_gls_minus_direct_optim = a$logLik - as.numeric(llbi),
    note = "implied_var_ar = sigma2*acf(1)/phi, acf(1) = (1+phi*theta)(phi+theta)/(1+2*phi*theta+theta^2); implied_var_noise = sigma2 - implied_var_ar; implied_rho = phi",
    warnings = I(gci$warnings))
} else ari$nlme_gls_arma11 <- list(error = gci$error, warnings = I(gci$warnings))
res$ar1_noise_interior <- ari
timing$ar1_noise_interior <- tick() - t0

res <- c(list(`_about` = list(
  script = "scripts/optimizer_references.R",
  R_version = R.version.string,
  lme4_version = as.character(packageVersion("lme4")),
  nlme_version = as.character(packageVersion("nlme")),
  Matrix_version = as.character(packageVersion("Matrix")),
  jsonlite_version = as.character(packageVersion("jsonlite")),
  logLik_convention = "lme4 REML: -0.5*[(n-p)log2pi + log|V| + log|X'V^-1X| + r'V^-1r]",
  seconds_per_case = timing,
  seconds_total = tick() - t_start)), res)

writeLines(toJSON(res, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"),
           file.path(out_dir, "optimizer_references.json"))
cat("wrote", file.path(out_dir, "optimizer_references.json"), "\n")
