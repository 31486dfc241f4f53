"""The experiment pipeline: train under noise → SGLD moments (and EM) → pruning curves → report.

Stages, each checkpointed in ``OUT/checkpoints/STAGE.pkl`` so an interrupted run resumes from
its last finished stage (a checkpoint made under other settings of the config sections that
stage depends on is ignored and the stage runs again):

1. ``train``: the MLP trained under the configured noise; its test metric by weight scaling.
   A learned noise (variational dropout) is trained with the weights on the negative ELBO; the
   later stages get its mean network, and the stage records the mean network's test metric,
   the Monte Carlo predictive, and the share removed by the rule log α ≥ 3 with its metric.
2. ``reference``: the same MLP trained without noise (for the mean-against-std picture).
3. ``sgld``: posterior moments of the weight-scaled network's weights under the GSM prior, by
   SGLD chains; with EM enabled, every iteration is an SGLD E-step followed by the M-step.
4. ``sgld_reference``: SGLD moments of the noise-free network.
5. ``prune``: test metric against the fraction of weights removed, for every rule, from the
   posterior mean, in one vmapped evaluation per rule; breakpoints at the tolerance. With a
   learned noise also the ``log_alpha`` rule (−log α) on the mean network.
6. ``finetune``: at a few fractions, the pruned network retrained with its mask held fixed.
7. ``soft_target``: students of equal weight count trained on the teacher's softened outputs.
8. the report: ``results.json``, ``config.yaml`` (the config as run), PNG plots, a table.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesnoise import data as bdata
from bayesnoise import (
    distill,
    em,
    gsm,
    inference,
    laplace,
    moments,
    prune,
    train,
)
from bayesnoise import io as bio
from bayesnoise import nn as bnn
from bayesnoise.pipeline import config as bconfig
from bayesnoise.pipeline import report, runfolder
from bayesnoise.pipeline.checkpoints import Checkpoints
from bayesnoise.pipeline.checkpoints import staged as _staged
from bayesnoise.pipeline.runfolder import RunError, UsageError
from bayesnoise.sgld import psgld, sgld

__all__ = ["run", "STAGES"]

_log = logging.getLogger("bayesnoise")

STAGES = ("train", "reference", "sgld", "sgld_reference", "prune", "finetune", "soft_target")


# ------------------------------------------------------------------------------ the model


class _Task:
    """Model, data and metric of one config, shared by the stages."""

    def __init__(self, cfg: bconfig.Config):
        self.cfg = cfg
        ds = _load_data(cfg)
        self.ds = ds
        self.classification = ds.task == "classification"
        to_dense = lambda a: np.asarray(a.toarray() if hasattr(a, "toarray") else a, np.float32)
        self.x_train, self.x_test = (
            jnp.asarray(to_dense(ds.x_train)),
            jnp.asarray(to_dense(ds.x_test)),
        )
        self.y_train, self.y_test = jnp.asarray(ds.y_train), jnp.asarray(ds.y_test)
        out_dim = ds.num_classes if self.classification else 1
        self.sizes = (int(self.x_train.shape[1]), *cfg.model.hidden_sizes, out_dim)
        dtype = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
        self.model = bnn.MLP(
            tuple(cfg.model.hidden_sizes) + (out_dim,), cfg.model.activation_fn, dtype
        )
        self.noise = bconfig.build_noise(cfg)  # for a learned noise: model -> LearnedNoise
        self.learned = cfg.noise.kind == "learned"
        self.y_std = float(getattr(ds, "y_std", 1.0))
        n = len(self.x_train)
        for key, size in (
            ("train.batch_size", cfg.train.batch_size),
            ("sgld.batch_size", cfg.sgld.batch_size),
        ):
            if size is not None and size > n:
                raise UsageError(
                    f"{key}: got {size}, larger than the {n} training examples of "
                    f"{ds.name}; allowed: 1 to {n}."
                )

    def init(self, key):
        return self.model.init(key, self.x_train[:1])

    def metric(self, params) -> jax.Array:
        """Test error, or test RMSE in the target's original units."""
        out = self.model.apply(params, self.x_test)
        if self.classification:
            return jnp.mean(jnp.argmax(out, -1) != self.y_test)
        return jnp.sqrt(jnp.mean((out[:, 0] - self.y_test) ** 2)) * self.y_std

    def loss(self, apply):
        """The training loss of ``apply(params, x, key)``: cross-entropy or squared error."""
        if self.classification:
            return train.classification_loss(apply)
        return train.regression_loss(apply)

    def log_likelihood(self, params, x, y):
        """Per-example log p(y | x, params): categorical, or Gaussian with unit variance on the
        standardised target."""
        out = self.model.apply(params, x)
        if self.classification:
            return train.categorical_log_likelihood(out, y)
        return -0.5 * (out[:, 0] - y) ** 2 - 0.5 * jnp.log(2 * jnp.pi)


