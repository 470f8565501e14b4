# Reference REML fits from R nlme for linear mixed models with CROSSED random
# intercepts (Subject, Rater) plus a correlated residual within Subject, on a
# small deterministic synthetic dataset.
#
# Usage (from anywhere):  Rscript tests/data/correlation/make_crossed.R [repo_root]
#
# 1. Simulates the data (set.seed(20261207), default RNGkind: Mersenne-Twister,
#    Inversion, Rejection) and writes tests/data/correlation/crossed_ar1.csv
#    (columns Subject, Rater, Time, Visit, x, y; x and y written with
#    sprintf("%.17g") so they round-trip exactly).  RNG call order:
#      u <- rnorm(30, 0, 2)             # subject effects, S01..S30
#      v <- rnorm(6, 0, 1)              # rater effects,   R1..R6
#      for each subject i = 1..30:
#        k    <- sample(4:9, 1)                          # number of visits
#        Time <- sort(sample(0:15, k))                   # distinct integer times
#        rater_j <- sample(1:6, 1)  for j = 1..k         # one call per row
#        x    <- rnorm(k)
#        z    <- rnorm(k)
#        e_1 = 1.2 z_1;  e_j = 0.7^dt e_{j-1} + sqrt(1.2^2 (1 - 0.7^(2 dt))) z_j,
#              dt = Time_j - Time_{j-1}                  # CAR(1) in Time
#        y    <- 10 + 0.5 x + u_i + v_rater + e
#    Visit = 1..k within subject; rows ordered by Subject then Time.
# 2. Reads the CSV back (so R fits exactly the numbers Python reads):
#    Subject factor levels S01..S30, Rater factor levels R1..R6, plus a
#    constant grouping factor dummy <- factor(1).
# 3. Fits, method = "REML", fixed y ~ x, crossed random intercepts via
#      random = list(dummy = pdBlocked(list(pdIdent(~ 0 + Subject),
#                                           pdIdent(~ 0 + Rater))))
#    and residual correlation (grouping MUST be written dummy/Subject: nlme's
#    lme requires the correlation grouping to start with the random-effects
#    grouping; "~ Time | Subject" fails with "incompatible formulas for groups
#    in 'random' and 'correlation'"):
#      crossed_car1       corCAR1(form = ~ Time | dummy/Subject)
#      crossed_ar1_visit  corAR1(form = ~ Visit | dummy/Subject)
#      crossed_cs         corCompSymm(form = ~ 1 | dummy/Subject)
#      crossed_none       (no correlation; baseline, see crossed_cs caveat)
#    Each model is fitted with lmeControl(opt = "nlminb") (nlminb default
#    rel.tol; tighter makes nlminb stop with "singular convergence") and
#    opt = "optim" (BFGS, reltol 1e-14); the fit with the higher logLik is stored, both logLiks
#    are recorded.
# 4. Independent check: the REML log-likelihood is re-evaluated with a dense
#    direct formula
#      -0.5 [log|V| + log|X'V^-1 X| + r'V^-1 r + (n - p) log(2 pi)],
#      V = s_subj Z_s Z_s' + s_rater Z_r Z_r' + sigma^2 blockdiag_Subject(R_i),
#      r = y - X beta_GLS(V)
#    at nlme's estimates, and that function is also maximised independently
#    (nlminb from nlme's estimate and from a default start), and Newton-polished
#    with its analytic gradient to |grad| ~ 1e-13 (direct_check.newton_polished:
#    the exact optimum, tighter than nlme's ~1e-6 relative parameter accuracy).
# 5. Writes tests/data/correlation/nlme_crossed.json; every double is written
#    with sprintf("%.17g") (jsonlite json_verbatim); NA / non-finite -> null.

suppressPackageStartupMessages({
  library(nlme)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
root <- if (length(args) >= 1) args[[1]] else {
  f <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(f) == 1) normalizePath(file.path(dirname(f), "..", "..", "..")) else "."
}
out_dir <- file.path(root, "tests", "data", "correlation")
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)
csv_path <- file.path(out_dir, "crossed_ar1.csv")
json_path <- file.path(out_dir, "nlme_crossed.json")

