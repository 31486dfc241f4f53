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
   learned noise also the ``log_alpha`` rule (−log α) on the mean network. Every choice of a
   fraction is read on the validation split (``data.validation_fraction``) and its metric on
   the test set.
6. ``finetune``: at a few fractions, the pruned network retrained with its mask held fixed.
7. ``iterative``: prune, retrain, prune further (Han et al., 2015), with ``prune.iterative``.
8. ``soft_target``: students of equal weight count trained on the teacher's softened outputs.
9. the report: ``results.json``, ``config.yaml`` (the config as run), PNG plots, a table.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import shutil
import time
from collections.abc import Callable
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
from bayesnoise.sgld import baoab, psgld, sgld

__all__ = ["run", "STAGES"]

_log = logging.getLogger("bayesnoise")

STAGES = (
    "train",
    "reference",
    "sgld",
    "sgld_reference",
    "prune",
    "finetune",
    "iterative",
    "soft_target",
)


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
        # breakpoints and fractions are chosen on the validation split, reported on the test set
        self.x_valid, self.y_valid = jnp.asarray(to_dense(ds.x_valid)), jnp.asarray(ds.y_valid)
        out_dim = ds.num_classes if self.classification else 1
        self.sizes = (int(self.x_train.shape[1]), *cfg.model.hidden_sizes, out_dim)
        dtype = jnp.bfloat16 if cfg.model.compute_dtype == "bfloat16" else None
        self.model = bnn.MLP(
            tuple(cfg.model.hidden_sizes) + (out_dim,), cfg.model.activation_fn, dtype
        )
        self.noise = bconfig.build_noise(cfg)  # for a learned noise: model -> LearnedNoise
        self.learned = cfg.noise.kind == "learned"
        self.y_std = float(getattr(ds, "y_std", 1.0))
        self._made: dict = {}  # key -> a function built once (see cached)
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

    def cached(self, key, build: Callable[[], Any]) -> Any:
        """``build()``, made once per ``key`` for this task: the losses, optimizers and
        evaluations handed to compiled loops keep their identity over stages and seeds, so
        each loop compiles once."""
        if key not in self._made:
            self._made[key] = build()
        return self._made[key]

    def metric(self, params) -> jax.Array:
        """Test error, or test RMSE in the target's original units."""
        return self._metric(params, self.x_test, self.y_test)

    def valid_metric(self, params) -> jax.Array:
        """:meth:`metric` on the validation split."""
        return self._metric(params, self.x_valid, self.y_valid)

    def _metric(self, params, x, y) -> jax.Array:
        out = self.model.apply(params, x)
        if self.classification:
            return jnp.mean(jnp.argmax(out, -1) != y)
        return jnp.sqrt(jnp.mean((out[:, 0] - y) ** 2)) * self.y_std

    def predict(self, params, x) -> jax.Array:
        """The predictive the posterior averages: class probabilities, or the prediction (a
        method, so that every sampling run of the task shares one compiled loop)."""
        out = self.model.apply(params, x)
        return jax.nn.softmax(out) if self.classification else out

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
    except ValueError as e:  # a validation split that leaves no training or validation data
        raise UsageError(f"data.validation_fraction: {e}") from e


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
        task.cached(("optimizer", steps), lambda: _optimizer(tc, steps)),
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
    eval_fn = task.cached(
        ("test_metric", net),
        lambda: lambda p: {"test_metric": task.metric(p if net is None else net(p))},
    )
    return _fit(task, key, params, loss_fn, task.y_train, epochs, progress, eval_fn=eval_fn)


def _train(task: _Task, noise, key, progress: bool, epochs: int | None = None):
    tc = task.cfg.train
    epochs = epochs or tc.epochs
    params = task.init(jax.random.fold_in(key, 0))
    loss_fn, scaled = task.cached(("train", id(noise)), lambda: _training(task, noise))
    res = _fit_labels(task, jax.random.fold_in(key, 1), params, loss_fn, epochs, progress, scaled)
    final = res.params if scaled is None else scaled(res.params)
    out = {"params": final, "history": res.history, "metric": float(task.metric(final))}
    if noise is not None and task.classification:
        # Monte Carlo dropout's predictive, for the calibration table beside the posterior's
        fn = inference.sampler(bnn.noisy_apply(task.model, noise), res.params)
        out["mc_dropout"] = _mc_predictive(task, jax.random.fold_in(key, 2), fn)
    return out