def _load_data(cfg: bconfig.Config):
    """The config's data set; a missing or unreadable file is a failed run."""
    try:
        return cfg.data.load()
    except (OSError, bdata.DataError) as e:
        raise RunError(f"cannot load the data set {cfg.data.name}: {e}") from e


def _optimizer(tc: bconfig.TrainConfig, steps: int) -> optax.GradientTransformation:
    lr = tc.learning_rate
    schedule = optax.cosine_decay_schedule(lr, steps, alpha=0.01) if tc.schedule == "cosine" else lr
    builders = {
        "adam": lambda: optax.adam(schedule),
        "adamw": lambda: optax.adamw(schedule),
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=0.9),
        "rmsprop": lambda: optax.rmsprop(schedule),
    }
    return builders[tc.optimizer]()


def _fit(task: _Task, key, params, loss_fn, targets, epochs: int, progress: bool, eval_fn=None):
    """``bn.train.fit`` on the training inputs with the config's optimizer and batch size."""
    tc = task.cfg.train
    steps = epochs * (len(task.x_train) // tc.batch_size)
    return train.fit(
        key,
        params,
        loss_fn,
        _optimizer(tc, steps),
        task.x_train,
        targets,
        epochs=epochs,
        batch_size=tc.batch_size,
        eval_fn=eval_fn,
        progress=progress,
    )


def _fit_labels(task: _Task, key, params, loss_fn, epochs: int, progress: bool, net=None):
    """``_fit`` on the training labels, with the test metric of ``net(params)`` (default: of
    ``params``) in the history of every epoch."""
    net = net or (lambda p: p)
    eval_fn = lambda p: {"test_metric": task.metric(net(p))}
    return _fit(task, key, params, loss_fn, task.y_train, epochs, progress, eval_fn=eval_fn)


def _train(task: _Task, noise, key, progress: bool, epochs: int | None = None):
    tc = task.cfg.train
    epochs = epochs or tc.epochs
    params = task.init(jax.random.fold_in(key, 0))
    if noise is None:
        apply = lambda p, x, k: task.model.apply(p, x)
    else:
        noisy = bnn.noisy_apply(task.model, noise)
        apply = lambda p, x, k: noisy(p, x, rngs={"noise": k})
    loss_fn = task.loss(apply)
    scaled = (lambda p: inference.weight_scale(p, noise)) if noise is not None else (lambda p: p)
    res = _fit_labels(task, jax.random.fold_in(key, 1), params, loss_fn, epochs, progress, scaled)
    final = scaled(res.params)
    out = {"params": final, "history": res.history, "metric": float(task.metric(final))}
    if noise is not None and task.classification:
        # Monte Carlo dropout's predictive, for the calibration table beside the posterior's
        fn = inference.sampler(bnn.noisy_apply(task.model, noise), res.params)
        out["mc_dropout"] = _mc_predictive(task, jax.random.fold_in(key, 2), fn)
    return out


_LOG_ALPHA_THRESHOLD = 3.0  # the sparse variational dropout rule: remove a weight if log α >= 3


def _train_learned(task: _Task, key, progress: bool):
    """Variational dropout: the weights and their noise trained on the negative ELBO per example
    (the KL weighted by ``noise.kl_weight``, ramped in over ``noise.warmup_epochs``)."""
    nc, tc = task.cfg.noise, task.cfg.train
    vd = task.noise(task.model)
    variables = vd.init(jax.random.fold_in(key, 0), task.x_train[:1])
    loss_fn = train.variational_loss(
        lambda p, x, k: vd.apply(p, x, rngs={"noise": k}),
        len(task.x_train),
        kl_weight=nc.kl_weight,
        warmup_steps=nc.warmup_epochs * (len(task.x_train) // tc.batch_size),
        likelihood="categorical" if task.classification else "gaussian",
    )
    # the test metric of the mean network (task.metric ignores the noise leaves)
    res = _fit_labels(task, jax.random.fold_in(key, 1), variables, loss_fn, tc.epochs, progress)
    variables, mean = res.params, inference.mean_params(res.params)
    metric = float(task.metric(mean))
    kept = prune.log_alpha_threshold(variables, _LOG_ALPHA_THRESHOLD)
    fn = inference.sampler(vd.apply, variables)
    figures = {
        "per": nc.per,
        "threshold": {
            "log_alpha": _LOG_ALPHA_THRESHOLD,
            "fraction_removed": float(kept.fraction_removed),
            "metric": float(task.metric(prune.apply(variables, kept.mask))),
        },
        "mean_metric": metric,
        "mc": _mc_predictive(task, jax.random.fold_in(key, 2), fn),
    }
    return {
        "params": mean,  # the trained network of the later stages
        "variables": variables,  # with the noise: log_alpha or log_sigma2 beside each kernel
        "history": res.history,
        "metric": metric,
        "learned_noise": figures,
    }


def _mc_predictive(task: _Task, key, apply_fn) -> dict:
    """The Monte Carlo predictive over ``eval.mc_samples`` draws of ``apply_fn(key, x)`` on the
    test set: error, NLL and ECE of the mean class probabilities, or the mean prediction's RMSE."""
    s = task.cfg.eval.mc_samples
    if task.classification:
        probs = inference.mc_predict(key, apply_fn, task.x_test, s)
        return _calibration(np.asarray(probs), task.y_test)
    pred = np.asarray(inference.mc_logits(key, apply_fn, task.x_test, s)).mean(0)[:, 0]
    return {"rmse": float(np.sqrt(np.mean((pred - np.asarray(task.y_test)) ** 2)) * task.y_std)}


def _calibration(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> dict:
    """Test error, negative log-likelihood and expected calibration error of class probabilities
    (ECE: Σ_bins (n_b / n) |accuracy_b − confidence_b| over equal-width confidence bins)."""
    probs = np.asarray(probs, np.float64)
    y = np.asarray(y)
    pred, conf = probs.argmax(-1), probs.max(-1)
    nll = float(-np.mean(np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12))))
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == y[inside]).mean() - conf[inside].mean())
    return {"error": float(np.mean(pred != y)), "nll": nll, "ece": float(ece)}