# ------------------------------------------------------------------ simulate
RNGkind("Mersenne-Twister", "Inversion", "Rejection")
set.seed(20261207)
n_subj <- 30L; n_rater <- 6L
beta_true <- c(10, 0.5); sd_subj <- 2; sd_rater <- 1
phi_true <- 0.7; sd_e <- 1.2
u <- rnorm(n_subj, 0, sd_subj)
v <- rnorm(n_rater, 0, sd_rater)
pieces <- vector("list", n_subj)
for (i in seq_len(n_subj)) {
  k <- sample(4:9, 1)
  tt <- sort(sample(0:15, k))
  rr <- integer(k)
  for (j in seq_len(k)) rr[j] <- sample(1:6, 1)
  x <- rnorm(k)
  z <- rnorm(k)
  e <- numeric(k)
  e[1] <- sd_e * z[1]
  if (k > 1) for (j in 2:k) {
    dt <- tt[j] - tt[j - 1]
    e[j] <- phi_true^dt * e[j - 1] + sqrt(sd_e^2 * (1 - phi_true^(2 * dt))) * z[j]
  }
  y <- beta_true[1] + beta_true[2] * x + u[i] + v[rr] + e
  pieces[[i]] <- data.frame(Subject = sprintf("S%02d", i), Rater = paste0("R", rr),
                            Time = as.integer(tt), Visit = seq_len(k), x = x, y = y,
                            stringsAsFactors = FALSE)
}
sim <- do.call(rbind, pieces)
rownames(sim) <- NULL

# ------------------------------------------------------------------ write + read back
out_csv <- data.frame(Subject = sim$Subject, Rater = sim$Rater,
                      Time = sprintf("%d", sim$Time), Visit = sprintf("%d", sim$Visit),
                      x = sprintf("%.17g", sim$x), y = sprintf("%.17g", sim$y),
                      stringsAsFactors = FALSE)
write.csv(out_csv, csv_path, row.names = FALSE, quote = FALSE)

rb <- read.csv(csv_path, stringsAsFactors = FALSE)
stopifnot(identical(names(rb), c("Subject", "Rater", "Time", "Visit", "x", "y")),
          identical(rb$Subject, sim$Subject), identical(rb$Rater, sim$Rater),
          identical(as.integer(rb$Time), sim$Time), identical(as.integer(rb$Visit), sim$Visit),
          identical(as.numeric(rb$x), sim$x), identical(as.numeric(rb$y), sim$y))

d <- data.frame(
  Subject = factor(rb$Subject, levels = sprintf("S%02d", seq_len(n_subj))),
  Rater = factor(rb$Rater, levels = paste0("R", seq_len(n_rater))),
  Time = as.numeric(rb$Time),
  Visit = as.integer(rb$Visit),
  x = as.numeric(rb$x),
  y = as.numeric(rb$y)
)
d$dummy <- factor(1)
stopifnot(!anyNA(d$Subject), !anyNA(d$Rater), all(table(d$Rater) > 0),
          !is.unsorted(as.integer(d$Subject)),
          all(tapply(d$Time, d$Subject, function(t) !is.unsorted(t, strictly = TRUE))),
          all(tapply(d$Visit, d$Subject, function(t) identical(t, seq_along(t)))))

# ------------------------------------------------------------------ JSON helpers
num <- function(x) {
  x <- as.numeric(x)
  stopifnot(length(x) == 1)
  structure(if (is.finite(x)) sprintf("%.17g", x) else "null", class = "json")
}
numvec <- function(x) {               # named -> object, unnamed -> array
  nm <- names(x)
  if (!is.null(nm)) return(setNames(lapply(as.numeric(x), num), nm))
  lapply(as.numeric(x), num)
}
fmt <- function(x) paste(deparse(x, width.cutoff = 500L), collapse = " ")

