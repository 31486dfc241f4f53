"""The digits config made small, run through the command line (shared by pipeline tests)."""

from pathlib import Path

from bayesnoise.pipeline import cli

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
SMALL = [
    "train.epochs=3",
    # minibatch SGLD without exchanges of units (digits.yaml: full-batch BAOAB with them; the
    # sampling stage's own tests in test_stages.py run that one)
    "sgld.method=sgld",
    "sgld.batch_size=128",
    "sgld.unit_swaps=false",
    "sgld.burnin=20",
    "sgld.samples=10",
    "sgld.thin=1",
    "sgld.chains=2",
    "sgld.max_steps=300",
    "em.iterations=1",
    "em.map_steps=200",
    "prune.num_fractions=5",
    "prune.soft_target.enabled=true",
    "prune.soft_target.epochs=2",
    "prune.finetune_epochs=1",
    "prune.iterative.enabled=false",
]


# iterative pruning on, short: the shared finished run (conftest.py, digits_small_run) uses it
ITERATIVE = [
    "prune.iterative.enabled=true",
    "prune.iterative.fractions=[0.5,0.8]",
    "prune.iterative.epochs=1",
]


def run_cli(out, *extra):
    """``bayesnoise run configs/digits.yaml --out OUT --quiet`` with SMALL and ``extra`` set."""
    args = ["run", str(CONFIG), "--out", str(out), "--quiet"]
    for s in SMALL + list(extra):
        args += ["--set", s]
    return cli.main(args)