def _prior_recovery(task: _Task, mean, variance, h) -> dict | None:
    """For inputs that are zero in every training example: their first-layer rows' variance
    over the prior variance σ0²λ², and their mean |μ| in prior standard deviations."""
    x = np.asarray(task.x_train).reshape(len(task.x_train), -1)
    dead = np.where(np.all(x == 0, axis=0))[0]
    if dead.size == 0:
        return None
    prior_var = gsm.prior_variance(mean, h)
    for m, v, pv, (_, axis) in zip(
        jax.tree.leaves(mean), jax.tree.leaves(variance), jax.tree.leaves(prior_var), h.axes
    ):
        if axis is None or m.ndim != 2 or m.shape[axis] != x.shape[1]:
            continue
        m, v, pv = (np.moveaxis(np.asarray(a), axis, 0)[dead] for a in (m, v, pv))
        return {
            "inputs": int(dead.size),
            "variance_over_prior": float(np.mean(v / pv)),
            "mean_abs_over_prior_sd": float(np.mean(np.abs(m) / np.sqrt(pv))),
        }
    return None


def _sgld(task: _Task, params, key, progress: bool, use_em: bool):
    sc, ec = task.cfg.sgld, task.cfg.em
    transform = psgld if sc.method == "psgld" else sgld
    hyperprior = bconfig.build_hyperprior(ec) if use_em else None
    iterations = ec.iterations if use_em else 0
    settings = sc.run_settings()
    if task.classification:
        predict = lambda p, x: jax.nn.softmax(task.model.apply(p, x))
    else:
        predict = lambda p, x: task.model.apply(p, x)

    def report(record: dict) -> None:
        if use_em:
            _log.info(
                "[em] iteration %d: metric at the posterior mean %.4f, log evidence %s, "
                "%d rows pruned",
                record["iteration"],
                record["metric"],
                "n/a" if record["log_evidence"] is None else f"{record['log_evidence']:.1f}",
                record["pruned"],
            )

    fitted = em.fit(
        key,
        params,
        task.log_likelihood,
        (task.x_train, task.y_train),
        iterations=iterations,
        sigma0=ec.sigma0,
        hyperprior=hyperprior,
        **(ec.fit_settings() if use_em else {"method": "sgld"}),
        eval_fn=task.metric,
        callback=report,
        transform=transform,
        progress=progress,
        predict=predict,
        predict_inputs=task.x_test,
        **settings,
    )
    res, h = fitted.result, fitted.hierarchy
    mean, variance = moments.mean(res.moments), moments.variance(res.moments)
    hist = fitted.history
    records = [
        {
            "iteration": hist["iteration"][i],
            "metric_at_mean": hist["metric"][i],
            "log_evidence": hist["log_evidence"][i],
            "pruned_rows": hist["pruned"][i],
            "penalty_eq14": hist["penalty_eq14"][i],
            "train_log_likelihood": hist["log_likelihood"][i],
            "scales_mean": hist["scales_mean"][i],
            "converged": hist["converged"][i],
            **({"q": hist["q"][i]} if hist["q"][i] is not None else {}),
        }
        for i in range(len(hist["iteration"]))
    ]
    diagnostics = {
        k: v for k, v in res.settings.items() if k != "preconditioner" and not callable(v)
    }
    diagnostics["converged"] = bool(res.converged)
    diagnostics["num_steps"] = int(res.num_steps)
    recovery = _prior_recovery(task, mean, variance, h)
    if recovery is not None:
        diagnostics["prior_recovery"] = recovery
    predictive = {}
    if task.classification and res.predictive is not None:
        predictive["bma"] = _calibration(np.asarray(res.predictive), task.y_test)
        predictive["posterior_mean"] = _calibration(
            np.asarray(jax.nn.softmax(task.model.apply(mean, task.x_test))), task.y_test
        )
    elif res.predictive is not None:
        rmse = np.sqrt(np.mean((np.asarray(res.predictive)[:, 0] - task.y_test) ** 2))
        predictive["bma"] = {"rmse": float(rmse * task.y_std)}
        predictive["posterior_mean"] = {"rmse": float(task.metric(mean))}
    # the Laplace posterior at a mode of the prior it is taken under: the trained network under
    # λ = 1, or EM's mode under the learned scales (the trained network's weights in the rows
    # that EM switched off are far outside that prior)
    centre = params if fitted.mode is None else fitted.mode
    lap = laplace.posterior(
        centre,
        h,
        task.log_likelihood,
        (task.x_train, task.y_train),
        temperature=max(sc.temperature, 1e-8),
        key=jax.random.fold_in(key, 1000),
        ggn=None if fitted.laplace is None else fitted.laplace.ggn,  # EM's, at the same mode
    )
    return {
        "laplace_mean": centre,
        "laplace_std": jax.tree.map(jnp.sqrt, lap.variance),
        "laplace_log_evidence": float(lap.log_evidence),
        "mean": mean,
        "std": moments.std(res.moments),
        "chain_mean": jax.vmap(moments.mean)(res.chain_moments),
        "chain_std": jax.vmap(moments.std)(res.chain_moments),
        "rhat": np.asarray(res.rhat),
        "ess": np.asarray(res.ess),
        "diagnostics": diagnostics,
        "predictive": predictive,
        "scales": h.scales,
        "em": records if use_em else [],
    }


