"""``import bayesnoise``: the public names, and no application dependency loaded."""

import subprocess
import sys


def test_import_loads_no_application_dependency_and_modules_load_on_use():
    code = (
        "import sys, bayesnoise as bn\n"
        "heavy = ('yaml', 'tqdm', 'matplotlib', 'pydantic', 'sklearn', 'flax', 'numpyro')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(callable(bn.sgld), bn.gsm.__name__, bn.noise.Beta(2.0, 3.0).mean)\n"
        "print(sorted(m for m in ('yaml', 'matplotlib', 'pydantic') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first, names, after = out.stdout.splitlines()
    assert first == "[]", first
    assert names == "True bayesnoise.gsm 0.4"
    assert after == "[]", after  # the GSM and the noise need neither Flax nor the application


def test_every_public_module_is_listed_and_reachable():
    import bayesnoise as bn

    for name in bn.__all__:
        assert getattr(bn, name) is not None
    assert {"nn", "sampling", "laplace", "io", "pipeline", "config"} <= set(dir(bn))