# ------------------------------------------------------------------ direct REML
X <- model.matrix(~ x, d)
n <- nrow(X); p <- ncol(X)
Zs <- model.matrix(~ 0 + Subject, d)
Zr <- model.matrix(~ 0 + Rater, d)
ZZs <- tcrossprod(Zs); ZZr <- tcrossprod(Zr)
same_subj <- outer(as.integer(d$Subject), as.integer(d$Subject), "==")
lagT <- abs(outer(d$Time, d$Time, "-"))
lagV <- abs(outer(d$Visit, d$Visit, "-"))
corr_mat <- function(type, rho) {
  R <- switch(type,
              car1 = rho^lagT,
              ar1 = rho^lagV,
              cs = { M <- matrix(rho, n, n); diag(M) <- 1; M },
              none = diag(n))
  R * same_subj
}
reml_direct <- function(s_subj, s_rater, sigma2, type, rho = 0) {
  V <- s_subj * ZZs + s_rater * ZZr + sigma2 * corr_mat(type, rho)
  L <- chol(V)
  Xt <- backsolve(L, X, transpose = TRUE)
  yt <- backsolve(L, d$y, transpose = TRUE)
  XtX <- crossprod(Xt)
  b <- solve(XtX, crossprod(Xt, yt))
  rt <- yt - Xt %*% b
  ll <- -0.5 * (2 * sum(log(diag(L))) + as.numeric(determinant(XtX)$modulus) +
                  sum(rt^2) + (n - p) * log(2 * pi))
  list(logLik = ll, beta = setNames(as.numeric(b), colnames(X)))
}
# unconstrained parametrisation for the independent optimiser
to_nat <- function(th, type) {
  rho <- switch(type, car1 = plogis(th[4]), ar1 = tanh(th[4]),
                cs = { lo <- -1 / (max(table(d$Subject)) - 1); lo + (1 - lo) * plogis(th[4]) },
                none = 0)
  c(exp(th[1:3]), rho)
}
to_unc <- function(nat, type) {
  t4 <- switch(type, car1 = qlogis(nat[4]), ar1 = atanh(nat[4]),
               cs = { lo <- -1 / (max(table(d$Subject)) - 1); qlogis((nat[4] - lo) / (1 - lo)) },
               none = NULL)
  c(log(nat[1:3]), t4)
}
negll <- function(th, type) {
  nat <- to_nat(th, type)
  r <- tryCatch(reml_direct(nat[1], nat[2], nat[3], type, nat[4])$logLik,
                error = function(e) NA_real_)
  if (!is.finite(r)) 1e10 else -r
}
# analytic REML gradient w.r.t. the unconstrained parameters:
#   dl/dtheta_k = -0.5 tr(P dV_k) + 0.5 r'V^-1 dV_k V^-1 r,
#   P = V^-1 - V^-1 X (X'V^-1X)^-1 X'V^-1
grad_direct <- function(th, type) {
  nat <- to_nat(th, type)
  s1 <- nat[1]; s2 <- nat[2]; sg <- nat[3]; rho <- nat[4]
  R <- corr_mat(type, rho)
  V <- s1 * ZZs + s2 * ZZr + sg * R
  Vi <- chol2inv(chol(V))
  ViX <- Vi %*% X
  P <- Vi - ViX %*% solve(crossprod(X, ViX), t(ViX))
  Py <- P %*% d$y                       # = V^-1 r
  dV <- list(s1 * ZZs, s2 * ZZr, sg * R)
  if (type != "none") {
    dR <- switch(type,
                 car1 = ifelse(lagT > 0, lagT * rho^pmax(lagT - 1, 0), 0),
                 ar1 = ifelse(lagV > 0, lagV * rho^pmax(lagV - 1, 0), 0),
                 cs = { M <- matrix(1, n, n); diag(M) <- 0; M }) * same_subj
    drho <- switch(type, car1 = rho * (1 - rho), ar1 = 1 - rho^2,
                   cs = { lo <- -1 / (max(table(d$Subject)) - 1); (rho - lo) * (1 - rho) / (1 - lo) })
    dV[[4]] <- sg * dR * drho
  }
  vapply(dV, function(D) -0.5 * sum(P * D) + 0.5 * as.numeric(crossprod(Py, D %*% Py)), 0)
}
# Newton polish of the direct REML (Hessian = central differences of the
# analytic gradient); not used for CS (singular Hessian along the ridge)
newton_polish <- function(th, type, iters = 30) {
  f <- function(t) negll(t, type)
  for (it in seq_len(iters)) {
    g <- grad_direct(th, type)
    H <- sapply(seq_along(th), function(i) {
      e <- replace(numeric(length(th)), i, 1e-6)
      (grad_direct(th + e, type) - grad_direct(th - e, type)) / 2e-6
    })
    H <- (H + t(H)) / 2
    step <- solve(H, g)                 # H is the Hessian of the log-lik (neg. def.)
    t <- 1; f0 <- f(th); ok <- FALSE
    for (k in 1:30) {
      if (f(th - t * step) <= f0 + 1e-12) { ok <- TRUE; break }
      t <- t / 2
    }
    if (!ok) break
    th <- th - t * step
    if (max(abs(t * step)) < 1e-12) break
  }
  list(par = th, grad = grad_direct(th, type), logLik = -f(th), iterations = it)
}
num_grad <- function(f, th, h = 1e-5) {
  vapply(seq_along(th), function(i) {
    e <- replace(numeric(length(th)), i, h)
    (f(th + e) - f(th - e)) / (2 * h)
  }, 0)
}