def _training(task: _Task, noise) -> tuple[Callable, Callable | None]:
    """The loss of training under ``noise`` (None: none) and the weight-scaled network of
    its parameters (None: the parameters themselves)."""
    if noise is None:
        return task.loss(lambda p, x, k: task.model.apply(p, x)), None
    noisy = bnn.noisy_apply(task.model, noise)
    loss_fn = task.loss(lambda p, x, k: noisy(p, x, rngs={"noise": k}))
    return loss_fn, lambda p: inference.weight_scale(p, noise)


_LOG_ALPHA_THRESHOLD = 3.0  # the sparse variational dropout rule: remove a weight if log α >= 3


def _train_learned(task: _Task, key, progress: bool):
    """Variational dropout: the weights and their noise trained on the negative ELBO per example
    (the KL weighted by ``noise.kl_weight``, ramped in over ``noise.warmup_epochs``)."""
    nc, tc = task.cfg.noise, task.cfg.train
    vd = task.cached("learned_noise", lambda: task.noise(task.model))
    variables = vd.init(jax.random.fold_in(key, 0), task.x_train[:1])
    loss_fn = task.cached(
        "variational_loss",
        lambda: train.variational_loss(
            lambda p, x, k: vd.apply(p, x, rngs={"noise": k}),
            len(task.x_train),
            kl_weight=nc.kl_weight,
            warmup_steps=nc.warmup_epochs * (len(task.x_train) // tc.batch_size),
            likelihood="categorical" if task.classification else "gaussian",
        ),
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


def _sgld(task: _Task, params, key, progress: bool, use_em: bool, checkpoint=None, reference=False):
    """The posterior stage (EM, then the chains); ``checkpoint``: a folder where the chains
    save their state as they go, so that a stopped run goes on from there; ``reference``: the
    noise-free network's chains (``sgld.reference_max_steps``)."""
    sc, ec = task.cfg.sgld, task.cfg.em
    transform = {"sgld": sgld, "psgld": psgld, "baoab": baoab}[sc.method]
    if sc.friction is not None:  # baoab only (the config says so)
        transform = functools.partial(transform, friction=sc.friction)
    hyperprior = bconfig.build_hyperprior(ec) if use_em else None
    settings = sc.run_settings(reference=reference)

    def report(record: dict) -> None:
        _log.info(
            "[em] iteration %d: metric at the posterior mean %.4f, log evidence %s, %d rows pruned",
            record["iteration"],
            record["metric"],
            "n/a" if record["log_evidence"] is None else f"{record['log_evidence']:.1f}",
            record["pruned"],
        )

    data = (task.x_train, task.y_train)
    sampling = dict(
        transform=transform,
        progress=progress,
        predict=task.predict,
        predict_inputs=task.x_test,
        checkpoint=checkpoint,
        **settings,
    )
    if use_em:
        fitted = em.fit(
            key,
            params,
            task.log_likelihood,
            data,
            iterations=ec.iterations,
            sigma0=ec.sigma0,
            hyperprior=hyperprior,
            **ec.fit_settings(),
            eval_fn=task.metric,
            callback=report,
            **sampling,
        )
        res, h, mode, ggn = fitted.result, fitted.hierarchy, fitted.mode, fitted.laplace
        ggn = None if ggn is None else ggn.ggn
    else:  # one E-step under λ = 1 (the key em.fit's first E-step would get)
        h = gsm.hierarchy(params, ec.sigma0)
        mode, ggn = None, None
        if sc.method == "baoab" and sc.auto:
            # BAOAB's automatic settings read the curvature at the start: start at the mode
            mode = params = em.map_estimate(
                jax.random.fold_in(key, 1001), params, h, task.log_likelihood, data,
                steps=ec.map_steps, learning_rate=ec.map_learning_rate,
            )  # fmt: skip
        res = em.e_step(
            jax.random.fold_in(key, 0), params, h, task.log_likelihood, data, **sampling
        )
    mean, variance = moments.mean(res.moments), moments.variance(res.moments)
    hist = fitted.history if use_em else {"iteration": []}
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
    centre = params if mode is None else mode
    lap = laplace.posterior(
        centre,
        h,
        task.log_likelihood,
        data,
        temperature=max(sc.temperature, 1e-8),
        key=jax.random.fold_in(key, 1000),
        ggn=ggn,  # EM's, at the same mode
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


def _rule_curves(task: _Task, mean, std, fractions, batched: bool = False):
    """Every rule's curves (:func:`_curve`); with ``batched``, one row per chain (leading axis)."""
    out = {}
    for rule in task.cfg.prune.rules:
        score = jax.vmap(_RULES[rule]) if batched else _RULES[rule]
        out[rule] = _curve(task, mean, score(mean, std), fractions, batched)
    return out


def _at_breakpoint(fractions, metric, unpruned, found: float) -> float:
    """The metric at the fraction ``found`` of the grid (the unpruned metric at 0 off it)."""
    hit = np.flatnonzero(np.isclose(np.asarray(fractions, np.float64), found, rtol=0, atol=1e-9))
    return float(metric[hit[0]]) if hit.size else float(unpruned)


def _selected(task: _Task, fractions, valid, unpruned_valid, test, unpruned_test) -> tuple:
    """The breakpoint read on the validation curve, and the test metric there."""
    ec = task.cfg.eval
    found = float(
        prune.breakpoint_fraction(
            fractions, valid, unpruned_valid, ec.tolerance, task.cfg.relative_tolerance
        )
    )
    return found, _at_breakpoint(fractions, test, unpruned_test, found)


def _curve(task: _Task, params, scores, fractions, batched: bool = False) -> dict:
    """One rule's curves on the test and the validation split, ``[[fraction, metric], ...]``,
    the breakpoint chosen on the validation curve and the test metric there; with ``batched``,
    a row of metrics, a breakpoint and a test metric per chain."""
    pc = task.cfg.prune
    kw = dict(scope=pc.scope, include_biases=pc.include_biases, batched=batched)
    each = jax.vmap if batched else (lambda f: f)
    curves = {}
    for split, metric in (("test", task.metric), ("valid", task.valid_metric)):
        values = np.asarray(prune.curve(metric, params, scores, fractions, **kw), np.float64)
        unpruned = np.asarray(each(metric)(params), np.float64)
        curves[split] = (np.atleast_2d(values), np.atleast_1d(unpruned))
    (test, test0), (valid, valid0) = curves["test"], curves["valid"]
    found = [
        _selected(task, fractions, v, v0, t, t0) for v, v0, t, t0 in zip(valid, valid0, test, test0)
    ]
    if batched:
        return {
            "curve": test.tolist(),
            "valid_curve": valid.tolist(),
            "breakpoint": [f for f, _ in found],
            "breakpoint_metric": [m for _, m in found],
        }
    pairs = lambda row: [[float(f), float(v)] for f, v in zip(fractions, row)]
    return {
        "curve": pairs(test[0]),
        "valid_curve": pairs(valid[0]),
        "breakpoint": found[0][0],
        "breakpoint_metric": found[0][1],
    }


def _gather(curves: dict) -> dict:
    """``{rule: _curve(...)}`` as ``{"curves": {rule: ...}, "valid_curves": ..., ...}``."""
    keys = (("curves", "curve"), ("valid_curves", "valid_curve"), ("breakpoints", "breakpoint"))
    out = {name: {r: c[k] for r, c in curves.items()} for name, k in keys}
    out["breakpoint_metrics"] = {r: c["breakpoint_metric"] for r, c in curves.items()}
    return out


def _pruning_moments(task: _Task, post) -> tuple[Any, Any]:
    """(mean, std) the pruning scores read: the Laplace posterior at the trained network, or the
    chains' moments (``prune.moments``)."""
    if task.cfg.prune.moments == "laplace" and "laplace_std" in post:
        return post["laplace_mean"], post["laplace_std"]
    return post["mean"], post["std"]


def _prune(task: _Task, post, variables=None):
    """The rules' curves from the pruning moments; given a learned noise's ``variables``, also
    the ``log_alpha`` rule's, on its mean network (``task.metric`` ignores the noise leaves, and
    the scores are None there and at the biases, which it keeps whole). Breakpoints are read on
    the validation split, and the test metric is reported there."""
    fractions = np.asarray(task.cfg.prune.fraction_grid(), np.float32)
    mean, std = _pruning_moments(task, post)
    curves = _rule_curves(task, mean, std, fractions)
    if variables is not None:
        curves["log_alpha"] = _curve(task, variables, prune.log_alpha(variables), fractions)
    out = {
        "unpruned": float(task.metric(mean)),
        "unpruned_valid": float(task.valid_metric(mean)),
        **_gather(curves),
        "per_chain": {},
    }
    out["moments"] = task.cfg.prune.moments if "laplace_std" in post else "sgld"
    cm = post.get("chain_mean")
    if out["moments"] == "sgld" and cm is not None and jax.tree.leaves(cm)[0].shape[0] > 1:
        # every chain's own moments, all chains in one batched evaluation: the spread
        c_curves = _rule_curves(task, cm, post["chain_std"], fractions, batched=True)
        out["per_chain"] = {
            "unpruned": np.asarray(jax.vmap(task.metric)(cm), np.float64).tolist(),
            **_gather(c_curves),
        }
    return out


def _retrain(task: _Task, key, params, epochs: int, lr: float, progress: bool):
    """The kept weights of ``params`` retrained for ``epochs`` (Adam, cosine decay from ``lr``),
    the removed ones held at zero. ``params`` is the pruned network (``prune.apply(p, mask)``):
    the optimizer reads the mask from its zeros, so one optimizer and one loss per (lr, steps)
    serve every mask and the training loop is compiled once for all of them."""
    tc = task.cfg.train
    steps = epochs * (len(task.x_train) // tc.batch_size)
    opt = task.cached(
        ("retrain", lr, steps),
        lambda: optax.chain(
            optax.adam(optax.cosine_decay_schedule(lr, steps)), prune.masked_updates("nonzero")
        ),
    )
    loss_fn, _ = task.cached(("train", id(None)), lambda: _training(task, None))
    return train.fit(
        key,
        params,
        loss_fn,
        opt,
        task.x_train,
        task.y_train,
        epochs=epochs,
        batch_size=tc.batch_size,
        progress=progress,
    ).params


def _both(task: _Task, params) -> tuple[float, float]:
    return float(task.metric(params)), float(task.valid_metric(params))


def _finetune(task: _Task, post, key, progress: bool, variables=None):
    """One-shot pruning then retraining the kept weights with the mask held fixed; the test and
    the validation metric at every fraction. Given a learned noise's ``variables``, also the
    log α rule's masks on its mean network."""
    pc, tc = task.cfg.prune, task.cfg.train
    fractions = [f for f in (0.5, 0.75, 0.9, 0.95) if f <= max(pc.fraction_grid())]
    mean, std = _pruning_moments(task, post)
    lr = pc.finetune_learning_rate or tc.learning_rate
    starts = {rule: (mean, _RULES[rule](mean, std)) for rule in pc.rules}
    if variables is not None:  # with its noise leaves, which the plain model ignores
        starts["log_alpha"] = (variables, prune.log_alpha(variables))
    curves, valid = {}, {}
    for rule, (start, scores) in starts.items():
        curves[rule], valid[rule] = [], []
        for f in fractions:
            mask = prune.mask(scores, f, pc.scope, include_biases=pc.include_biases)
            k = jax.random.fold_in(key, int(1000 * f))
            tuned = _retrain(task, k, prune.apply(start, mask), pc.finetune_epochs, lr, progress)
            test, val = _both(task, tuned)
            curves[rule].append([f, test])
            valid[rule].append([f, val])
    return {"curves": curves, "valid_curves": valid}


def _iterative(task: _Task, post, key, progress: bool, variables=None):
    """Iterative pruning with retraining (``prune.iterative``), every rule from the pruning
    moments' mean network (and, given a learned noise's ``variables``, the log α rule: its
    scores do not change with retraining); the test and the validation metric after every round."""
    pc, ic = task.cfg.prune, task.cfg.prune.iterative
    mean, std = _pruning_moments(task, post)
    lr = ic.learning_rate or task.cfg.train.learning_rate
    starts = {rule: (mean, lambda p, rule=rule: _RULES[rule](p, std)) for rule in pc.rules}
    if variables is not None:  # with its noise leaves, which the plain model ignores
        scores = prune.log_alpha(variables)
        starts["log_alpha"] = (variables, lambda p: scores)
    curves, valid = {}, {}
    for rule, (start, score_fn) in starts.items():
        res = prune.iterative(
            key,
            start,
            score_fn,  # the retrained weights as μ
            ic.fractions,
            lambda k, p, m: _retrain(task, k, p, ic.epochs, lr, progress),
            scope=pc.scope,
            include_biases=pc.include_biases,
            eval_fn=lambda p: dict(zip(("test", "valid"), _both(task, p))),
        )
        curves[rule] = [[f, h["test"]] for f, h in zip(res.fractions, res.history)]
        valid[rule] = [[f, h["valid"]] for f, h in zip(res.fractions, res.history)]
        _log.info(
            "[iterative] %s: %s",
            rule,
            ", ".join(
                f"{100 * f:g}% -> {h['test']:.4f}" for f, h in zip(res.fractions, res.history)
            ),
        )
    return {"curves": curves, "valid_curves": valid}


def _chosen(task: _Task, stage: dict | None, unpruned: float, unpruned_valid: float) -> dict:
    """Per rule, the largest retrained fraction within tolerance on the validation split (the
    prefix rule of :func:`bayesnoise.prune.breakpoint_fraction`) and its test metric."""
    if not stage:
        return {}
    out = {}
    for rule, pts in stage["curves"].items():
        test = np.asarray(pts, np.float64)
        val = np.asarray(stage["valid_curves"][rule], np.float64)
        f, m = _selected(task, test[:, 0], val[:, 1], unpruned_valid, test[:, 1], unpruned)
        out[rule] = {"fraction": f, "metric": m}
    return out


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
        if cfg.train.seeds > 1:
            return _run_seeds(cfg, out, resume, progress)
        return _run(cfg, out, resume, progress)


def _run_seeds(cfg: bconfig.Config, out: Path, resume: bool, progress: bool) -> dict:
    """``train.seeds`` runs, seeds ``train.seed``, ``train.seed + 1``, ..., each in its own
    folder ``OUT/seed_S`` (checkpointed, so an interrupted run resumes at its last stage), then
    the figures over seeds (mean, sd and every seed's) in ``OUT/results.json``."""
    seeds = [cfg.train.seed + i for i in range(cfg.train.seeds)]
    per: list[dict] = []
    shared: dict = {}
    for seed in seeds:
        _log.info("[seeds] seed %d (%d of %d)", seed, len(per) + 1, len(seeds))
        one = bconfig.load_config(cfg, [f"train.seed={seed}", "train.seeds=1"])
        folder = runfolder.prepare(out / f"seed_{seed}", files=("results.json",))
        per.append(_run(one, folder, resume, progress, shared))
        if _release_compiled():
            shared.clear()
    results = _over_seeds(cfg, seeds, per)
    bio.write_text(out / "config.yaml", cfg.to_yaml())
    results["plots"] = report.seed_plots(out, results)
    bio.write_text(out / "results.json", to_json(results))
    _log.info("%s", report.seed_table(results))
    _log.info("results: %s", out / "results.json")
    return results


def _release_compiled(share: float = 0.4) -> bool:
    """Drops JAX's compiled executables once this process holds more than ``share`` of the
    kernel's limit on memory maps (Linux): every executable keeps its code mapped, and past
    ``vm.max_map_count`` the next compilation fails. Later seeds then compile again. Returns
    whether it dropped them."""
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        with open("/proc/self/maps") as maps:
            used = sum(1 for _ in maps)
    except (OSError, ValueError):
        return False
    if used <= share * limit:
        return False
    _log.info("[seeds] %d of %d memory maps in use: dropping compiled code", used, limit)
    jax.clear_caches()
    gc.collect()
    return True


def _stat(values) -> tuple[float, float]:
    """Mean and standard deviation (ddof = 1; 0 for one value) of numbers."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _over_seeds(cfg: bconfig.Config, seeds: list[int], per: list[dict]) -> dict:
    """The figures of runs over seeds: means beside their standard deviations (``*_sd``), and
    every seed's own under ``per_seed``."""
    first = per[0]
    out: dict[str, Any] = {
        "config": cfg.to_dict(),
        "dataset": first["dataset"],
        "metric": first["metric"],
        "seeds": seeds,
        "validation": first["validation"],
    }
    for key in ("unpruned", "unpruned_valid", "trained_metric", "reference_metric"):
        out[key], out[f"{key}_sd"] = _stat([r[key] for r in per])
    for key in ("breakpoints", "breakpoint_metrics"):
        stats = {rule: _stat([r[key][rule] for r in per]) for rule in first[key]}
        out[key] = {rule: m for rule, (m, _) in stats.items()}
        out[f"{key}_sd"] = {rule: sd for rule, (_, sd) in stats.items()}
    for key in ("curves", "finetuned", "iterative"):
        out[key], out[f"{key}_sd"] = {}, {}
        for rule, pts in (first.get(key) or {}).items():
            grid = [f for f, _ in pts]
            values = np.asarray([[v for _, v in r[key][rule]] for r in per], np.float64)
            sd = values.std(0, ddof=1) if len(per) > 1 else np.zeros(len(grid))
            out[key][rule] = [[f, float(m)] for f, m in zip(grid, values.mean(0))]
            out[f"{key}_sd"][rule] = [[f, float(d)] for f, d in zip(grid, sd)]
    for key in ("finetuned_breakpoints", "iterative_breakpoints"):
        out[key] = {}
        for rule in first.get(key) or {}:
            f, f_sd = _stat([r[key][rule]["fraction"] for r in per])
            m, m_sd = _stat([r[key][rule]["metric"] for r in per])
            out[key][rule] = {"fraction": f, "fraction_sd": f_sd, "metric": m, "metric_sd": m_sd}
    name = "error" if first["metric"] == "error" else "rmse"
    out["predictive"] = {}
    for what, values in (first.get("predictive") or {}).items():
        if name in values:
            m, sd = _stat([r["predictive"][what][name] for r in per])
            out["predictive"][what] = {"mean": m, "sd": sd}
    out["per_seed"] = [
        {
            "seed": seed,
            "folder": f"seed_{seed}",
            **{
                k: r[k] for k in ("unpruned", "trained_metric", "breakpoints", "breakpoint_metrics")
            },
            "finetuned_breakpoints": r.get("finetuned_breakpoints", {}),
            "iterative_breakpoints": r.get("iterative_breakpoints", {}),
            "sgld": {k: r["sgld"].get(k) for k in ("rhat_max", "ess_min", "converged")},
        }
        for seed, r in zip(seeds, per)
    ]
    out["timings"] = {
        **{f"seed_{seed}": r["timings"]["total"] for seed, r in zip(seeds, per)},
        "total": round(sum(r["timings"]["total"] for r in per), 2),
    }
    out["stage_seconds"] = {  # the seeds' run times, resumed stages included
        **{f"seed_{seed}": r["stage_seconds"]["total"] for seed, r in zip(seeds, per)},
        "total": round(sum(r["stage_seconds"]["total"] for r in per), 2),
    }
    return out


def _advice(cfg: bconfig.Config, stage: str) -> str:
    """What to change when ``stage`` diverged."""
    if stage.startswith("sgld"):
        return (
            f"Lower sgld.step_size (now {cfg.sgld.step_size}), or set it to auto (the "
            f"curvature-based steps)."
        )
    return f"Lower train.learning_rate (now {cfg.train.learning_rate:g})."


def _check_converged(cfg: bconfig.Config, post: dict) -> None:
    """Stops before pruning when the chains did not converge and the pruning scores
    (``prune.moments: sgld``) or EM's scales (``em.method: sgld``) read them, unless
    ``eval.allow_unconverged``; the sampler's warning and ``converged`` in the results say so
    in every case."""
    diag = post.get("diagnostics", {})
    reads_chains = cfg.prune.moments == "sgld" or (cfg.em.enabled and cfg.em.method == "sgld")
    if diag.get("converged", True) or cfg.eval.allow_unconverged or not reads_chains:
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


def _run(
    cfg: bconfig.Config, out: Path, resume: bool, progress: bool, shared: dict | None = None
) -> dict:
    """One seed's stages. ``shared``: kept over the seeds of one run (configs that differ in
    the seed only); the first seed puts its task there (data, model, and the functions its
    stages hand to compiled loops) and later seeds reuse it, with the code compiled for it."""
    cfg_dict = cfg.to_dict()
    bio.write_text(out / "config.yaml", cfg.to_yaml())
    ckpt = Checkpoints(out, cfg_dict, resume)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shared = {} if shared is None else shared
    if "task" not in shared:
        shared["task"] = _Task(cfg)
    task = shared["task"]
    task.cfg = cfg
    timings["data"] = round(time.perf_counter() - t0, 2)
    # every stage's run time, from its checkpoint where it was resumed (timings: this call's)
    seconds: dict[str, float | None] = {"data": timings["data"]}
    key = jax.random.key(cfg.train.seed)

    def staged(stage: str, fn):
        try:
            return _staged(ckpt, timings, stage, fn, seconds)
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

    def sampled(stage: str, fn):
        # the chains' own checkpoints while the stage runs, removed once the stage is saved
        folder = ckpt.dir / f"{stage}.sampling"
        if not resume:
            shutil.rmtree(folder, ignore_errors=True)
        value = staged(stage, lambda: fn(folder))
        shutil.rmtree(folder, ignore_errors=True)
        return value

    post = sampled(
        "sgld",
        lambda folder: _sgld(
            task, trained["params"], jax.random.fold_in(key, 3), progress, cfg.em.enabled, folder
        ),
    )
    ref_post = sampled(
        "sgld_reference",
        lambda folder: _sgld(
            task, reference["params"], jax.random.fold_in(key, 4), progress, False, folder, True
        ),
    )
    _check_converged(cfg, post)
    pruned = staged("prune", lambda: _prune(task, post, trained.get("variables")))
    tuned = None
    if cfg.prune.finetune_epochs > 0:
        tuned = staged(
            "finetune",
            lambda: _finetune(
                task, post, jax.random.fold_in(key, 6), progress, trained.get("variables")
            ),
        )
    iterated = None
    if cfg.prune.iterative.enabled:
        iterated = staged(
            "iterative",
            lambda: _iterative(
                task, post, jax.random.fold_in(key, 8), progress, trained.get("variables")
            ),
        )
    soft = None
    if cfg.prune.soft_target.enabled and task.classification:
        soft = staged(
            "soft_target",
            lambda: _soft_target(
                task, _pruning_moments(task, post)[0], jax.random.fold_in(key, 5), progress
            ),
        )

    unpruned = (pruned["unpruned"], pruned["unpruned_valid"])
    results = {
        "config": cfg_dict,
        "dataset": task.ds.name,
        "metric": cfg.metric,
        "unpruned": pruned["unpruned"],
        "unpruned_valid": pruned["unpruned_valid"],
        # breakpoints and fine-tuning fractions are chosen on this split, metrics read on the test set
        "validation": {
            "examples": int(len(task.x_valid)),
            "fraction": cfg.data.validation_fraction,
        },
        "trained_metric": trained["metric"],
        "reference_metric": reference["metric"],
        "curves": pruned["curves"],
        "valid_curves": pruned["valid_curves"],
        "breakpoints": pruned["breakpoints"],
        "breakpoint_metrics": pruned["breakpoint_metrics"],
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
        "finetuned_valid": tuned["valid_curves"] if tuned else {},
        "finetuned_breakpoints": _chosen(task, tuned, *unpruned),
        "iterative": iterated["curves"] if iterated else {},
        "iterative_valid": iterated["valid_curves"] if iterated else {},
        "iterative_breakpoints": _chosen(task, iterated, *unpruned),
        "timings": timings,
    }
    results["plots"] = report.plots(
        out, task, results, post, ref_post, learned=trained.get("variables")
    )
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 2)
    results["stage_seconds"] = {
        **seconds,
        "total": round(sum(v for v in seconds.values() if v is not None), 2),
    }
    bio.write_text(out / "results.json", to_json(results))
    _log.info("%s", report.table(results))
    _log.info("results: %s", out / "results.json")
    _log.info("plots:   %s", ", ".join(results["plots"]))
    return results