_RULES = {
    "snr": lambda m, s: prune.snr(m, s),
    "spr": lambda m, s: prune.spr(m, s),
    "magnitude": lambda m, s: prune.magnitude(m),
}


def _rule_curves(task: _Task, mean, std, fractions, unpruned, batched: bool = False):
    """Every rule's curve and breakpoint; with ``batched``, one row per chain (leading axis)."""
    curves, breakpoints = {}, {}
    for rule in task.cfg.prune.rules:
        score = jax.vmap(_RULES[rule]) if batched else _RULES[rule]
        curves[rule], breakpoints[rule] = _curve(
            task, mean, score(mean, std), fractions, unpruned, batched
        )
    return curves, breakpoints


def _curve(task: _Task, params, scores, fractions, unpruned, batched: bool = False):
    """One rule's curve, ``[[fraction, metric], ...]``, and its breakpoint; with ``batched``,
    a row of metrics and a breakpoint per chain."""
    pc, ec = task.cfg.prune, task.cfg.eval
    values = prune.curve(
        task.metric,
        params,
        scores,
        fractions,
        pc.scope,
        include_biases=pc.include_biases,
        batched=batched,
    )
    values = np.asarray(values, np.float64)
    rows = zip(np.atleast_2d(values), np.atleast_1d(unpruned))
    found = [
        float(prune.breakpoint_fraction(fractions, v, u, ec.tolerance, task.cfg.relative_tolerance))
        for v, u in rows
    ]
    if batched:
        return values.tolist(), found
    return [[float(f), float(v)] for f, v in zip(fractions, values)], found[0]