# ------------------------------------------------------------------ fits
re_struct <- function() list(dummy = pdBlocked(list(pdIdent(~ 0 + Subject), pdIdent(~ 0 + Rater))))
ctl <- function(opt) {
  if (opt == "nlminb")
    # nlminb's own default rel.tol (1e-10): tighter rel.tol / x.tol make nlminb
    # stop with "singular convergence (7)" at the optimum (an error in lme)
    lmeControl(maxIter = 500, msMaxIter = 500, msMaxEval = 5000, niterEM = 100,
               tolerance = 1e-10, opt = "nlminb")
  else
    lmeControl(maxIter = 500, msMaxIter = 5000, niterEM = 100,
               msTol = 1e-14, tolerance = 1e-10, opt = "optim", reltol = 1e-14)
}

specs <- list(
  crossed_car1 = list(type = "car1", cor = quote(corCAR1(form = ~ Time | dummy/Subject)),
                      par = "Phi", meaning = "cor(e_i, e_j) = Phi^|Time_i - Time_j| within Subject"),
  crossed_ar1_visit = list(type = "ar1", cor = quote(corAR1(form = ~ Visit | dummy/Subject)),
                           par = "Phi", meaning = "cor(e_i, e_j) = Phi^|Visit_i - Visit_j| within Subject (Visit = row position 1..k)"),
  crossed_cs = list(type = "cs", cor = quote(corCompSymm(form = ~ 1 | dummy/Subject)),
                    par = "Rho", meaning = "cor(e_i, e_j) = Rho for i != j within Subject"),
  crossed_none = list(type = "none", cor = NULL, par = NULL,
                      meaning = "independent residuals (baseline)")
)

fit_one <- function(spec, opt) {
  w <- character(0)
  m <- withCallingHandlers(
    tryCatch(
      if (is.null(spec$cor))
        lme(y ~ x, data = d, random = re_struct(), method = "REML", control = ctl(opt))
      else
        lme(y ~ x, data = d, random = re_struct(), correlation = eval(spec$cor),
            method = "REML", control = ctl(opt)),
      error = function(e) e),
    warning = function(cw) { w <<- c(w, conditionMessage(cw)); invokeRestart("muffleWarning") })
  list(fit = m, warnings = w)
}

extract <- function(m) {
  sigma2 <- m$sigma^2
  G <- as.matrix(m$modelStruct$reStruct$dummy) * sigma2   # 36 x 36 random-effects covariance
  s_subj <- G[1, 1]; s_rater <- G[n_subj + 1, n_subj + 1]
  stopifnot(isTRUE(all.equal(unname(diag(G)[1:n_subj]), rep(s_subj, n_subj), tolerance = 1e-12)),
            isTRUE(all.equal(unname(diag(G)[n_subj + 1:n_rater]), rep(s_rater, n_rater), tolerance = 1e-12)),
            max(abs(G[1:n_subj, n_subj + 1:n_rater])) == 0)
  vc <- VarCorr(m)
  vc_var <- suppressWarnings(as.numeric(vc[, "Variance"]))
  vc_sd <- suppressWarnings(as.numeric(vc[, "StdDev"]))
  vc_rows <- rownames(vc)
  chk <- c(subj = vc_var[match("SubjectS01", vc_rows)],
           rater = vc_var[match("RaterR1", vc_rows)],
           resid = vc_var[match("Residual", vc_rows)])
  # VarCorr prints ~7 significant digits
  stopifnot(abs(chk[1] / s_subj - 1) < 1e-5, abs(chk[2] / s_rater - 1) < 1e-5,
            abs(chk[3] / sigma2 - 1) < 1e-5,
            abs(vc_sd[match("SubjectS01", vc_rows)]^2 / s_subj - 1) < 1e-5)
  cs <- m$modelStruct$corStruct
  list(s_subj = s_subj, s_rater = s_rater, sigma2 = sigma2,
       cor_nat = if (is.null(cs)) NULL else coef(cs, unconstrained = FALSE),
       cor_unc = if (is.null(cs)) NULL else coef(cs, unconstrained = TRUE),
       fixef = fixef(m), logLik = as.numeric(logLik(m)),
       df = as.integer(attr(logLik(m), "df")),
       VarCorr_printed = list(SubjectS01 = unname(vc["SubjectS01", ]),
                              RaterR1 = unname(vc["RaterR1", ]),
                              Residual = unname(vc["Residual", ])))
}