def _pruning_moments(task: _Task, post) -> tuple[Any, Any]:
    """(mean, std) the pruning scores read: the Laplace posterior at the trained network, or the
    chains' moments (``prune.moments``)."""
    if task.cfg.prune.moments == "laplace" and "laplace_std" in post:
        return post["laplace_mean"], post["laplace_std"]
    return post["mean"], post["std"]


def _prune(task: _Task, post, variables=None):
    """The rules' curves from the pruning moments; given a learned noise's ``variables``, also
    the ``log_alpha`` rule's, on its mean network (``task.metric`` ignores the noise leaves, and
    the scores are None there and at the biases, which it keeps whole)."""
    fractions = np.asarray(task.cfg.prune.fraction_grid(), np.float32)
    mean, std = _pruning_moments(task, post)
    unpruned = float(task.metric(mean))
    curves, breakpoints = _rule_curves(task, mean, std, fractions, unpruned)
    if variables is not None:
        curves["log_alpha"], breakpoints["log_alpha"] = _curve(
            task, variables, prune.log_alpha(variables), fractions, float(task.metric(variables))
        )
    out = {"unpruned": unpruned, "curves": curves, "breakpoints": breakpoints, "per_chain": {}}
    out["moments"] = task.cfg.prune.moments if "laplace_std" in post else "sgld"
    cm = post.get("chain_mean")
    if out["moments"] == "sgld" and cm is not None and jax.tree.leaves(cm)[0].shape[0] > 1:
        # every chain's own moments, all chains in one batched evaluation: the spread
        chain_unpruned = np.asarray(jax.vmap(task.metric)(cm), np.float64)
        c_curves, c_breakpoints = _rule_curves(
            task, cm, post["chain_std"], fractions, chain_unpruned, batched=True
        )
        out["per_chain"] = {
            "unpruned": chain_unpruned.tolist(),
            "curves": c_curves,
            "breakpoints": c_breakpoints,
        }
    return out