models <- list()
store <- list()
for (key in names(specs)) {
  spec <- specs[[key]]
  tries <- lapply(c(nlminb = "nlminb", optim = "optim"), function(o) fit_one(spec, o))
  lls <- vapply(tries, function(t) if (inherits(t$fit, "error")) NA_real_ else as.numeric(logLik(t$fit)), 0)
  if (all(is.na(lls))) stop(key, ": both optimisers failed: ",
                            paste(vapply(tries, function(t) conditionMessage(t$fit), ""), collapse = " | "))
  best <- names(which.max(lls))
  m <- tries[[best]]$fit
  ex <- extract(m)
  other <- setdiff(names(tries), best)
  ex_other <- if (inherits(tries[[other]]$fit, "error")) NULL else extract(tries[[other]]$fit)
  store[[key]] <- list(fit = m, ex = ex)

  # ---- independent checks with the dense direct formula
  rho <- if (is.null(ex$cor_nat)) 0 else as.numeric(ex$cor_nat)
  dir_at <- reml_direct(ex$s_subj, ex$s_rater, ex$sigma2, spec$type, rho)
  th0 <- to_unc(c(ex$s_subj, ex$s_rater, ex$sigma2, rho), spec$type)
  f <- function(th) negll(th, spec$type)
  g <- grad_direct(th0, spec$type)
  g_num <- num_grad(f, th0)
  stopifnot(max(abs(g - g_num)) < 1e-5)
  newt <- if (spec$type == "cs") NULL else newton_polish(th0, spec$type)
  newt_nat <- if (is.null(newt)) NULL else to_nat(newt$par, spec$type)
  pol <- nlminb(th0, f, control = list(rel.tol = 1e-15, x.tol = 1e-14, eval.max = 5000, iter.max = 2000))
  start_default <- to_unc(c(1, 1, 1, if (spec$type == "none") NULL else 0.3), spec$type)
  fresh <- nlminb(start_default, f, control = list(rel.tol = 1e-15, x.tol = 1e-14, eval.max = 5000, iter.max = 2000))
  fresh <- nlminb(fresh$par, f, control = list(rel.tol = 1e-15, x.tol = 1e-14, eval.max = 5000, iter.max = 2000))
  pol_nat <- to_nat(pol$par, spec$type)
  fresh_nat <- to_nat(fresh$par, spec$type)

  corr_obj <- NULL
  if (!is.null(spec$par)) {
    stopifnot(identical(names(ex$cor_nat), spec$par))
    corr_obj <- list(name = spec$par, value = num(ex$cor_nat), unconstrained = num(ex$cor_unc),
                     meaning = spec$meaning)
  }
  call_str <- paste0("lme(y ~ x, data = d, random = list(dummy = pdBlocked(list(pdIdent(~ 0 + Subject), pdIdent(~ 0 + Rater)))), ",
                     if (!is.null(spec$cor)) paste0("correlation = ", fmt(spec$cor), ", ") else "",
                     "method = \"REML\", control = lmeControl(opt = \"", best, "\", ...))")
  models[[key]] <- list(
    call = call_str,
    correlation_form = if (is.null(spec$cor)) NULL else fmt(spec$cor),
    nobs = as.integer(m$dims$N),
    n_subjects = n_subj, n_raters = n_rater,
    method = m$method,
    logLik = num(ex$logLik),
    df = ex$df,
    fixef = numvec(ex$fixef),
    var_subject = num(ex$s_subj),
    var_rater = num(ex$s_rater),
    sigma2 = num(ex$sigma2),
    sd_subject = num(sqrt(ex$s_subj)),
    sd_rater = num(sqrt(ex$s_rater)),
    sigma = num(m$sigma),
    correlation = corr_obj,
    VarCorr_printed = ex$VarCorr_printed,
    convergence = list(
      optimizer_used = best,
      logLik_nlminb = num(lls[["nlminb"]]),
      logLik_optim = num(lls[["optim"]]),
      logLik_abs_diff = num(abs(diff(lls))),
      other_optimizer_params = if (is.null(ex_other)) NULL else list(
        var_subject = num(ex_other$s_subj), var_rater = num(ex_other$s_rater),
        sigma2 = num(ex_other$sigma2),
        correlation = if (is.null(ex_other$cor_nat)) NULL else num(ex_other$cor_nat)),
      warnings = unname(c(tries$nlminb$warnings, tries$optim$warnings)),
      errors = unname(unlist(lapply(tries, function(t) if (inherits(t$fit, "error")) conditionMessage(t$fit))))
    ),
    direct_check = list(
      logLik_direct_at_nlme_estimates = num(dir_at$logLik),
      fixef_direct_at_nlme_estimates = numvec(dir_at$beta),
      grad_unconstrained_at_nlme_estimates = numvec(g),
      grad_note = "analytic REML gradient (checked against central differences)",
      grad_parametrisation = "log(var_subject), log(var_rater), log(sigma2), then logit(Phi) [CAR1] / atanh(Phi) [AR1] / logit((Rho-lo)/(1-lo)), lo=-1/(max n_i-1) [CS]",
      logLik_direct_polished_from_nlme = num(-pol$objective),
      polished_params = numvec(setNames(pol_nat[seq_len(if (spec$type == "none") 3 else 4)],
                                        c("var_subject", "var_rater", "sigma2", if (spec$type != "none") spec$par))),
      newton_polished = if (is.null(newt)) "skipped: Hessian singular along the CS / subject-intercept ridge" else list(
        logLik = num(newt$logLik),
        params = numvec(setNames(newt_nat[seq_len(if (spec$type == "none") 3 else 4)],
                                 c("var_subject", "var_rater", "sigma2", if (spec$type != "none") spec$par))),
        fixef = numvec(reml_direct(newt_nat[1], newt_nat[2], newt_nat[3], spec$type,
                                   if (spec$type == "none") 0 else newt_nat[4])$beta),
        grad_unconstrained = numvec(newt$grad),
        max_rel_diff_vs_nlme = num(max(abs(newt_nat[seq_len(if (spec$type == "none") 3 else 4)] /
          c(ex$s_subj, ex$s_rater, ex$sigma2, if (spec$type != "none") rho) - 1)))),
      logLik_direct_from_default_start = num(-fresh$objective),
      default_start_params = numvec(setNames(fresh_nat[seq_len(if (spec$type == "none") 3 else 4)],
                                             c("var_subject", "var_rater", "sigma2", if (spec$type != "none") spec$par)))
    )
  )
  message(sprintf("%-18s best=%-6s logLik nlminb=%.12f optim=%.12f direct=%.12f polished=%.12f fresh=%.12f newton=%s |g|=%.2g",
                  key, best, lls[["nlminb"]], lls[["optim"]], dir_at$logLik, -pol$objective, -fresh$objective,
                  if (is.null(newt)) "-" else sprintf("%.12f", newt$logLik),
                  if (is.null(newt)) NA else max(abs(newt$grad))))
}

# ---- extra checks
# AR1 with position form (~ 1 | dummy/Subject) must equal the Visit form (rows sorted by Time)
m_ar1_pos <- lme(y ~ x, data = d, random = re_struct(),
                 correlation = corAR1(form = ~ 1 | dummy/Subject), method = "REML", control = ctl("nlminb"))
# CS non-identifiability: residual CS within Subject + Subject intercept only identify
#   nugget = sigma2 (1 - Rho) and shared = var_subject + sigma2 Rho
ex_cs <- store$crossed_cs$ex; ex_none <- store$crossed_none$ex
cs_invariants <- list(
  nugget_cs = num(ex_cs$sigma2 * (1 - ex_cs$cor_nat)),
  nugget_none = num(ex_none$sigma2),
  shared_within_subject_cs = num(ex_cs$s_subj + ex_cs$sigma2 * ex_cs$cor_nat),
  shared_within_subject_none = num(ex_none$s_subj),
  var_rater_cs = num(ex_cs$s_rater), var_rater_none = num(ex_none$s_rater),
  logLik_cs = num(ex_cs$logLik), logLik_none = num(ex_none$logLik)
)
# the ridge: any Rho in (lo, shared/(shared+nugget)] gives the same logLik
ridge_ll <- sapply(c(-0.1, 0, 0.2, 0.4), function(r) {
  a <- ex_none$sigma2; b <- ex_none$s_subj
  reml_direct(b - a * r / (1 - r), ex_none$s_rater, a / (1 - r), "cs", r)$logLik
})
# wrong correlation grouping
bad_form <- tryCatch({
  lme(y ~ x, data = d, random = re_struct(), correlation = corCAR1(form = ~ Time | Subject),
      method = "REML"); "accepted"
}, error = function(e) conditionMessage(e))

checks <- list(
  ar1_position_form_logLik = num(logLik(m_ar1_pos)),
  ar1_position_form_Phi = num(coef(m_ar1_pos$modelStruct$corStruct, unconstrained = FALSE)),
  ar1_position_form_note = "corAR1(form = ~ 1 | dummy/Subject) (row position) vs ~ Visit | dummy/Subject: same model because rows are sorted by Time within Subject and Visit = 1..k",
  cs_identifiability = c(cs_invariants, list(
    ridge_Rho = lapply(c(-0.1, 0, 0.2, 0.4), num),
    ridge_logLik_direct = lapply(ridge_ll, num),
    note = "Residual compound symmetry within Subject is confounded with the Subject random intercept: V only depends on nugget = sigma2*(1-Rho) and shared = var_subject + sigma2*Rho (plus var_rater). The REML surface is flat along a ridge, so Rho / sigma2 / var_subject of crossed_cs are NOT unique (whatever the optimiser stopped at); logLik, fixef, var_rater and the two invariants are unique and equal to crossed_none's.")),
  correlation_grouping_Time_bar_Subject_error = bad_form,
  car1_vs_ar1_logLik_differ = num(store$crossed_car1$ex$logLik - store$crossed_ar1_visit$ex$logLik)
)