def _finetune(task: _Task, post, key, progress: bool):
    """One-shot pruning then retraining the kept weights with the mask held fixed."""
    pc, tc = task.cfg.prune, task.cfg.train
    fractions = [f for f in (0.5, 0.75, 0.9, 0.95) if f <= max(pc.fraction_grid())]
    mean, std = _pruning_moments(task, post)
    loss_fn = task.loss(lambda p, x, k: task.model.apply(p, x))
    steps = pc.finetune_epochs * (len(task.x_train) // tc.batch_size)
    lr = pc.finetune_learning_rate or tc.learning_rate
    curves = {}
    for rule in pc.rules:
        scores = _RULES[rule](mean, std)
        points = []
        for f in fractions:
            mask = prune.mask(scores, f, pc.scope, include_biases=pc.include_biases)
            opt = optax.chain(
                optax.adam(optax.cosine_decay_schedule(lr, steps)),
                prune.masked_updates(mask),
            )
            res = train.fit(
                jax.random.fold_in(key, int(1000 * f)),
                prune.apply(mean, mask),
                loss_fn,
                opt,
                task.x_train,
                task.y_train,
                epochs=pc.finetune_epochs,
                batch_size=tc.batch_size,
                progress=progress,
            )
            points.append([f, float(task.metric(res.params))])
        curves[rule] = points
    return {"curves": curves}


def _soft_target(task: _Task, teacher, key, progress: bool):
    sc = task.cfg.prune.soft_target
    tc = task.cfg.train
    fractions = [
        f for f in (0.5, 0.75, 0.9, 0.95, 0.98) if f <= max(task.cfg.prune.fraction_grid())
    ]
    teacher_logits = task.model.apply(teacher, task.x_train)
    total = distill.weight_count(task.sizes)
    idx = jnp.arange(len(task.x_train))
    points = []
    for f in fractions:
        sizes = distill.student_sizes(task.sizes, max(1, round((1 - f) * total)))
        student = bnn.MLP(tuple(sizes[1:]), task.cfg.model.activation_fn)
        params = student.init(jax.random.fold_in(key, int(f * 1000)), task.x_train[:1])

        def loss_fn(p, x, i, k, student=student):
            logits = student.apply(p, x)
            labels = task.y_train[i] if sc.alpha > 0 else None
            loss = distill.soft_target_loss(
                logits, teacher_logits[i], labels, temperature=sc.temperature, alpha=sc.alpha
            )
            return loss, {}

        epochs = sc.epochs or tc.epochs
        res = _fit(task, jax.random.fold_in(key, 7), params, loss_fn, idx, epochs, progress)
        out = student.apply(res.params, task.x_test)
        err = float(jnp.mean(jnp.argmax(out, -1) != task.y_test))
        points.append([f, err, list(sizes)])
    return {"points": points}


def run(
    cfg: bconfig.Config,
    out: str | Path | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Runs the whole pipeline for a config and writes its report into ``out``.

    Returns:
        the results dictionary written to ``out/results.json``.
    """
    files = ("results.json", "config.yaml", *(f"checkpoints/{s}.msgpack" for s in STAGES))
    out = runfolder.prepare(out or cfg.out or f"runs/{cfg.name}", files=files)
    with runfolder.lock(out):
        return _run(cfg, out, resume, progress)


def _advice(cfg: bconfig.Config, stage: str) -> str:
    """What to change when ``stage`` diverged."""
    if stage.startswith("sgld"):
        return (
            f"Lower sgld.step_size (now {cfg.sgld.step_size}), or set it to auto (the "
            f"curvature-based steps)."
        )
    return f"Lower train.learning_rate (now {cfg.train.learning_rate:g})."


def _check_converged(cfg: bconfig.Config, post: dict) -> None:
    """Stops before pruning when the chains did not converge (their moments, the scales EM
    learned from them and the posterior predictive would be reported as if they had), unless
    ``eval.allow_unconverged``."""
    diag = post.get("diagnostics", {})
    if diag.get("converged", True) or cfg.eval.allow_unconverged:
        return
    rhat = np.asarray(post.get("rhat", np.zeros(0)), np.float64)
    ess = np.asarray(post.get("ess", np.zeros(0)), np.float64)
    figures = (
        f"max split R-hat {np.max(rhat):.3g} (allowed <= {cfg.sgld.rhat_threshold:g}), min ESS "
        f"{np.min(ess):.3g} (allowed >= {cfg.sgld.ess_threshold:g})"
        if rhat.size and ess.size
        else "no diagnostics"
    )
    auto = (
        "" if cfg.sgld.step_size == "auto" else f", sgld.step_size: auto (now {cfg.sgld.step_size})"
    )
    raise RunError(
        f"[prune] the SGLD chains did not converge ({figures}): not pruning. Change "
        f"sgld.max_steps (now {cfg.sgld.max_steps}){auto} or sgld.chains, or go on anyway with "
        f"--set eval.allow_unconverged=true; rerunning resumes from the finished stages."
    )


def _check_trained(task: _Task, trained: dict, stage: str) -> None:
    """Stops when the trained network is no better than a constant guess on the test set
    (the majority class, or the training mean): training that ran away but stayed finite."""
    y_train, y_test = np.asarray(task.y_train), np.asarray(task.y_test)
    if task.classification:
        guess = float(np.mean(y_test != np.bincount(y_train).argmax()))
        what = f"test error {trained['metric']:.4g} against {guess:.4g} for the majority class"
    else:
        guess = float(np.sqrt(np.mean((y_test - y_train.mean()) ** 2)) * task.y_std)
        what = f"test RMSE {trained['metric']:.4g} against {guess:.4g} for the training mean"
    if not trained["metric"] < guess:
        raise RunError(
            f"[{stage}] training failed: {what}. Lower train.learning_rate (now "
            f"{task.cfg.train.learning_rate:g}) or train longer (train.epochs, now "
            f"{task.cfg.train.epochs})."
        )


def to_json(results: dict) -> str:
    """``results`` as strict JSON: a NaN or infinite number becomes null, with a warning naming
    where (JSON has no NaN)."""
    replaced: list[str] = []

    def clean(x, path):
        if isinstance(x, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, (float, np.floating)) and not np.isfinite(x):
            replaced.append(path)
            return None
        if isinstance(x, np.generic):
            return x.item()
        return x

    text = json.dumps(clean(results, ""), indent=2, allow_nan=False)
    if replaced:
        _log.warning(
            "results: %d numbers were NaN or inf and are written as null: %s",
            len(replaced),
            ", ".join(replaced[:8]) + (" ..." if len(replaced) > 8 else ""),
        )
    return text


def _run(cfg: bconfig.Config, out: Path, resume: bool, progress: bool) -> dict:
    cfg_dict = cfg.to_dict()
    bio.write_text(out / "config.yaml", cfg.to_yaml())
    ckpt = Checkpoints(out, cfg_dict, resume)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    task = _Task(cfg)
    timings["data"] = round(time.perf_counter() - t0, 2)
    key = jax.random.key(cfg.train.seed)

    def staged(stage: str, fn):
        try:
            return _staged(ckpt, timings, stage, fn)
        except FloatingPointError as e:  # train.DivergenceError, sampling.DivergenceError
            raise RunError(f"[{stage}] {e} {_advice(cfg, stage)}") from e

    if task.learned:
        train_stage = lambda: _train_learned(task, jax.random.fold_in(key, 1), progress)
    else:
        train_stage = lambda: _train(task, task.noise, jax.random.fold_in(key, 1), progress)
    trained = staged("train", train_stage)
    _check_trained(task, trained, "train")
    reference = staged(
        "reference", lambda: _train(task, None, jax.random.fold_in(key, 2), progress)
    )
    _check_trained(task, reference, "reference")
    post = staged(
        "sgld",
        lambda: _sgld(
            task, trained["params"], jax.random.fold_in(key, 3), progress, cfg.em.enabled
        ),
    )
    ref_post = staged(
        "sgld_reference",
        lambda: _sgld(task, reference["params"], jax.random.fold_in(key, 4), progress, False),
    )
    _check_converged(cfg, post)
    pruned = staged("prune", lambda: _prune(task, post, trained.get("variables")))
    tuned = None
    if cfg.prune.finetune_epochs > 0:
        tuned = staged(
            "finetune",
            lambda: _finetune(task, post, jax.random.fold_in(key, 6), progress),
        )
    soft = None
    if cfg.prune.soft_target.enabled and task.classification:
        soft = staged(
            "soft_target",
            lambda: _soft_target(
                task, _pruning_moments(task, post)[0], jax.random.fold_in(key, 5), progress
            ),
        )

    results = {
        "config": cfg_dict,
        "dataset": task.ds.name,
        "metric": cfg.metric,
        "unpruned": pruned["unpruned"],
        "trained_metric": trained["metric"],
        "reference_metric": reference["metric"],
        "curves": pruned["curves"],
        "breakpoints": pruned["breakpoints"],
        "per_chain": pruned.get("per_chain", {}),
        "tolerance": {"value": cfg.eval.tolerance, "relative": cfg.relative_tolerance},
        "sgld": {
            "rhat_max": float(np.nanmax(post["rhat"])),
            "ess_min": float(np.nanmin(post["ess"])),
            **post.get("diagnostics", {}),
        },
        "pruning_moments": pruned.get("moments", "sgld"),
        "laplace_log_evidence": post.get("laplace_log_evidence"),
        "predictive": {
            **post.get("predictive", {}),
            **({"mc_dropout": trained["mc_dropout"]} if "mc_dropout" in trained else {}),
        },
        "learned_noise": trained.get("learned_noise"),
        "em": post["em"],
        **({"em_settings": cfg.em.fit_settings()} if cfg.em.enabled else {}),
        "soft_target": soft["points"] if soft else [],
        "finetuned": tuned["curves"] if tuned else {},
        "timings": timings,
    }
    results["plots"] = report.plots(
        out, task, results, post, ref_post, learned=trained.get("variables")
    )
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 2)
    bio.write_text(out / "results.json", to_json(results))
    _log.info("%s", report.table(results))
    _log.info("results: %s", out / "results.json")
    _log.info("plots:   %s", ", ".join(results["plots"]))
    return results