desc <- paste(
  "Synthetic crossed-random-effects data with a CAR(1) residual within Subject and REML reference fits from R nlme.",
  "Data (crossed_ar1.csv): set.seed(20261207), default RNG (Mersenne-Twister/Inversion/Rejection);",
  "30 subjects S01..S30, 6 raters R1..R6; u <- rnorm(30, 0, 2); v <- rnorm(6, 0, 1); then per subject:",
  "k <- sample(4:9, 1); Time <- sort(sample(0:15, k)); rater per row sample(1:6, 1); x <- rnorm(k); z <- rnorm(k);",
  "e_1 = 1.2 z_1, e_j = 0.7^dt e_{j-1} + sqrt(1.44 (1 - 0.7^(2 dt))) z_j (dt = Time gap); y = 10 + 0.5 x + u_subject + v_rater + e;",
  "Visit = 1..k within subject; rows ordered by Subject then Time; x, y written with %.17g.",
  "Fits on the CSV read back: Subject/Rater factors (levels S01..S30, R1..R6), dummy <- factor(1);",
  "lme(y ~ x, random = list(dummy = pdBlocked(list(pdIdent(~ 0 + Subject), pdIdent(~ 0 + Rater)))), correlation = <see model>, method = 'REML'),",
  "correlation grouping written dummy/Subject (nlme requires the correlation grouping to begin with the random grouping 'dummy'; it means correlated within Subject, independent across subjects).",
  "Each model fitted with lmeControl(opt = 'nlminb') and lmeControl(opt = 'optim') (nlminb: msMaxIter 500, msMaxEval 5000, niterEM 100, nlminb default rel.tol; optim/BFGS: msMaxIter 5000, niterEM 100, msTol = reltol = 1e-14); the higher logLik is stored.",
  "logLik is nlme's REML log-likelihood: -0.5 [log|V| + log|X'V^-1X| + r'V^-1r + (n-p) log(2 pi)] (no +0.5 log|X'X| term; same convention as lme4), verified by direct_check.",
  "var_subject, var_rater, sigma2 are variances (not sds); correlation.value is coef(corStruct, unconstrained = FALSE).",
  "direct_check: the same REML formula evaluated densely in R at nlme's estimates (logLik_direct_at_nlme_estimates), its analytic gradient there, nlminb re-optimisations, and newton_polished = Newton iterations on the analytic gradient to |grad| ~ 1e-13 (the exact optimum; nlme's own variance parameters agree with it to ~1e-6 relative, see max_rel_diff_vs_nlme).",
  "crossed_cs is not identifiable beyond logLik / fixef / var_rater / sigma2*(1-Rho) / var_subject + sigma2*Rho (see checks.cs_identifiability)."
)

out <- list(
  description = desc,
  R_version = R.version.string,
  nlme_version = as.character(packageVersion("nlme")),
  RNGkind = RNGkind(),
  seed = 20261207L,
  data = list(csv = "tests/data/correlation/crossed_ar1.csv",
              columns = c("Subject", "Rater", "Time", "Visit", "x", "y"),
              nobs = nrow(d),
              visits_per_subject = setNames(as.list(as.integer(table(d$Subject))), levels(d$Subject)),
              rows_per_rater = setNames(as.list(as.integer(table(d$Rater))), levels(d$Rater)),
              true_values = list(beta = numvec(c("(Intercept)" = 10, x = 0.5)),
                                 var_subject = num(4), var_rater = num(1),
                                 sigma2 = num(1.44), car1_phi = num(0.7)),
              simulated_u = numvec(setNames(u, sprintf("S%02d", seq_len(n_subj)))),
              simulated_v = numvec(setNames(v, paste0("R", seq_len(n_rater))))),
  models = models,
  checks = checks
)
writeLines(toJSON(out, auto_unbox = TRUE, pretty = TRUE, json_verbatim = TRUE,
                  digits = NA, null = "null", na = "null"), json_path)
message("wrote ", csv_path, "\nwrote ", json_path)
